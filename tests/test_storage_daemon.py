"""StorageDaemon: a real qemu-storage-daemon per image, its errors, its end."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from blkif.backend.backing import StoreError
from blkif.backend.qmp import QmpError
from blkif.backend.storage_daemon import StorageDaemon, daemon_argv
from helpers import require_tool
from xenstore_fixtures import ROOT


@pytest.fixture(scope="module", autouse=True)
def tools():
    require_tool("qemu-img")
    require_tool("qemu-storage-daemon")


def test_argv_exports_one_node_with_discard_and_the_mode():
    argv = daemon_argv("/i/a.vhd", "vpc", "/run/blkif/s.nbd", writable=False, device=True)
    assert argv[0] == "qemu-storage-daemon"
    options = dict(zip(argv[1::2], argv[2::2]))  # the two --blockdev: the last one wins
    blockdevs = [json.loads(v) for k, v in zip(argv[1::2], argv[2::2]) if k == "--blockdev"]
    assert blockdevs[0]["driver"] == "host_device" and blockdevs[0]["filename"] == "/i/a.vhd"
    assert blockdevs[1]["driver"] == "vpc" and blockdevs[1]["file"] == "file"
    assert all(b["read-only"] and b["discard"] == "unmap" for b in blockdevs)
    assert json.loads(options["--nbd-server"])["addr"] == {"type": "unix",
                                                           "path": "/run/blkif/s.nbd"}
    export = json.loads(options["--export"])
    assert (export["name"], export["writable"]) == ("disk", False)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "8M"], check=True)
    return path


def test_serves_the_image_until_stopped(tmp_path, image):
    daemon = StorageDaemon(str(image), "qcow2", str(tmp_path / "d.nbd"), label="t")
    daemon.start()
    try:
        info = subprocess.run(["qemu-img", "info", "--output=json", daemon.uri],
                              capture_output=True, text=True, check=True).stdout
        assert json.loads(info)["virtual-size"] == 8 << 20
        assert daemon.poll() is None and daemon.starts == 1
    finally:
        pid = daemon.pid
        daemon.stop()
    assert not os.path.exists("/proc/%d" % pid) and not (tmp_path / "d.nbd").exists()


@pytest.mark.parametrize("name,words", [
    ("missing.qcow2", "cannot open image {path}: No such file or directory"),
    ("raw.img", "qemu-storage-daemon cannot serve {path}: Image is not in qcow2 format"),
])
def test_a_bad_image_is_one_line_with_qemus_reason(tmp_path, name, words):
    path = tmp_path / name
    if name == "raw.img":
        path.write_bytes(bytes(1 << 20))
    daemon = StorageDaemon(str(path), "qcow2", str(tmp_path / "d.nbd"))
    with pytest.raises(StoreError) as info:
        daemon.start()
    assert str(info.value) == words.format(path=path)
    assert daemon.pid is None


def test_a_socket_path_too_long_is_refused(tmp_path):
    with pytest.raises(StoreError, match="too long for a Unix socket"):
        StorageDaemon("/i.qcow2", "qcow2", "/" + "d" * 120)


def test_poll_says_how_it_died(tmp_path, image):
    daemon = StorageDaemon(str(image), "qcow2", str(tmp_path / "d.nbd"))
    daemon.start()
    os.kill(daemon.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while (why := daemon.poll()) is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert why == "qemu-storage-daemon for %s stopped (killed by SIGKILL)" % image
    assert daemon.pid is None
    daemon.start()  # and it starts again on the same socket
    assert daemon.starts == 2
    daemon.stop()


def test_it_dies_with_the_process_that_started_it(tmp_path, image):
    """A worker killed outright leaves no daemon behind (--pdeathsig)."""
    script = textwrap.dedent("""
        import sys, time
        from blkif.backend.storage_daemon import StorageDaemon
        daemon = StorageDaemon(sys.argv[1], "qcow2", sys.argv[2])
        daemon.start()
        print(daemon.pid, flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(image), str(tmp_path / "d.nbd")],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    pid = int(proc.stdout.readline())
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    while os.path.exists("/proc/%d" % pid):
        with open("/proc/%d/stat" % pid) as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break  # dead, waiting for init to reap it
        assert time.monotonic() < deadline, "qemu-storage-daemon outlived its worker"
        time.sleep(0.02)


def test_a_successor_waits_for_the_image_lock_of_its_predecessor(tmp_path, image):
    """A killed worker's daemon still holds the image's lock while it writes
    out its caches: the next one waits for it instead of failing."""
    first = StorageDaemon(str(image), "qcow2", str(tmp_path / "a.nbd"), label="a")
    first.start()
    second = StorageDaemon(str(image), "qcow2", str(tmp_path / "b.nbd"), label="b")
    stopper = threading.Timer(0.5, first.stop)
    stopper.start()
    try:
        started = time.monotonic()
        second.start()
        assert time.monotonic() - started >= 0.4  # it waited for the lock
        assert second.poll() is None and second.starts == 1
    finally:
        stopper.join()
        second.stop()
    with open(second.log_path) as log:
        assert "Is another process using the image" in log.read()


def test_grow_resizes_the_image_under_the_daemon_over_qmp(tmp_path, image):
    daemon = StorageDaemon(str(image), "qcow2", str(tmp_path / "d.nbd"), label="t")
    daemon.start()
    try:
        daemon.grow(16 << 20)
        assert _virtual_size(daemon.uri) == 16 << 20  # exported again, at the new size
    finally:
        daemon.stop()
    assert not (tmp_path / "d.nbd.qmp").exists()
    assert _virtual_size(str(image)) == 16 << 20


def test_what_qemu_refuses_is_said_and_the_export_stays(tmp_path, image):
    daemon = StorageDaemon(str(image), "qcow2", str(tmp_path / "d.nbd"), writable=False,
                           label="t")
    daemon.start()
    try:
        with pytest.raises(QmpError, match="block_resize: Image is read-only"):
            daemon.grow(16 << 20)
        assert _virtual_size(daemon.uri) == 8 << 20
    finally:
        daemon.stop()


def _virtual_size(target):
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json", target],
                          capture_output=True, text=True, check=True).stdout
    return json.loads(info)["virtual-size"]
