"""Online resize across processes: ``blkif vbd resize`` (and a plain truncate
plus SIGHUP) grows the image under a running ``blkif serve``; our frontend,
connected in its own domain, sees the new size and uses the new sectors."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from backend_fixtures import sim_service
from helpers import require_tool, start_nbdkit
from blkif import toolstack
from blkif.errors import BlkifError, LocalProtocolError, UsageError
from blkif.frontend import BlockDevice, FrontendOptions
from blkif.platform import open_platform
from xenstore import Xenstore, domain_socket_path
from xenstore_fixtures import ROOT

MIB = 1 << 20


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with sim_service(tmp_path_factory, "resize") as svc:
        yield svc


@contextlib.contextmanager
def _device(service, domid):
    with Xenstore.open(domain_socket_path(service.sock, domid)) as xs, \
            open_platform("sim", domid=domid, path=service.hv.path) as platform:
        dev = BlockDevice.attach(xs, platform, domid, "xvda", FrontendOptions(timeout=10))
        try:
            yield dev
        finally:
            dev.detach()


def _blkif(service, *argv):
    return subprocess.run([sys.executable, "-m", "blkif", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, XENSTORED_PATH=service.sock))


def _wait_size(dev, size, timeout=5):
    deadline = time.monotonic() + timeout
    while dev.size != size and time.monotonic() < deadline:
        dev.poll(0.1)
    return dev.size


def _grown_to_16m(dev, writes, data):
    """After a resize to 16 MiB under ``writes`` of ``data`` to the first 8 MiB:
    they landed, the frontend sees the new size and its new last page works."""
    for handle in writes:
        handle.result()
    assert _wait_size(dev, 16 * MIB) == 16 * MIB
    dev.write(16 * MIB - 4096, b"e" * 4096)  # the last page, new
    assert dev.read(16 * MIB - 4096, 4096) == b"e" * 4096
    assert dev.read(0, MIB) == data and dev.read(7 * MIB, MIB) == data


def test_vbd_resize_reaches_a_connected_frontend(service, tmp_path):
    image = tmp_path / "disk.img"
    domid, devid = service.new_vbd(image, size=8 * MIB)
    with _device(service, domid) as dev:
        assert dev.size == 8 * MIB
        with pytest.raises(LocalProtocolError, match="past the end"):
            dev.write(8 * MIB, b"x" * 4096)  # beyond the end, for now
        run = _blkif(service, "vbd", "resize", "--domid", str(domid), "--vdev", "xvda",
                     "--size", "12M")
        assert run.returncode == 0, run.stderr
        assert "%d sectors, published to its frontend" % (12 * MIB // 512) in run.stdout
        assert os.path.getsize(image) == 12 * MIB
        assert _wait_size(dev, 12 * MIB) == 12 * MIB
        dev.write(12 * MIB - 4096, b"e" * 4096)  # the last page, new
        assert dev.read(12 * MIB - 4096, 4096) == b"e" * 4096
    with open(image, "rb") as f:
        f.seek(12 * MIB - 4096)
        assert f.read() == b"e" * 4096
    assert "grew from %d to %d sectors" % (8 * MIB // 512, 12 * MIB // 512) in service.output()


def test_sighup_rechecks_at_once_and_stops_nothing(service, tmp_path):
    image = tmp_path / "disk.img"
    domid, devid = service.new_vbd(image, size=8 * MIB)
    with _device(service, domid) as dev:
        worker = service.worker_pid(domid, devid)
        os.truncate(image, 10 * MIB)
        service.proc.send_signal(signal.SIGHUP)
        assert _wait_size(dev, 10 * MIB, timeout=0.9) == 10 * MIB  # before the 1 s tick
        assert service.proc.poll() is None
        assert service.worker_pid(domid, devid) == worker
        assert dev.read(10 * MIB - 512, 512) == bytes(512)


def test_a_store_that_shrank_is_not_published(service, tmp_path):
    image = tmp_path / "disk.img"
    domid, devid = service.new_vbd(image, size=8 * MIB)
    back = toolstack.backend_path(0, domid, devid)
    with _device(service, domid) as dev:
        os.truncate(image, 4 * MIB)
        deadline = time.monotonic() + 5
        while "shrank from" not in service.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "shrank from %d to %d sectors" % (8 * MIB // 512, 4 * MIB // 512) \
            in service.output()
        assert service.dom0.read_str(back + "/sectors") == str(8 * MIB // 512)
        assert dev.size == 8 * MIB


def test_an_image_grows_under_its_daemon_with_io_in_flight(service, tmp_path):
    """qcow2 through its qemu-storage-daemon: the worker removes the export,
    resizes the node, exports it again and reconnects, holding the ring's
    I/O back meanwhile; the frontend sees the new size, loses nothing, and
    the image is clean."""
    require_tool("qemu-storage-daemon")
    image = tmp_path / "disk.qcow2"
    domid, devid = service.new_vbd(image, size=8 * MIB, fmt="qcow2")
    with _device(service, domid) as dev:
        data = os.urandom(MIB)
        writes = [dev.submit_write(i * MIB, data) for i in range(8)]  # in flight
        run = _blkif(service, "vbd", "resize", "--domid", str(domid), "--vdev", "xvda",
                     "--size", "16M")
        assert run.returncode == 0, run.stderr
        assert "%d sectors, published to its frontend" % (16 * MIB // 512) in run.stdout
        _grown_to_16m(dev, writes, data)
        run = _blkif(service, "vbd", "resize", "--domid", str(domid), "--vdev", "xvda",
                     "--size", "12M")
        assert run.returncode == 2 and "shrinking it" in run.stderr
    assert "grown to %d bytes under its qemu-storage-daemon" % (16 * MIB) in service.output()
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(image)],
                          capture_output=True, text=True, check=True).stdout
    assert json.loads(info)["virtual-size"] == 16 * MIB
    toolstack.destroy(service.dom0, domid, "xvda")
    deadline = time.monotonic() + 10  # the worker stops its daemon: the image is free
    while subprocess.run(["qemu-img", "check", "-q", str(image)]).returncode != 0:
        assert time.monotonic() < deadline, "qemu-img check never passed"
        time.sleep(0.2)


def test_what_qemu_refuses_is_said_and_the_vbd_serves_on(service, tmp_path):
    require_tool("qemu-storage-daemon")
    image = tmp_path / "ro.qcow2"
    domid, devid = service.new_vbd(image, mode="r", size=8 * MIB, fmt="qcow2")
    worker = service.worker_pid(domid, devid)
    with _device(service, domid) as dev:
        run = _blkif(service, "vbd", "resize", "--domid", str(domid), "--vdev", "xvda",
                     "--size", "16M")
        assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1
        assert "block_resize: Image is read-only" in run.stderr, run.stderr
        assert dev.read(0, 4096) == bytes(4096) and dev.size == 8 * MIB
    assert service.worker_pid(domid, devid) == worker


def test_an_nbd_export_grown_on_its_server_is_taken_online(service, tmp_path):
    """The export's file grows under nbdkit (a storage host growing a volume),
    which takes one client at a time, as qemu-nbd does by default.  ``blkif
    vbd resize`` has the worker connect again with the rings held back: the
    frontend sees the new size, writes in flight land, and a size the export
    does not have is refused in one line.  Before any frontend connects it
    works too."""
    require_tool("nbdkit")
    export = tmp_path / "export.img"
    with open(export, "wb") as f:
        f.truncate(6 * MIB)
    sock = tmp_path / "nbd.sock"
    server = start_nbdkit(sock, "--filter=limit", "file", str(export), "limit=1")
    try:
        domid = 300
        toolstack.introduce(service.dom0, domid)
        devid = toolstack.create(service.dom0, domid, "xvda", "nbd+unix:///?socket=%s" % sock)
        back = toolstack.backend_path(0, domid, devid)
        worker = service.worker_pid(domid, devid)
        deadline = time.monotonic() + 10
        while service.dom0.read_str(back + "/state", "") != "2":  # InitWait: nobody connected
            assert time.monotonic() < deadline, "the VBD never reached InitWait"
            time.sleep(0.05)
        os.truncate(export, 8 * MIB)
        run = _blkif(service, "vbd", "resize", "--domid", str(domid), "--vdev", "xvda",
                     "--size", "8M")
        assert run.returncode == 0, run.stderr  # published when a frontend connects:
        with _device(service, domid) as dev:
            assert dev.size == 8 * MIB
            data = os.urandom(MIB)
            writes = [dev.submit_write(i * MIB, data) for i in range(8)]  # in flight
            run = _blkif(service, "vbd", "resize", "--domid", str(domid), "--vdev", "xvda",
                         "--size", "16M")
            assert run.returncode == 1 and "the export has %d bytes, not %d: grow it on its " \
                "server first" % (8 * MIB, 16 * MIB) in run.stderr, run.stderr
            assert len(run.stderr.strip().splitlines()) == 1
            os.truncate(export, 16 * MIB)
            run = _blkif(service, "vbd", "resize", "--domid", str(domid), "--vdev", "xvda",
                         "--size", "16M")
            assert run.returncode == 0, run.stderr
            _grown_to_16m(dev, writes, data)
        assert service.worker_pid(domid, devid) == worker
        toolstack.destroy(service.dom0, domid, "xvda")
    finally:
        server.kill()  # SIGTERM waits for its clients
        server.wait()
    with open(export, "rb") as f:
        f.seek(16 * MIB - 4096)
        assert f.read() == b"e" * 4096


def test_growing_an_image_nobody_serves_times_out(service, tmp_path):
    image = tmp_path / "lonely.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    domid, other = 999, 7  # a backend domain no service of ours serves
    toolstack.create(service.dom0, domid, "xvdb", "qcow2:%s" % image, backend_domid=other)
    with pytest.raises(BlkifError, match="no worker of blkif serve grew"):
        toolstack.resize(service.dom0, domid, "xvdb", 16 * MIB, backend_domid=other,
                         timeout=0.5)
    back = toolstack.backend_path(other, domid, toolstack.vdev_to_devid("xvdb"))
    assert service.dom0.read_str(back + "/" + toolstack.RESIZE_REQUEST, None) is None
    toolstack.destroy(service.dom0, domid, "xvdb", backend_domid=other)


@pytest.mark.parametrize("argv,text", [
    (["--size", "4M"], "shrinking it"),
    (["--size", "12345"], "not a positive multiple of 512"),
    (["--size", "lots"], "expected a number of bytes"),
    (["--size", "12M", "--vdev", "xvdz"], "no VBD xvdz"),
])
def test_resize_errors_are_one_line(service, tmp_path, argv, text):
    domid, _ = service.new_vbd(tmp_path / "disk.img", size=8 * MIB)
    args = dict(zip(argv[::2], argv[1::2]))
    run = _blkif(service, "vbd", "resize", "--domid", str(domid),
                 "--vdev", args.get("--vdev", "xvda"), "--size", args["--size"])
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1 and text in run.stderr, run.stderr


def test_resize_refuses_devices_and_other_formats(tmp_path):
    class Xs:
        def __init__(self, params):
            self.params = params

        def read_str(self, path, default=None):
            return self.params

        def exists(self, path):
            return "/backend/vbd/" in path

    with pytest.raises(UsageError, match="grow a block device"):
        toolstack.resize(Xs("/dev/null"), 1, "xvda", 1 << 30)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    toolstack.resize(Xs("aio:%s" % image), 1, "xvda", 8192)
    assert image.stat().st_size == 8192
    with pytest.raises(UsageError, match="unknown disk format 'vdi'"):
        toolstack.resize(Xs("vdi:%s" % image), 1, "xvda", 1 << 20)


@pytest.mark.parametrize("text,size", [("512", 512), ("20G", 20 << 30), ("4k", 4096),
                                       ("1MiB", 1 << 20)])
def test_parse_size(text, size):
    assert toolstack.parse_size(text) == size
