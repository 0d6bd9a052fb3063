"""``params`` parsing: one table of what libxl and operators write, and properties."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkif.backend.params import FORMATS, ParamsError, Target, parse_params
from blkif.errors import UsageError
from blkif.toolstack import params_node

GOOD = [  # params -> Target
    ("/images/a.img", Target("file", path="/images/a.img")),
    ("/dev/vg0/guest", Target("file", path="/dev/vg0/guest")),
    ("aio:/images/a.img", Target("file", path="/images/a.img", format="aio")),
    ("raw:/images/a.img", Target("file", path="/images/a.img", format="raw")),
    ("qcow2:/images/b.qcow2", Target("image", path="/images/b.qcow2", driver="qcow2",
                                     format="qcow2")),
    ("vhd:/images/c.vhd", Target("image", path="/images/c.vhd", driver="vpc", format="vhd")),
    ("vmdk:/images/d.vmdk", Target("image", path="/images/d.vmdk", driver="vmdk",
                                   format="vmdk")),
    ("qed:/images/e.qed", Target("image", path="/images/e.qed", driver="qed", format="qed")),
    ("qcow:/images/f.qcow", Target("image", path="/images/f.qcow", driver="qcow",
                                   format="qcow")),
    ("QCOW2:/images/b.qcow2", Target("image", path="/images/b.qcow2", driver="qcow2",
                                     format="qcow2")),
    ("/images/with:colon.img", Target("file", path="/images/with:colon.img")),
    ("qcow2:/images/with:colon", Target("image", path="/images/with:colon", driver="qcow2",
                                        format="qcow2")),
    ("nbd://storage1/vm7", Target("nbd", uri="nbd://storage1/vm7")),
    ("nbd://storage1:10810/vm7", Target("nbd", uri="nbd://storage1:10810/vm7")),
    ("nbd://10.0.0.5", Target("nbd", uri="nbd://10.0.0.5")),
    ("nbd://[fd00::5]:10809/x", Target("nbd", uri="nbd://[fd00::5]:10809/x")),
    ("nbd+unix:///vm7?socket=/run/nbd.sock",
     Target("nbd", uri="nbd+unix:///vm7?socket=/run/nbd.sock")),
    ("nbd+unix://?socket=/run/nbd.sock", Target("nbd", uri="nbd+unix://?socket=/run/nbd.sock")),
    ("aio:nbd://storage1/vm7", Target("nbd", uri="nbd://storage1/vm7", format="aio")),
    ("raw:nbd+unix:///d?socket=/s", Target("nbd", uri="nbd+unix:///d?socket=/s", format="raw")),
    ("  /images/a.img\n", Target("file", path="/images/a.img")),
]

BAD = [  # params -> words the one-line error must contain
    ("", "empty"),
    ("   ", "empty"),
    ("vdi:/images/a.vdi", "unknown disk format 'vdi'"),
    ("tap:aio:/images/a.img", "unknown disk format 'tap'"),
    ("qcow2:", "names no file"),
    ("aio:", "names no file"),
    ("http://host/a.img", "unsupported URI scheme 'http'"),
    ("nbds://host/x", "unsupported URI scheme 'nbds'"),
    ("qcow2:nbd://host/x", "format qcow2 over a URI"),
    ("nbd:///x", "no host"),
    ("nbd://host:0/x", "port 0"),
    ("nbd://host:99999/x", "bad NBD URI"),
    ("nbd://host:port/x", "bad NBD URI"),
    ("nbd://host/x?tls=on", "unsupported query"),
    ("nbd://user@host/x", "no user"),
    ("nbd+unix:///x", "socket="),
    ("nbd+unix:///x?socket=relative.sock", "socket="),
    ("nbd+unix://host/x?socket=/s", "takes no host"),
    ("nbd+unix:///x?socket=/s&socket=/t", "socket="),
    ("nbd+unix:///x?socket=/s&tls=require", "unsupported query"),
]


@pytest.mark.parametrize("params,target", GOOD, ids=[p for p, _ in GOOD])
def test_good_params(params, target):
    assert parse_params(params) == target


@pytest.mark.parametrize("params,words", BAD, ids=[p or "empty" for p, _ in BAD])
def test_bad_params_are_one_line_errors(params, words):
    with pytest.raises(ParamsError) as info:
        parse_params(params)
    message = str(info.value)
    assert words in message and "\n" not in message


@pytest.mark.parametrize("params,target", GOOD, ids=[p for p, _ in GOOD])
def test_str_gives_back_params_that_parse_the_same(params, target):
    assert parse_params(str(target)) == target


PATHS = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1).map(
    lambda s: "/" + s.strip())


@given(PATHS)
def test_any_absolute_path_is_a_raw_file(path):
    assert parse_params(path) == Target("file", path=path.strip())


@given(st.sampled_from(sorted(FORMATS)), PATHS)
def test_every_format_prefix_keeps_the_path_whole(fmt, path):
    target = parse_params("%s:%s" % (fmt, path))
    assert target.path == path.strip() and target.format == fmt
    assert target.kind == ("file" if FORMATS[fmt] == "raw" else "image")
    assert target.driver == (None if FORMATS[fmt] == "raw" else FORMATS[fmt])


@given(st.text(max_size=60))
def test_anything_parses_or_is_a_params_error(text):
    try:
        target = parse_params(text)
    except ParamsError as exc:
        assert "\n" not in str(exc)
        return
    assert target.kind in ("file", "image", "nbd")
    assert (target.uri is not None) == (target.kind == "nbd")


def test_toolstack_makes_paths_absolute_and_keeps_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert params_node("disk.img") == str(tmp_path / "disk.img")
    assert params_node("qcow2:disk.qcow2") == "qcow2:%s" % (tmp_path / "disk.qcow2")
    assert params_node("nbd://storage1/vm7") == "nbd://storage1/vm7"
    with pytest.raises(UsageError, match="unknown disk format 'vdi'"):
        params_node("vdi:disk.vdi")
