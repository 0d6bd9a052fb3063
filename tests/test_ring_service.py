"""A ring's service over the sim platform, for every server: the C engine
(io_uring and its thread-pool fallback, each on its own thread; and
through libnbd, the image served by nbdkit), the Python reference, and the
NBD ring server (on its thread, the image served by nbdkit).  A frontend
domain grants a ring and data pages, the server maps them and does the I/O
against a real image file; every byte is checked against the file on disk,
every answer against what blkif.h asks."""
import importlib.util
import os
import re
import time

import pytest

from blkif.abi import X86_32, X86_64, constants as c
from blkif.backend.engine import RingEngine
from blkif.backend.ring_service import RingServer
from blkif.backend.backing import Store
from blkif.backend.nbd_ring import NbdRingServer
from blkif.errors import RemoteProtocolError
from blkif.platform import open_platform
from blkif.platform.sim import SimHypervisor
from blkif.request import Limits, RequestEncoder
from blkif.ring import FrontRing
from helpers import require, require_tool, start_nbdkit

SECTORS = 4096  # 2 MiB image
OKAY, ERROR, NOTSUP = c.BLKIF_RSP_OKAY, c.BLKIF_RSP_ERROR, c.BLKIF_RSP_EOPNOTSUPP
SERVERS = ["c-io_uring", "c-threads", "c-bounce", "c-nbd", "python", "nbd"]
# c-bounce: the engine's bounce buffer, 16 pages: room for a direct request, not a
# large indirect one (it then goes to the granted pages), and full at times.
BOUNCE_PAGES = 16


@pytest.fixture(scope="module")
def hypervisor():
    with SimHypervisor() as hv:
        yield hv


class Rig:
    """Frontend (domain 1) and backend (domain 0) of one ring, in one process."""

    def __init__(self, hv, image, abi=X86_64, persistent=False, limits=None, readonly=False,
                 server="c-io_uring", data_pages=64, nbdkit_args=(), nbd_plugin=None,
                 direct=False, **options):
        self.front = open_platform("sim", domid=1, path=hv.path)
        self.back = open_platform("sim", domid=0, path=hv.path)
        self.abi = abi
        self.ring_pages = self.front.grant_pages(0, 1)
        self.ring = FrontRing(self.ring_pages.buffer, abi)
        self.enc = RequestEncoder(abi)
        self.data = self.front.grant_pages(0, data_pages)
        self.fport = self.front.evtchn_alloc_unbound(0)
        self.bport = self.back.evtchn_bind_interdomain(1, self.fport.port)
        self.mapping = self.back.map_grants(1, self.ring_pages.refs)
        self.nbdkit = None
        self.storage_reports = []  # what an NBD server told on_storage
        if server in ("nbd", "c-nbd"):
            options = dict(options, on_storage=self.storage_reports.append)
            self.nbd_plugin = nbd_plugin or ("file", str(image))
            self.store = self._nbd_store(image, readonly, nbdkit_args)
        else:
            self.store = Store(str(image), writable=not readonly, direct=direct)
        self.limits = limits or Limits(sectors=SECTORS, discard=True, readonly=readonly,
                                       max_indirect_segments=256)
        self.threaded = server != "python"
        if server == "nbd":
            self.server = NbdRingServer(self.back, 1, self.mapping.buffer, self.bport, abi,
                                        self.limits, self.store, persistent=persistent,
                                        label="t", **options)
            self.failures = []
            self.server.start(self.failures.append)
        elif self.threaded:
            if server == "c-bounce":
                server, options = "c-io_uring", dict(options, bounce_pages=BOUNCE_PAGES)
            if server == "c-nbd":  # the engine holds the connection (Vbd does this)
                self.store.lend()  # its buffer: as small as may be, one request of 256 pages
                server, options = "c-io_uring", dict(options, bounce_pages=BOUNCE_PAGES)
            self.server = RingEngine(self.back, 1, self.mapping.buffer, self.bport, abi,
                                     self.limits, self.store, persistent=persistent,
                                     label="t", io=server[2:], **options)
            self.failures = []
            self.server.start(self.failures.append)
        else:
            self.server = RingServer(self.back, 1, self.mapping.buffer, self.bport, abi,
                                     self.limits, self.store, persistent=persistent,
                                     label="t", **options)

    def _nbd_store(self, image, readonly, nbdkit_args):
        """``image`` served by nbdkit (``nbdkit_args``: as for start_nbdkit; the
        plugin ``nbd_plugin``) on a Unix socket, and an NbdStore on it."""
        require_tool("nbdkit")
        require(importlib.util.find_spec("nbd") is not None, "python module nbd")
        from blkif.backend.nbd_store import NbdStore
        self.nbd_sock = image.parent / "nbd.sock"
        self.start_nbdkit(*nbdkit_args)
        return NbdStore("nbd+unix:///?socket=%s" % self.nbd_sock, writable=not readonly)

    def start_nbdkit(self, *filters):
        """nbdkit on the image, with ``filters`` (``--filter=NAME``, ``key=value``)."""
        options = [f for f in filters if f.startswith("--")]
        params = [f for f in filters if not f.startswith("--")]
        self.nbdkit = start_nbdkit(self.nbd_sock, *options, *self.nbd_plugin, *params)

    def stop_nbdkit(self):
        self.nbdkit.kill()
        self.nbdkit.wait()
        self.nbd_sock.unlink()

    @property
    def counters(self):
        return self.server.counters()

    def run(self, timeout=10):
        """Push requests, let the backend serve them, collect the responses
        (by id: the engine answers in the order the I/O completes)."""
        expected = (self.ring.req_prod_pvt - self.ring.rsp_cons) & 0xFFFFFFFF
        notify = self.ring.push_requests()
        if notify:
            self.fport.notify()
        out = []
        if not self.threaded:
            if notify:
                assert self.bport.wait(5)
            self.server.service()
        deadline = time.monotonic() + timeout
        while len(out) < expected:
            if not self.ring.pending_responses():
                assert time.monotonic() < deadline, "%d of %d answered" % (len(out), expected)
                self.fport.wait(0.05)
                continue
            out.append(self.enc.take_response(self.ring))
        assert not self.ring.pending_responses()
        return sorted(out)

    def close(self):
        self.server.close()
        self.ring.release()
        self.mapping.unmap()
        self.store.close()
        for thing in (self.bport, self.fport, self.data, self.ring_pages, self.back,
                      self.front):
            thing.close()
        if self.nbdkit is not None:
            self.nbdkit.terminate()
            self.nbdkit.wait()


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(SECTORS * 512))
    return path


@pytest.fixture(params=SERVERS)
def server(request):
    return request.param


@pytest.fixture(params=[X86_64, X86_32], ids=["x86_64", "x86_32"])
def rig(request, hypervisor, image, server):
    r = Rig(hypervisor, image, abi=request.param, server=server)
    yield r
    r.close()


def test_write_then_read_back_through_granted_pages(rig, image):
    payload = os.urandom(11 * 4096)
    rig.data.buffer[:len(payload)] = payload
    segs = [(rig.data.refs[i], 0, 7) for i in range(11)]
    rig.enc.rw(rig.ring, c.BLKIF_OP_WRITE, 1, 64, segs)
    assert rig.run() == [(1, c.BLKIF_OP_WRITE, OKAY)]
    assert image.read_bytes()[64 * 512:64 * 512 + len(payload)] == payload
    rig.data.buffer[:len(payload)] = bytes(len(payload))
    rig.enc.rw(rig.ring, c.BLKIF_OP_READ, 2, 64, [(rig.data.refs[11 + i], 0, 7)
                                                    for i in range(11)])
    assert rig.run() == [(2, c.BLKIF_OP_READ, OKAY)]
    assert rig.data.buffer[11 * 4096:22 * 4096] == payload


def test_partial_sectors_of_pages(rig, image):
    rig.enc.rw(rig.ring, c.BLKIF_OP_READ, 3, 10, [(rig.data.refs[0], 2, 4),
                                                   (rig.data.refs[1], 7, 7)])
    assert rig.run() == [(3, 0, OKAY)]
    disk = image.read_bytes()
    assert rig.data.buffer[1024:2560] == disk[10 * 512:13 * 512]
    assert rig.data.buffer[4096 + 3584:8192] == disk[13 * 512:14 * 512]


def test_indirect_request_of_256_segments(rig, image):
    desc = rig.front.grant_pages(0, 1, readonly=True)
    data = rig.front.grant_pages(0, 256)
    payload = os.urandom(256 * 4096)
    data.buffer[:] = payload
    rig.enc.write_descriptors(desc.buffer, [(ref, 0, 7) for ref in data.refs])
    rig.enc.indirect(rig.ring, c.BLKIF_OP_WRITE, 9, 8, 256, desc.refs)
    assert rig.run() == [(9, c.BLKIF_OP_WRITE, OKAY)]  # blkback answers with indirect_op
    assert image.read_bytes()[8 * 512:8 * 512 + len(payload)] == payload
    data.close()
    desc.close()


def test_bad_indirect_descriptor_is_answered_with_the_indirect_op(rig, image):
    desc = rig.front.grant_pages(0, 1, readonly=True)
    rig.enc.write_descriptors(desc.buffer, [(rig.data.refs[0], 0, 7), (rig.data.refs[1], 3, 9)])
    rig.enc.indirect(rig.ring, c.BLKIF_OP_READ, 10, 8, 2, desc.refs)
    assert rig.run() == [(10, c.BLKIF_OP_READ, ERROR)]  # blkfront checks the op
    desc.close()


def test_many_requests_one_batch_one_notify(rig, image):
    for i in range(32):
        rig.enc.rw(rig.ring, c.BLKIF_OP_READ, 100 + i, i * 8, [(rig.data.refs[i], 0, 7)])
    notifies = rig.counters.notifies
    rsps = rig.run()
    assert [r[0] for r in rsps] == list(range(100, 132))
    # One notify per batch: the engine pushes once per round of completions.
    assert rig.counters.notifies - notifies <= (1 if not rig.threaded else 8)
    assert rig.data.buffer[:32 * 4096] == image.read_bytes()[:32 * 4096]


def test_flush_barrier_and_discard(rig, image):
    rig.enc.rw(rig.ring, c.BLKIF_OP_FLUSH_DISKCACHE, 1, 0, [])
    rig.data.buffer[:4096] = b"b" * 4096
    rig.enc.rw(rig.ring, c.BLKIF_OP_WRITE_BARRIER, 2, 16, [(rig.data.refs[0], 0, 7)])
    rig.enc.discard(rig.ring, 3, 1024, 256)
    assert [r[2] for r in rig.run()] == [OKAY] * 3
    disk = image.read_bytes()
    assert disk[16 * 512:16 * 512 + 4096] == b"b" * 4096
    assert disk[1024 * 512:1280 * 512] == bytes(256 * 512)


def test_bad_requests_get_errors_and_the_ring_keeps_going(rig):
    rig.enc.rw(rig.ring, c.BLKIF_OP_READ, 1, SECTORS, [(rig.data.refs[0], 0, 7)])
    rig.enc.rw(rig.ring, c.BLKIF_OP_READ, 2, 0, [(999999, 0, 7)])  # no such grant
    rig.enc.rw(rig.ring, c.BLKIF_OP_RESERVED_1, 3, 0, [])
    rig.enc.rw(rig.ring, c.BLKIF_OP_READ, 4, 0, [(rig.data.refs[0], 0, 7)])
    assert rig.run() == [(1, 0, ERROR), (2, 0, ERROR), (3, c.BLKIF_OP_RESERVED_1, NOTSUP),
                         (4, 0, OKAY)]
    assert rig.counters.errors == 3


def test_secure_discard_not_offered_is_a_plain_discard(rig, image):
    """blkif.h: with discard-secure=0 the flag is ignored."""
    rig.enc.discard(rig.ring, 3, 0, 8, secure=True)
    assert rig.run() == [(3, c.BLKIF_OP_DISCARD, OKAY)]
    assert image.read_bytes()[:4096] == bytes(4096)


def test_bad_indirect_header_is_answered_with_the_indirect_op(rig):
    rig.enc.indirect(rig.ring, c.BLKIF_OP_WRITE, 11, 8, 257, [rig.data.refs[0]])
    rig.enc.indirect(rig.ring, c.BLKIF_OP_READ, 12, SECTORS, 1, [rig.data.refs[0]])
    assert rig.run() == [(11, c.BLKIF_OP_WRITE, ERROR), (12, c.BLKIF_OP_READ, ERROR)]


def test_read_into_a_read_only_grant_fails(hypervisor, image, server):
    rig = Rig(hypervisor, image, server=server)
    ro = rig.front.grant_pages(0, 1, readonly=True)
    rig.enc.rw(rig.ring, c.BLKIF_OP_READ, 5, 0, [(ro.refs[0], 0, 7)])
    assert rig.run() == [(5, 0, ERROR)]
    assert ro.buffer[:] == bytes(4096)
    ro.close()
    rig.close()


def test_write_to_read_only_vbd_is_refused_and_file_untouched(hypervisor, image, server):
    before = image.read_bytes()
    rig = Rig(hypervisor, image, readonly=True, server=server)
    rig.enc.rw(rig.ring, c.BLKIF_OP_WRITE, 6, 0, [(rig.data.refs[0], 0, 7)])
    rig.enc.discard(rig.ring, 7, 0, 8)
    assert [r[2] for r in rig.run()] == [ERROR, ERROR]
    assert image.read_bytes() == before
    rig.close()


def test_persistent_grants_are_mapped_once_and_reused(hypervisor, image, server):
    rig = Rig(hypervisor, image, persistent=True, server=server)
    for round_ in range(3):
        rig.data.buffer[:8192] = bytes([round_]) * 8192
        rig.enc.rw(rig.ring, c.BLKIF_OP_WRITE, round_, 0, [(rig.data.refs[0], 0, 7),
                                                            (rig.data.refs[1], 0, 7)])
        assert rig.run() == [(round_, 1, OKAY)]
        assert image.read_bytes()[:8192] == bytes([round_]) * 8192
    assert rig.counters.persistent_grants == 2
    assert rig.counters.mapped_grants == 0
    assert (rig.counters.grant_misses, rig.counters.grant_hits) == (2, 4)
    rig.close()


def test_latency_counts_io_done_within_its_submit(hypervisor, image, server):
    """Reads of cached pages complete inside io_uring's submit, in the round
    that took them: their latency is still the time they took, never 0."""
    rig = Rig(hypervisor, image, server=server)
    try:
        for i in range(20):
            rig.enc.rw(rig.ring, c.BLKIF_OP_READ, i, 0, [(rig.data.refs[0], 0, 7)])
            assert rig.run() == [(i, c.BLKIF_OP_READ, OKAY)]
        assert sum(rig.counters.latency) == 20
        assert rig.counters.latency_ns >= 20 * 1000  # each at least a microsecond
    finally:
        rig.close()


def test_ring_overrun_raises_for_the_device_to_shut_down(rig):
    rig.ring.sring.req_prod = rig.ring.size + 5
    if not rig.threaded:
        with pytest.raises(RemoteProtocolError, match="overruns"):
            rig.server.service()
        return
    rig.fport.notify()
    deadline = time.monotonic() + 5
    while not rig.failures and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rig.failures and "overruns" in rig.failures[0]


def _wait_for(what, check, timeout=10):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "no %s in %d s" % (what, timeout)
        time.sleep(0.02)


@pytest.mark.parametrize("server", ["c-nbd", "nbd"])
def test_a_lost_nbd_connection_fails_io_and_the_first_flush_after_it(hypervisor, image, server):
    """The server goes with a write no FLUSH covered: requests fail while it is
    away, the storage is reported lost and back, and the first FLUSH after it
    fails (the write may be lost), the next succeeds (NbdStore's rule, which
    nbd_link.c follows)."""
    rig = Rig(hypervisor, image, server=server)
    try:
        rig.data.buffer[:4096] = b"w" * 4096
        rig.enc.rw(rig.ring, c.BLKIF_OP_WRITE, 1, 0, [(rig.data.refs[0], 0, 7)])
        assert rig.run() == [(1, c.BLKIF_OP_WRITE, OKAY)]
        rig.stop_nbdkit()
        _wait_for("report", lambda: rig.storage_reports)  # noticed while idle
        assert "lost the connection to nbd+unix" in rig.storage_reports[0]
        rig.enc.rw(rig.ring, c.BLKIF_OP_READ, 2, 0, [(rig.data.refs[1], 0, 7)])
        rig.enc.rw(rig.ring, c.BLKIF_OP_FLUSH_DISKCACHE, 3, 0, [])
        assert rig.run() == [(2, c.BLKIF_OP_READ, ERROR), (3, c.BLKIF_OP_FLUSH_DISKCACHE, ERROR)]
        rig.start_nbdkit()
        _wait_for("recovery", lambda: rig.storage_reports[-1] is None)
        rig.enc.rw(rig.ring, c.BLKIF_OP_FLUSH_DISKCACHE, 4, 0, [])
        assert rig.run() == [(4, c.BLKIF_OP_FLUSH_DISKCACHE, ERROR)]
        rig.enc.rw(rig.ring, c.BLKIF_OP_FLUSH_DISKCACHE, 5, 0, [])
        rig.enc.rw(rig.ring, c.BLKIF_OP_READ, 6, 0, [(rig.data.refs[1], 0, 7)])
        assert rig.run() == [(5, c.BLKIF_OP_FLUSH_DISKCACHE, OKAY), (6, c.BLKIF_OP_READ, OKAY)]
        assert rig.data.buffer[4096:8192] == b"w" * 4096
        assert len(rig.storage_reports) == 2  # lost once, back once
    finally:
        rig.close()


@pytest.mark.parametrize("server", ["c-nbd", "nbd"])
def test_an_nbd_server_back_with_another_size_is_refused(hypervisor, image, server):
    rig = Rig(hypervisor, image, server=server)
    try:
        rig.stop_nbdkit()
        _wait_for("report", lambda: rig.storage_reports)
        os.truncate(image, SECTORS * 512 * 2)  # another disk, as far as we can tell
        rig.start_nbdkit()
        time.sleep(1.0)  # several tries (0.2 s, 0.4 s, ...), all refused
        rig.enc.rw(rig.ring, c.BLKIF_OP_READ, 1, 0, [(rig.data.refs[0], 0, 7)])
        assert rig.run() == [(1, c.BLKIF_OP_READ, ERROR)]
        assert rig.storage_reports[-1] is not None
        rig.stop_nbdkit()
        os.truncate(image, SECTORS * 512)
        rig.start_nbdkit()
        _wait_for("recovery", lambda: rig.storage_reports[-1] is None)
        rig.enc.rw(rig.ring, c.BLKIF_OP_READ, 2, 0, [(rig.data.refs[0], 0, 7)])
        assert rig.run() == [(2, c.BLKIF_OP_READ, OKAY)]
    finally:
        rig.close()


@pytest.mark.parametrize("server", ["c-nbd", "nbd"])
def test_an_nbd_transfer_is_one_command_while_the_bounce_buffer_is_full(hypervisor, image,
                                                                         tmp_path, server):
    """Four writes of 256 half pages (512 KiB each, in 2 KiB runs of granted
    memory) at once, to a server whose smallest block is 4 KiB: the engine's
    buffer holds one request of 256 pages, so the later writes wait for room
    and each still goes as one command (as 2 KiB runs libnbd would refuse)."""
    log = tmp_path / "nbdkit.log"
    rig = Rig(hypervisor, image, server=server, nbdkit_args=(
        "--filter=log", "--filter=blocksize-policy", "logfile=%s" % log,
        "blocksize-minimum=4096", "blocksize-error-policy=error"))
    try:
        data = rig.front.grant_pages(0, 512)
        data.buffer[:] = os.urandom(512 * 4096)
        descs = [rig.front.grant_pages(0, 1, readonly=True) for _ in range(4)]
        expected = bytearray()
        for k, desc in enumerate(descs):
            pages, half = data.refs[k // 2 * 256:(k // 2 + 1) * 256], k % 2
            rig.enc.write_descriptors(desc.buffer, [(ref, 4 * half, 4 * half + 3)
                                                    for ref in pages])
            rig.enc.indirect(rig.ring, c.BLKIF_OP_WRITE, k, k * 1024, 256, desc.refs)
            for i in range(256):
                page = (k // 2 * 256 + i) * 4096 + half * 2048
                expected += data.buffer[page:page + 2048]
        assert rig.run() == [(k, c.BLKIF_OP_WRITE, OKAY) for k in range(4)]
        assert image.read_bytes() == expected
        counts = re.findall(r" Write id=\d+ offset=\S+ count=(\S+)", log.read_text())
        assert counts == ["0x80000"] * 4, counts
        for thing in descs + [data]:
            thing.close()
    finally:
        rig.close()


@pytest.mark.parametrize("server", ["c-nbd", "nbd"])
def test_a_barrier_without_data_needs_no_server_without_a_write_cache(hypervisor, image,
                                                                      server):
    """A server with no write cache (no NBD flush) goes away: a BARRIER with no
    data has nothing to make durable and succeeds; a READ fails."""
    rig = Rig(hypervisor, image, server=server, nbd_plugin=(
        "eval", "get_size=echo %d" % (SECTORS * 512),
        "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
        "pwrite=cat >/dev/null", "can_write=exit 0", "can_flush=exit 3"))
    try:
        assert not rig.store.can_flush
        rig.stop_nbdkit()
        _wait_for("report", lambda: rig.storage_reports)
        rig.enc.rw(rig.ring, c.BLKIF_OP_WRITE_BARRIER, 1, 0, [])
        rig.enc.rw(rig.ring, c.BLKIF_OP_READ, 2, 0, [(rig.data.refs[0], 0, 7)])
        assert rig.run() == [(1, c.BLKIF_OP_WRITE_BARRIER, OKAY), (2, c.BLKIF_OP_READ, ERROR)]
    finally:
        rig.close()


def test_the_engine_answers_what_was_in_flight_when_it_connects_again(hypervisor, image):
    """A read waits at a slow server as the engine stops and its connection
    is made again (a resize under a stalled server): the read is answered,
    with an error, not forgotten with the old connection."""
    rig = Rig(hypervisor, image, server="c-nbd")
    try:
        rig.stop_nbdkit()
        _wait_for("report", lambda: rig.storage_reports)
        rig.start_nbdkit("--filter=delay", "delay-read=3")
        _wait_for("recovery", lambda: rig.storage_reports[-1] is None)
        rig.enc.rw(rig.ring, c.BLKIF_OP_READ, 1, 0, [(rig.data.refs[0], 0, 7)])
        rig.ring.push_requests()
        rig.fport.notify()
        _wait_for("the read in flight", lambda: rig.counters.in_flight == 1)
        rig.server.stop()
        rig.server.reopen_store()
        rig.server.start(rig.failures.append)
        started = time.monotonic()
        assert rig.run(timeout=2) == [(1, c.BLKIF_OP_READ, ERROR)]
        assert time.monotonic() - started < 2
    finally:
        rig.close()


def test_writes_no_flush_covered_are_reported_when_the_engine_closes(hypervisor, image,
                                                                      caplog):
    """The server went with writes answered and not flushed: the engine's
    close says they may be lost (there is no guest left to fail a FLUSH to),
    and the requests failed while it was away were not logged one by one."""
    rig = Rig(hypervisor, image, server="c-nbd")
    try:
        rig.data.buffer[:4096] = b"w" * 4096
        rig.enc.rw(rig.ring, c.BLKIF_OP_WRITE, 1, 0, [(rig.data.refs[0], 0, 7)])
        assert rig.run() == [(1, c.BLKIF_OP_WRITE, OKAY)]
        rig.stop_nbdkit()
        _wait_for("report", lambda: rig.storage_reports)
        for i in range(2, 6):
            rig.enc.rw(rig.ring, c.BLKIF_OP_READ, i, 0, [(rig.data.refs[1], 0, 7)])
            assert rig.run() == [(i, c.BLKIF_OP_READ, ERROR)]
            time.sleep(0.25)  # more than one of the engine's run slices
        rig.server.close()
    finally:
        rig.close()
    said = [r.getMessage() for r in caplog.records]
    assert any("writes answered since the last flush may not be on the export: " in m
               for m in said), said
    assert not any("answered with an error so far" in m for m in said), said
