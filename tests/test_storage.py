"""Image formats and NBD storage through ``blkif serve`` on the sim platform.

Real components only: images made by ``qemu-img``, served by the VBD's own
qemu-storage-daemon, remote exports by ``nbdkit``; our frontend writes, and
``qemu-img compare``/``check`` judge the image against a raw copy written
alongside.  Failure tests kill the daemon or the NBD server mid-run.
"""
import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

from backend_fixtures import RawFrontend, error_node, sim_service, status_after_tick
from blkif import toolstack
from blkif.abi import constants as c
from blkif.negotiate import FrontendWants
from helpers import require, require_tool
from xenstore import XenbusState as S

SIZE = 16 << 20
ONE_QUEUE = FrontendWants(0, 1, 0, False)
WIDE = FrontendWants(2, 4, 256, True)  # asks for 4 queues: an NBD VBD offers 1


@pytest.fixture(scope="module")
def tools():
    for name in ("qemu-img", "qemu-storage-daemon", "nbdkit"):
        require_tool(name)
    require(importlib.util.find_spec("nbd") is not None,
            "python module nbd (apt python3-libnbd, linked into the venv by make test)")


@pytest.fixture(scope="module")
def service(tools, tmp_path_factory):
    with sim_service(tmp_path_factory, "serve", "--max-queues", "4") as svc:
        yield svc
    assert not _daemons_of(svc), "a qemu-storage-daemon outlived the service"


def _daemons_of(svc):
    out = subprocess.run(["pgrep", "-f", "qemu-storage-daemon.*%s" % svc.state_dir],
                         capture_output=True, text=True).stdout
    return out.split()


def new_vbd(service, params, mode="w"):
    domid = next(_ids)
    toolstack.introduce(service.dom0, domid)
    devid = toolstack.create(service.dom0, domid, "xvda", params, mode)
    return RawFrontend(service, domid, devid), domid, devid


_ids = iter(range(200, 10000))


def qemu_img(*args):
    proc = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0, "qemu-img %s: %s%s" % (args[0], proc.stdout, proc.stderr)
    return proc.stdout


def remove_vbd(service, domid, devid, image):
    """Remove the VBD as the toolstack does; wait until its daemon let go of ``image``."""
    service.dom0.rm(toolstack.backend_path(0, domid, devid))
    deadline = time.monotonic() + 10
    while subprocess.run(["pgrep", "-f", "qemu-storage-daemon.*%s" % image],
                         capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the VBD's qemu-storage-daemon is still running"
        time.sleep(0.05)


def vbd_status(service, domid, devid):
    with open(os.path.join(service.state_dir, "vbd-%d-%d.json" % (domid, devid))) as f:
        return json.load(f)


def io(fe, q, *submits):
    """Each ``submit(q)`` in turn, run to completion; their completions."""
    out = []
    for submit in submits:
        tag = submit(q)
        out.append(fe.run(q, [tag])[tag])
    return out


def write_workload(fe, copy, seed, rounds=30):
    """Random writes and reads on every queue, each write also made to the raw
    ``copy``; reads must match it.  Ends with a flush."""
    rng = random.Random(seed)
    with open(copy, "r+b") as f:
        for i in range(rounds):
            q = fe.queues[i % len(fe.queues)]
            length = rng.choice([512, 4096, 65536 + 512, 1 << 20])
            offset = rng.randrange(0, SIZE - length, 512)
            if rng.random() < 0.6:
                data = os.urandom(length)
                f.seek(offset)
                f.write(data)
                (comp,) = io(fe, q, lambda q: q.submit_write(offset, data))
                assert comp.ok, (i, comp.status)
            else:
                f.flush()
                (comp,) = io(fe, q, lambda q: q.submit_read(offset, length))
                assert comp.ok, (i, comp.status)
                f.seek(offset)
                assert comp.data == f.read(length), i
    q = fe.queues[0]
    (comp,) = io(fe, q, lambda q: q.submit_flush())
    assert comp.ok


def make_base(tmp_path):
    """A raw base image full of random data, and the raw copy that tracks the guest's view."""
    base, copy = tmp_path / "base.raw", tmp_path / "copy.raw"
    data = random.Random(1).randbytes(SIZE)
    base.write_bytes(data)
    copy.write_bytes(data)
    return base, copy


FORMATS = [  # (libxl format, qemu-img format, over a backing file, qemu-img check works)
    ("qcow2", "qcow2", True, True),
    ("vhd", "vpc", False, False),
    ("vmdk", "vmdk", False, False),
    ("qed", "qed", True, True),
    ("qcow", "qcow", True, False),
]


@pytest.mark.parametrize("fmt,qfmt,backed,checkable", FORMATS, ids=[f[0] for f in FORMATS])
def test_image_written_through_the_frontend_matches_a_raw_copy(service, tmp_path, fmt, qfmt,
                                                              backed, checkable):
    base, copy = make_base(tmp_path)
    image = tmp_path / ("disk." + fmt)
    if backed:
        qemu_img("create", "-q", "-f", qfmt, "-b", base, "-F", "raw", image)
    else:
        qemu_img("convert", "-O", qfmt, base, image)
    fe, domid, devid = new_vbd(service, "%s:%s" % (fmt, image))
    try:
        conn = fe.connect(wants=WIDE)
        assert len(conn.queues) == 1  # one NBD connection per VBD
        assert fe.disk.sectors * 512 >= SIZE  # vpc rounds up to its geometry
        write_workload(fe, copy, seed=len(fmt))
        status = status_after_tick(service, domid, devid)
        assert status["storage"]["kind"] == "image" and status["storage"]["error"] is None
        assert status["negotiated"]["io"] == "nbd"
        assert status["counters"]["errors"] == 0
        fe.close()
    finally:
        fe.shutdown()
        remove_vbd(service, domid, devid, image)
    qemu_img("compare", "-f", qfmt, "-F", "raw", image, copy)
    if checkable:
        qemu_img("check", "-q", "-f", qfmt, image)
    if backed:  # the base was only read
        assert base.read_bytes() == random.Random(1).randbytes(SIZE)


def test_discard_punches_holes_in_a_qcow2_image(service, tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, SIZE)
    fe, domid, devid = new_vbd(service, "qcow2:%s" % image)
    try:
        fe.connect(wants=ONE_QUEUE)
        assert fe.read_back("feature-discard") == "1"
        q = fe.queues[0]
        data = os.urandom(4 << 20)
        assert all(comp.ok for comp in io(fe, q, lambda q: q.submit_write(1 << 20, data),
                                          lambda q: q.submit_flush()))
        allocated = _allocated(image)
        assert allocated >= 4 << 20
        assert all(comp.ok for comp in io(fe, q, lambda q: q.submit_discard(1 << 20, 4 << 20),
                                          lambda q: q.submit_flush()))
        (comp,) = io(fe, q, lambda q: q.submit_read(1 << 20, 4 << 20))
        assert comp.ok and comp.data == bytes(4 << 20)
        assert _allocated(image) <= allocated - (3 << 20)
        fe.close()
    finally:
        fe.shutdown()
        remove_vbd(service, domid, devid, image)
    qemu_img("check", "-q", "-f", "qcow2", image)


def _allocated(path):
    return os.stat(path).st_blocks * 512


def test_a_read_only_vbd_exports_read_only(service, tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, SIZE)
    before = image.read_bytes()
    fe, domid, devid = new_vbd(service, "qcow2:%s" % image, mode="r")
    try:
        fe.connect(wants=ONE_QUEUE)
        assert int(fe.read_back("info")) & c.VDISK_READONLY
        assert fe.read_back("feature-discard") == "0"
        q = fe.queues[0]
        read, write = io(fe, q, lambda q: q.submit_read(0, 4096),
                         lambda q: q.submit_write(0, b"x" * 4096))
        assert read.ok and read.data == bytes(4096)
        assert write.status == c.BLKIF_RSP_ERROR
        fe.close()
    finally:
        fe.shutdown()
    assert image.read_bytes() == before


# -- NBD servers -----------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nbdkit:
    """``nbdkit file`` on a loopback TCP port or a Unix socket, restartable."""

    def __init__(self, image, unix=None, readonly=False, delay=None):
        self.image, self.unix, self.readonly, self.delay = image, unix, readonly, delay
        self.port = None if unix else free_port()
        self.proc = None

    @property
    def uri(self):
        if self.unix:
            return "nbd+unix:///?socket=%s" % self.unix
        return "nbd://127.0.0.1:%d/" % self.port

    def start(self):
        where = ["-U", str(self.unix)] if self.unix else ["-i", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", *where,
                                      *(["-r"] if self.readonly else []),
                                      *(["--filter=delay"] if self.delay else []),
                                      "file", str(self.image),
                                      *(["delay-read=%s" % self.delay, "delay-write=%s"
                                         % self.delay] if self.delay else [])])
        deadline = time.monotonic() + 10
        while not self._listening():
            assert self.proc.poll() is None and time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.02)
        return self

    def _listening(self):
        family = socket.AF_UNIX if self.unix else socket.AF_INET
        address = str(self.unix) if self.unix else ("127.0.0.1", self.port)
        with socket.socket(family) as s:
            return s.connect_ex(address) == 0

    def kill(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def nbdkit_servers():
    servers = []
    yield servers
    for server in servers:
        if server.proc and server.proc.poll() is None:
            server.kill()


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_remote_nbd_export_written_through_the_frontend(service, tmp_path, nbdkit_servers,
                                                        transport):
    base, copy = make_base(tmp_path)
    server = Nbdkit(base, unix=tmp_path / "nbd.sock" if transport == "unix" else None)
    nbdkit_servers.append(server.start())
    fe, domid, devid = new_vbd(service, server.uri)
    try:
        fe.connect(wants=WIDE)
        assert fe.disk.sectors == SIZE // 512
        assert fe.read_back("feature-discard") == "1"
        write_workload(fe, copy, seed=7)
        fe.close()
    finally:
        fe.shutdown()
    assert base.read_bytes() == copy.read_bytes()


def test_a_read_only_export_is_a_read_only_disk(service, tmp_path, nbdkit_servers):
    base, _ = make_base(tmp_path)
    server = Nbdkit(base, readonly=True)
    nbdkit_servers.append(server.start())
    fe, domid, devid = new_vbd(service, "aio:" + server.uri)  # libxl's format=raw
    try:
        fe.connect(wants=ONE_QUEUE)
        assert int(fe.read_back("info")) & c.VDISK_READONLY
        write, = io(fe, fe.queues[0], lambda q: q.submit_write(0, b"x" * 512))
        assert write.status == c.BLKIF_RSP_ERROR
        fe.close()
    finally:
        fe.shutdown()


def test_many_commands_in_flight_and_a_barrier_waits_for_them(service, tmp_path,
                                                              nbdkit_servers):
    """Against a server that takes 0.2 s per command: 16 reads at once take
    about one delay, not sixteen; a barrier after 8 writes is answered only
    after them (BLKIF_OP_WRITE_BARRIER: nothing in flight, then flush)."""
    base, _ = make_base(tmp_path)
    server = Nbdkit(base, delay="200ms")
    nbdkit_servers.append(server.start())
    fe, domid, devid = new_vbd(service, server.uri)
    try:
        fe.connect(wants=ONE_QUEUE)
        q = fe.queues[0]
        started = time.monotonic()
        tags = [q.submit_read(i * 4096, 4096) for i in range(16)]
        done = fe.run(q, tags)
        assert time.monotonic() - started < 1.6  # one at a time: 3.2 s
        assert all(done[t].ok for t in tags)
        assert b"".join(done[t].data for t in tags) == base.read_bytes()[:16 * 4096]
        blocks = [os.urandom(4096) for _ in range(8)]
        writes = [q.submit_write(i * 4096, block) for i, block in enumerate(blocks)]
        barrier = q.submit_flush(c.BLKIF_OP_WRITE_BARRIER)
        done = fe.run(q, writes + [barrier])
        assert all(done[t].ok for t in writes + [barrier])
        assert list(done)[-1] == barrier  # done is in the order responses came
        assert base.read_bytes()[:8 * 4096] == b"".join(blocks)
        fe.close()
    finally:
        fe.shutdown()


# -- failures --------------------------------------------------------------

@pytest.fixture
def other(service, tmp_path):
    """A raw VBD on the C engine that must not notice the failures."""
    image = tmp_path / "other.img"
    image.write_bytes(bytes(SIZE))
    fe, domid, devid = new_vbd(service, str(image))
    fe.connect(wants=ONE_QUEUE)
    yield fe
    fe.shutdown()


def other_still_works(fe):
    data = os.urandom(8192)
    write, read = io(fe, fe.queues[0], lambda q: q.submit_write(4096, data),
                     lambda q: q.submit_read(4096, 8192))
    assert write.ok and read.ok and read.data == data


def wait_for(predicate, what, timeout=15):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.05)


def worker_status(service, domid, devid):
    return {(w["domid"], w["devid"]): w["status"]
            for w in service.status()["workers"]}.get((domid, devid))


@pytest.mark.parametrize("params,words", [
    ("vdi:{tmp}/raw.img", "unknown disk format 'vdi'"),
    ("nbds://storage1/x", "unsupported URI scheme 'nbds'"),
], ids=["unknown-format", "tls-uri"])
def test_params_we_cannot_serve_fail_only_that_vbd(service, tmp_path, other, params, words,
                                                   monkeypatch):
    monkeypatch.setattr(toolstack, "params_node", lambda target: target)  # as libxl: verbatim
    fe, domid, devid = new_vbd(service, params.format(tmp=tmp_path))
    try:
        wait_for(lambda: worker_status(service, domid, devid) == "failed", "the VBD failed")
        assert words in error_node(service, domid, devid)
        other_still_works(other)
    finally:
        fe.shutdown()


def test_a_missing_image_is_reported_and_served_once_it_appears(service, tmp_path, other):
    image = tmp_path / "late.qcow2"
    fe, domid, devid = new_vbd(service, "qcow2:%s" % image)
    try:
        wait_for(lambda: error_node(service, domid, devid), "the error node")
        assert "cannot open image %s: No such file" % image in error_node(service, domid, devid)
        assert worker_status(service, domid, devid) == "running"
        assert fe.read_back("state") == str(int(S.Initialising))  # nothing offered yet
        other_still_works(other)
        qemu_img("create", "-q", "-f", "qcow2", image, SIZE)
        fe.connect(wants=ONE_QUEUE)  # once it opened: InitWait, then as ever
        assert error_node(service, domid, devid) is None
        write, read = io(fe, fe.queues[0], lambda q: q.submit_write(0, b"late" * 128),
                         lambda q: q.submit_read(0, 512))
        assert write.ok and read.data == b"late" * 128
        fe.close()
    finally:
        fe.shutdown()
        remove_vbd(service, domid, devid, image)
    qemu_img("check", "-q", "-f", "qcow2", image)


def test_an_image_qemu_refuses_is_reported_with_its_reason(service, tmp_path, other):
    image = tmp_path / "raw.img"
    image.write_bytes(bytes(SIZE))
    fe, domid, devid = new_vbd(service, "qcow2:%s" % image)
    try:
        wait_for(lambda: error_node(service, domid, devid), "the error node")
        assert ("qemu-storage-daemon cannot serve %s: Image is not in qcow2 format" % image
                in error_node(service, domid, devid))
        assert "Image is not in qcow2 format" in stats_storage(service, domid, devid)["error"]
        table = subprocess.run([sys.executable, "-m", "blkif", "stats", "--state-dir",
                                service.state_dir], capture_output=True, text=True,
                               check=True).stdout.splitlines()
        row = next(i for i, line in enumerate(table)
                   if line.split()[:2] == [str(domid), str(devid)])
        assert table[row + 1].split(": ", 1) == [
            "       storage error", error_node(service, domid, devid).split(" ", 1)[1]]
        other_still_works(other)
        pid = service.worker_pid(domid, devid)
        service.dom0.rm(toolstack.backend_path(0, domid, devid))
        wait_for(lambda: not os.path.exists("/proc/%d" % pid), "its worker to stop")
    finally:
        fe.shutdown()


def test_an_nbd_server_not_there_yet(service, tmp_path, nbdkit_servers, other):
    base, _ = make_base(tmp_path)
    server = Nbdkit(base)
    fe, domid, devid = new_vbd(service, server.uri)
    try:
        wait_for(lambda: error_node(service, domid, devid), "the error node")
        assert ("cannot connect to %s: " % server.uri in error_node(service, domid, devid)
                and "Connection refused" in error_node(service, domid, devid))
        other_still_works(other)
        nbdkit_servers.append(server.start())
        fe.connect(wants=ONE_QUEUE)
        (read,) = io(fe, fe.queues[0], lambda q: q.submit_read(0, 4096))
        assert read.ok and read.data == base.read_bytes()[:4096]
        fe.close()
    finally:
        fe.shutdown()


def stats_storage(service, domid, devid):
    """This VBD's storage as ``blkif stats --json`` shows it."""
    out = subprocess.run([sys.executable, "-m", "blkif", "stats", "--state-dir",
                          service.state_dir, "--json"],
                         capture_output=True, text=True, check=True).stdout
    return {(v["domid"], v["devid"]): v["storage"]
            for v in json.loads(out)["vbds"]}[(domid, devid)]


def test_a_killed_storage_daemon_fails_io_then_comes_back(service, tmp_path, other):
    """The daemon dies and cannot start again while the image is away: I/O gets
    errors, the error node and ``blkif stats`` say why; once the image is back,
    the daemon is restarted, the connection too, and what was flushed is there."""
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, SIZE)
    fe, domid, devid = new_vbd(service, "qcow2:%s" % image)
    try:
        fe.connect(wants=ONE_QUEUE)
        q = fe.queues[0]
        data = os.urandom(65536)
        assert all(comp.ok for comp in io(fe, q, lambda q: q.submit_write(0, data),
                                          lambda q: q.submit_flush()))
        wait_for(lambda: vbd_status(service, domid, devid)["storage"].get("daemon_pid"),
                 "the daemon's pid in the status file")
        pid = vbd_status(service, domid, devid)["storage"]["daemon_pid"]
        os.rename(image, tmp_path / "away.qcow2")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: error_node(service, domid, devid), "the error node")
        (read,) = io(fe, q, lambda q: q.submit_read(0, 4096))
        assert read.status == c.BLKIF_RSP_ERROR
        other_still_works(other)
        # First the daemon's death, then why it cannot start again.
        wait_for(lambda: "cannot open image %s" % image in (
            stats_storage(service, domid, devid)["error"] or ""), "the error in blkif stats")
        assert "cannot open image %s" % image in error_node(service, domid, devid)
        assert fe.read_back("state") == str(int(S.Connected))
        os.rename(tmp_path / "away.qcow2", image)
        wait_for(lambda: not error_node(service, domid, devid), "recovery")
        read, = io(fe, q, lambda q: q.submit_read(0, 65536))
        assert read.ok and read.data == data
        assert vbd_status(service, domid, devid)["storage"]["daemon_starts"] >= 2
        fe.close()
    finally:
        fe.shutdown()
        remove_vbd(service, domid, devid, image)
    assert "qemu-storage-daemon for %s stopped (killed by SIGKILL)" % image in service.output()
    qemu_img("check", "-q", "-f", "qcow2", image)


def _dead(pid):
    """Gone, or a zombie left for init to reap."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_killed_worker_takes_its_daemon_and_the_next_one_carries_on(service, tmp_path):
    """An image VBD restarts live: the worker SIGKILLed with writes answered
    but not flushed, its daemon dies with it (--pdeathsig: QEMU writes out
    its caches on SIGTERM), the successor starts its own daemon and resumes
    the connection from the journal.  The frontend stays Connected, with
    nothing lost."""
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, SIZE)
    fe, domid, devid = new_vbd(service, "qcow2:%s" % image)
    try:
        fe.connect(wants=ONE_QUEUE)
        q = fe.queues[0]
        data = os.urandom(131072)
        assert all(comp.ok for comp in io(fe, q, lambda q: q.submit_write(0, data[:65536])))
        wait_for(lambda: vbd_status(service, domid, devid)["storage"].get("daemon_pid"),
                 "the daemon's pid in the status file")
        daemon = vbd_status(service, domid, devid)["storage"]["daemon_pid"]
        with fe.xs.watch(fe.back + "/state") as watch:
            assert watch.get(timeout=5) is not None  # a new watch fires once
            tag = q.submit_write(65536, data[65536:])
            q.kick()  # on the ring, maybe taken, as the worker dies
            os.kill(service.worker_pid(domid, devid), signal.SIGKILL)
            assert fe.run(q, [tag])[tag].ok
            wait_for(lambda: _dead(daemon), "the old daemon to go")
            (read,) = io(fe, q, lambda q: q.submit_read(0, 131072))
            assert read.ok and read.data == data
            assert watch.get(timeout=0.5) is None  # the state was never written again
        assert vbd_status(service, domid, devid)["storage"]["daemon_pid"] not in (None, daemon)
        fe.close()
    finally:
        fe.shutdown()
        remove_vbd(service, domid, devid, image)
    qemu_img("check", "-q", "-f", "qcow2", image)


def nbd_vbd(service, tmp_path, nbdkit_servers):
    """A VBD on a fresh nbdkit export: (the server, new_vbd's triple)."""
    base, _ = make_base(tmp_path)
    server = Nbdkit(base)
    nbdkit_servers.append(server.start())
    return server, new_vbd(service, server.uri)


def test_an_nbd_server_that_goes_away_and_comes_back(service, tmp_path, nbdkit_servers, other):
    server, (fe, domid, devid) = nbd_vbd(service, tmp_path, nbdkit_servers)
    try:
        fe.connect(wants=ONE_QUEUE)
        q = fe.queues[0]
        data = os.urandom(8192)
        assert all(comp.ok for comp in io(fe, q, lambda q: q.submit_write(512, data),
                                          lambda q: q.submit_flush()))
        server.kill()
        results = io(fe, q, *[lambda q: q.submit_read(0, 4096)] * 4)
        assert all(r.status == c.BLKIF_RSP_ERROR for r in results)
        wait_for(lambda: error_node(service, domid, devid), "the error node")
        assert "lost the connection to %s" % server.uri in error_node(service, domid, devid)
        other_still_works(other)
        server.start()
        wait_for(lambda: not error_node(service, domid, devid), "recovery")
        read, = io(fe, q, lambda q: q.submit_read(512, 8192))
        assert read.ok and read.data == data
        fe.close()
    finally:
        fe.shutdown()
    assert "storage is back" in service.output()


def test_a_bad_ring_on_an_nbd_vbd_leaves_its_connection_usable(service, tmp_path,
                                                                nbdkit_servers):
    """The worker closes its own NBD connection for the engine's as the rings
    are set up; a frontend whose ring cannot be mapped ends that before any
    engine holds one: the worker connects again and serves the next try."""
    _, (fe, domid, devid) = nbd_vbd(service, tmp_path, nbdkit_servers)
    try:
        worker = service.worker_pid(domid, devid)
        fe.setup(wants=ONE_QUEUE, extra={"ring-ref": "999999"})
        assert fe.backend_state([S.Connected, S.Closing]) == S.Closing
        fe.close()
        status_after_tick(service, domid, devid)  # it looked at the connection, no ring on it
        fe.xs.switch_state(fe.front + "/state", S.Initialising)
        assert fe.backend_state([S.InitWait]) == S.InitWait
        fe.connect(wants=ONE_QUEUE)
        q = fe.queues[0]
        data = os.urandom(8192)
        assert all(comp.ok for comp in io(fe, q, lambda q: q.submit_write(512, data)))
        read, = io(fe, q, lambda q: q.submit_read(512, 8192))
        assert read.ok and read.data == data
        assert service.worker_pid(domid, devid) == worker
        fe.close()
    finally:
        fe.shutdown()


def test_no_stale_storage_error_after_the_rings_go_while_the_server_is_away(
        service, tmp_path, nbdkit_servers):
    """The engine reported its connection lost; the frontend closes while its
    retries back off and the server is back by then: the worker connects
    again as the rings go, and the error goes with the outage."""
    server, (fe, domid, devid) = nbd_vbd(service, tmp_path, nbdkit_servers)
    try:
        fe.connect(wants=ONE_QUEUE)
        server.kill()
        wait_for(lambda: error_node(service, domid, devid), "the error node")
        time.sleep(3.5)  # the engine's next try is seconds away now
        server.start()
        fe.close()
        wait_for(lambda: not error_node(service, domid, devid), "the error node gone")
        wait_for(lambda: stats_storage(service, domid, devid)["error"] is None,
                 "no error in blkif stats")
        fe.xs.switch_state(fe.front + "/state", S.Initialising)
        assert fe.backend_state([S.InitWait]) == S.InitWait
        fe.connect(wants=ONE_QUEUE)
        read, = io(fe, fe.queues[0], lambda q: q.submit_read(0, 4096))
        assert read.ok
        fe.close()
    finally:
        fe.shutdown()
