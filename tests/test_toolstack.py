"""The toolstack helper: devids as docs/misc/vbd-interface defines them, and
VBD nodes with libxl's layout and permissions in a real xenstored of ours."""
import json
import subprocess
import sys

import pytest

from blkif.errors import UsageError
from blkif.toolstack import create, destroy, list_vbds, vdev_to_devid
from xenstore import Perm, Xenstore
from xenstore_fixtures import xenstored  # noqa: F401


@pytest.mark.parametrize("vdev,devid", [
    ("xvda", 51712), ("xvdb", 51728), ("xvda1", 51713), ("xvdp15", 202 << 8 | 15 << 4 | 15),
    ("xvdq", 1 << 28 | 16 << 8), ("xvdaa", 1 << 28 | 26 << 8), ("sda", 2048),
    ("sdb2", 2066), ("hda", 768), ("hdb", 832), ("hdc", 5632), ("d0p1", 51713),
    ("d16", 1 << 28 | 16 << 8), ("51712", 51712),
])
def test_vdev_to_devid(vdev, devid):
    assert vdev_to_devid(vdev) == devid


@pytest.mark.parametrize("vdev", ["vda", "xvd", "sdq", "hdi", "xvda16x", ""])
def test_bad_vdev_names(vdev):
    with pytest.raises(UsageError):
        vdev_to_devid(vdev)


def test_create_list_destroy(xenstored, tmp_path):  # noqa: F811
    image = tmp_path / "img"
    image.write_bytes(bytes(4096))
    with Xenstore.open(xenstored) as xs:
        devid = create(xs, 3, "xvdb", str(image), "r")
        back = "/local/domain/0/backend/vbd/3/%d" % devid
        front = "/local/domain/3/device/vbd/%d" % devid
        assert xs.read_str(back + "/params") == str(image)
        assert xs.read_str(back + "/frontend") == front
        assert xs.read_str(front + "/backend") == back
        assert xs.read_str(back + "/state") == xs.read_str(front + "/state") == "1"
        assert xs.get_perms(back) == [Perm("n", 0), Perm("r", 3)]
        assert xs.get_perms(front) == [Perm("n", 3), Perm("r", 0)]
        assert list_vbds(xs) == [{
            "domid": 3, "devid": 51728, "type": "vbd", "vdev": "xvdb", "params": str(image),
            "mode": "r", "backend_state": "Initialising", "frontend_state": "Initialising"}]
        for kind in ("vbd", "qdisk"):  # one devid per guest, whatever the type
            with pytest.raises(UsageError, match="already exists"):
                create(xs, 3, "xvdb", str(image), kind=kind)
        destroy(xs, 3, "xvdb")
        assert not xs.exists(back) and not xs.exists(front)
        assert list_vbds(xs) == []
        with pytest.raises(UsageError, match="no VBD"):
            destroy(xs, 3, "xvdb")


def test_a_qdisk_vbd_is_written_as_libxl_does(xenstored, tmp_path):  # noqa: F811
    image = tmp_path / "disk.qcow2"
    image.write_bytes(b"")
    with Xenstore.open(xenstored) as xs:
        devid = create(xs, 4, "xvda", "qcow2:%s" % image, kind="qdisk")
        back = "/local/domain/0/backend/qdisk/4/%d" % devid
        assert xs.read_str("/local/domain/4/device/vbd/%d/backend" % devid) == back
        assert xs.read_str(back + "/params") == "qcow2:%s" % image
        assert xs.read_str(back + "/type") == "qdisk"
        (row,) = list_vbds(xs)
        assert (row["type"], row["devid"]) == ("qdisk", devid)
        destroy(xs, 4, "xvda")
        assert not xs.exists(back) and list_vbds(xs) == []
        with pytest.raises(UsageError, match="backend type"):
            create(xs, 4, "xvda", str(image), kind="Tap/x")


def _cli(sock, *args):
    return subprocess.run([sys.executable, "-m", "blkif", "vbd", "--xenstore", sock, *args],
                          capture_output=True, text=True, timeout=60)


def test_cli(xenstored, tmp_path):  # noqa: F811
    image = tmp_path / "img"
    image.write_bytes(bytes(4096))
    out = _cli(xenstored, "create", "--domid", "1", "--vdev", "xvda", "--target", str(image))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "/local/domain/0/backend/vbd/1/51712"
    rows = json.loads(_cli(xenstored, "list", "--json").stdout)
    assert [(r["domid"], r["vdev"], r["backend_state"]) for r in rows] == [
        (1, "xvda", "Initialising")]
    assert "Initialising" in _cli(xenstored, "list").stdout
    bad = _cli(xenstored, "create", "--domid", "1", "--vdev", "vda", "--target", str(image))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "vda" in bad.stderr
    missing = _cli(xenstored, "create", "--domid", "1", "--vdev", "xvdc", "--target", "/nope")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    missing = _cli(xenstored, "create", "--domid", "1", "--vdev", "xvdc", "--target",
                   "qcow2:/nope.qcow2")
    assert missing.returncode == 2 and "target /nope.qcow2 does not exist" in missing.stderr
    qcow2 = _cli(xenstored, "create", "--domid", "1", "--vdev", "xvdc", "--target",
                 "qcow2:%s" % image)  # a format prefix, as libxl writes params
    assert qcow2.returncode == 0, qcow2.stderr
    uri = _cli(xenstored, "create", "--domid", "1", "--vdev", "xvdd", "--target",
               "nbd://storage1/vm7")  # nothing local to look for
    assert uri.returncode == 0, uri.stderr
    for vdev in ("xvdc", "xvdd"):
        assert _cli(xenstored, "destroy", "--domid", "1", "--vdev", vdev).returncode == 0
    assert _cli(xenstored, "destroy", "--domid", "1", "--vdev", "xvda").returncode == 0


def test_cli_without_xenstored_is_one_line(tmp_path):
    out = _cli(str(tmp_path / "none.sock"), "list")
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert "Traceback" not in out.stderr
