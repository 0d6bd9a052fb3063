"""libxenstore's own tools (Debian xenstore-utils) against our daemon, with
XENSTORED_PATH pointing at its socket: what they print is what a real
xenstored would make them print."""
import os
import subprocess

import pytest

from helpers import require_tool
from xenstore import Xenstore
from xenstore_fixtures import xenstored  # noqa: F401


@pytest.fixture
def tool(xenstored):
    env = dict(os.environ, XENSTORED_PATH=xenstored)

    def run(name, *args, check=True):
        result = subprocess.run([require_tool(name), *args], env=env,
                                capture_output=True, text=True, timeout=20)
        if check:
            assert result.returncode == 0, (name, args, result.stderr)
        return result
    run.env = env
    return run


def test_write_read_exists_rm(tool):
    tool("xenstore-write", "/vm/a", "hello world", "/vm/b", "2")
    assert tool("xenstore-read", "/vm/a").stdout == "hello world\n"
    assert tool("xenstore-read", "/vm/a", "/vm/b").stdout == "hello world\n2\n"
    assert tool("xenstore-exists", "/vm/b").returncode == 0
    assert tool("xenstore-exists", "/vm/zz", check=False).returncode == 1
    assert tool("xenstore-read", "/vm/zz", check=False).returncode == 1
    tool("xenstore-rm", "/vm/a")
    assert tool("xenstore-list", "/vm").stdout == "b\n"
    tool("xenstore-rm", "/vm")
    assert tool("xenstore-exists", "/vm", check=False).returncode == 1


def test_ls_and_chmod_show_perms(tool, xenstored):
    tool("xenstore-write", "/local/domain/3/name", "guest")
    tool("xenstore-chmod", "-r", "/local/domain/3", "n3", "r0")
    out = tool("xenstore-ls", "-p", "/local/domain/3").stdout
    assert out.startswith('name = "guest"') and out.rstrip().endswith("(n3,r0)")
    with Xenstore.open(xenstored) as xs:
        assert [str(p) for p in xs.get_perms("/local/domain/3/name")] == ["n3", "r0"]
    full = tool("xenstore-ls", "-f").stdout.splitlines()
    assert '/local/domain/3/name = "guest"' in full
    assert '/tool/xenstored = ""' in full


def test_values_written_by_us_read_by_them_and_back(tool, xenstored):
    with Xenstore.open(xenstored) as xs:
        xs.write("/x/ours", "from pyxs")
        assert tool("xenstore-read", "/x/ours").stdout == "from pyxs\n"
        tool("xenstore-write", "/x/theirs", "from libxenstore")
        assert xs.read("/x/theirs") == b"from libxenstore"


def test_big_directory_listing(tool, xenstored):
    names = ["entry-%03d-%s" % (i, "y" * 40) for i in range(120)]  # > 4 KiB
    with Xenstore.open(xenstored) as xs:
        for t in xs.transactions():
            with t:
                for name in names:
                    t.mkdir("/big/" + name)
        assert xs.list("/big") == names            # E2BIG -> DIRECTORY_PART
    assert tool("xenstore-list", "/big").stdout.split() == names


def test_watch_tool_sees_events_in_order(tool, xenstored):
    watcher = subprocess.Popen([require_tool("xenstore-watch"), "-n", "4", "/w"],
                               env=tool.env, stdout=subprocess.PIPE, text=True)
    try:
        # Its first line is the event of its own registration: then it watches.
        assert watcher.stdout.readline() == "/w\n"
        with Xenstore.open(xenstored) as xs:
            xs.write("/w/a", "1")
            xs.write("/w/a/b", "2")
            xs.rm("/w/a")
        out, _ = watcher.communicate(timeout=10)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert out.split() == ["/w/a", "/w/a/b", "/w/a"]
    assert watcher.returncode == 0
