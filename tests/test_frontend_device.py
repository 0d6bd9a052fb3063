"""BlockDevice, the frontend's xenbus side and block-device API.

First against a backend the test plays by hand in a real xenstored of ours
(the guest connected as domain 1 through its own socket): the nodes we write
at Initialised, argument checks against the published disk, the backend going
away and coming back, detach, timeouts.  Then against ``blkif serve`` as a
subprocess on the sim platform with image files: random verified I/O over
many configurations, a killed worker, a stopped and restarted service.
"""
import concurrent.futures
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from blkif.abi import NATIVE, X86_32, constants as c
from blkif.errors import LocalProtocolError, RemoteProtocolError, UsageError
from blkif.frontend import BlockDevice, BlockIOError, FrontendOptions, NotConnected
from blkif.negotiate import BackendOffer, Connection, DiskInfo
from blkif.platform import open_platform
from blkif.platform.sim import SimHypervisor
from blkif.request import ResponseWriter
from blkif.ring import BackRing
from blkif.toolstack import backend_path, create, destroy, frontend_path, introduce
from xenstore import Xenstore, XenbusState as S, domain_socket_path
from xenstore_fixtures import ROOT, start_server, stop_server, xenstored  # noqa: F401

DOMID, DEVID = 1, 51712
FRONT, BACK = frontend_path(DOMID, DEVID), backend_path(0, DOMID, DEVID)
SECTORS = 2048  # 1 MiB


@pytest.fixture(scope="module")
def hypervisor():
    with SimHypervisor() as hv:
        yield hv


@pytest.fixture
def world(xenstored, hypervisor, tmp_path):  # noqa: F811
    """(dom0 xenstore, guest xenstore, guest platform) with VBD xvda created."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SECTORS * 512))
    with Xenstore.open(xenstored) as dom0:
        introduce(dom0, DOMID)
        create(dom0, DOMID, "xvda", str(image))
        with Xenstore.open(domain_socket_path(xenstored, DOMID)) as guest, \
                open_platform("sim", domid=DOMID, path=hypervisor.path) as platform:
            yield dom0, guest, platform


@contextlib.contextmanager
def background():
    """Run the guest's blocking calls on a thread while the test plays backend."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        yield pool


def offer_and_wait(dom0, offer=BackendOffer(max_queues=4)):
    """Backend: publish ``offer``, InitWait, wait for the frontend's rings."""
    for key, value in offer.nodes().items():
        dom0.write("%s/%s" % (BACK, key), value)
    dom0.switch_state(BACK + "/state", S.InitWait)
    dom0.wait_for_state(FRONT + "/state", S.Initialised, 5)
    return Connection.read(lambda k: dom0.read_str("%s/%s" % (FRONT, k), None), offer)


def connect(dom0, disk=DiskInfo(sectors=SECTORS)):
    for key, value in disk.nodes().items():
        dom0.write("%s/%s" % (BACK, key), value)
    dom0.switch_state(BACK + "/state", S.Connected)


@contextlib.contextmanager
def quick(dev):
    """Detach on exit without waiting long for a backend the test plays."""
    try:
        yield dev
    finally:
        dev.detach(timeout=0.2)


def front_nodes(dom0):
    return set(dom0.list(FRONT))


def attach_by_hand(world, options=FrontendOptions(timeout=5),
                   offer=BackendOffer(max_queues=4), disk=DiskInfo(sectors=SECTORS)):
    dom0, guest, platform = world
    with background() as pool:
        future = pool.submit(BlockDevice.attach, guest, platform, DOMID, "xvda", options)
        conn = offer_and_wait(dom0, offer)
        connect(dom0, disk)
        return future.result(5), conn


# -- options and arguments ----------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"max_ring_page_order": 5}, {"max_queues": 0}, {"max_queues": 17},
    {"max_indirect_segments": 4097}, {"pool_pages": 0}, {"timeout": 0},
])
def test_bad_options_are_usage_errors(kwargs):
    with pytest.raises(UsageError):
        FrontendOptions(**kwargs)


def test_options_none_take_the_offer_and_indirect_below_12_means_none():
    offer = BackendOffer(max_ring_page_order=3, max_queues=4, max_indirect_segments=64,
                         persistent=True)
    assert FrontendOptions().wants().choose(offer) == (3, 4, 64, True)
    capped = FrontendOptions(max_ring_page_order=1, max_queues=2, max_indirect_segments=11,
                             persistent=False)
    assert capped.wants().choose(offer) == (1, 2, 0, False)


def test_no_such_vbd_is_a_usage_error(world):
    _, guest, platform = world
    with pytest.raises(UsageError, match="no VBD 51728"):
        BlockDevice.attach(guest, platform, DOMID, "xvdb")


# -- negotiation ---------------------------------------------------------------

@pytest.mark.parametrize("options,offer,expect", [
    (FrontendOptions(timeout=5), BackendOffer(max_queues=4, max_indirect_segments=256),
     {"ring_page_order": 4, "queues": 4, "indirect_segments": 256, "persistent": True}),
    (FrontendOptions(timeout=5, max_ring_page_order=0, max_queues=1, persistent=False),
     BackendOffer(max_queues=4), {"ring_page_order": 0, "queues": 1, "persistent": False}),
    (FrontendOptions(timeout=5, max_ring_page_order=2, abi=X86_32),
     BackendOffer(max_ring_page_order=1, max_queues=2, max_indirect_segments=8,
                  persistent=False),
     {"ring_page_order": 1, "queues": 2, "indirect_segments": 0, "persistent": False,
      "protocol": c.XEN_IO_PROTO_ABI_X86_32}),
], ids=["all-offered", "single-page", "x86_32-capped"])
def test_initialised_nodes_are_what_blkfront_writes(world, options, offer, expect):
    dom0 = world[0]
    dev, conn = attach_by_hand(world, options, offer)
    with quick(dev):
        order, queues = expect["ring_page_order"], expect["queues"]
        assert conn.ring_page_order == order and len(conn.queues) == queues
        assert conn.protocol == options.abi.protocol
        assert conn.persistent == expect["persistent"]
        assert [q.event_channel for q in conn.queues] == [q.port.port for q in dev.queues]
        assert [list(q.ring_refs) for q in conn.queues] == [q.ring_refs for q in dev.queues]
        nodes = front_nodes(dom0)
        assert ("ring-page-order" in nodes) == bool(order)
        assert ("multi-queue-num-queues" in nodes) == (queues > 1)
        assert {n for n in nodes if n.startswith("queue-")} == (
            {"queue-%d" % i for i in range(queues)} if queues > 1 else set())
        assert dom0.read_state(FRONT + "/state") == S.Connected
        assert dev.negotiated == dict(dev.negotiated, **expect, ring_pages=1 << order,
                                      sectors=SECTORS, sector_size=512, readonly=False)


def test_persistent_asked_at_setup_agreed_at_connected(world):
    """Linux blkback writes feature-persistent only when it connects: we ask
    for persistent grants anyway and learn at Connected that they are on."""
    dom0, guest, platform = world
    with background() as pool:
        future = pool.submit(BlockDevice.attach, guest, platform, DOMID, "xvda",
                             FrontendOptions(timeout=5))
        offer_and_wait(dom0, BackendOffer(max_queues=4, persistent=False))
        assert dom0.read_str(FRONT + "/feature-persistent") == "1"
        dom0.write(BACK + "/feature-persistent", "1")
        connect(dom0)
        dev = future.result(5)
    with quick(dev):
        assert dev.negotiated["persistent"] is True


def test_ring_nodes_and_initialised_are_one_transaction(world):
    """A watcher never sees Initialised without every ring node beside it."""
    dom0, guest, platform = world
    seen = []
    with dom0.watch(FRONT) as watch, background() as pool:
        future = pool.submit(BlockDevice.attach, guest, platform, DOMID, "xvda",
                             FrontendOptions(timeout=5))
        offer_and_wait(dom0)
        while True:
            event = watch.get(5)
            if event.path.endswith("/state"):
                seen.append(dom0.read_state(FRONT + "/state"))
                if seen[-1] == S.Initialised:
                    break
        assert {"queue-3", "multi-queue-num-queues", "protocol"} <= front_nodes(dom0)
        connect(dom0)
        future.result(5).detach(timeout=0.2)


def test_argument_checks_come_before_the_ring(world):
    disk = DiskInfo(sectors=SECTORS, info=c.VDISK_READONLY)
    offer = BackendOffer(max_queues=1, flush=False, barrier=False, discard=False)
    dev, _ = attach_by_hand(world, offer=offer, disk=disk)
    with quick(dev):
        before = dev.queues[0].ring.req_prod_pvt
        cases = [
            (lambda: dev.read(-512, 512), ">= 0"),
            (lambda: dev.read(0, 0), "length > 0"),
            (lambda: dev.read(100, 512), "whole 512-byte sectors"),
            (lambda: dev.read(0, 1000), "whole 512-byte sectors"),
            (lambda: dev.read(0.5, 512), "must be an int"),
            (lambda: dev.read(SECTORS * 512 - 512, 1024), "past the end"),
            (lambda: dev.write(0, b"x" * 512), "read-only"),
            (lambda: dev.discard(0, 512), "read-only"),
            (lambda: dev.flush(), "neither feature-flush-cache nor feature-barrier"),
        ]
        for call, message in cases:
            with pytest.raises(LocalProtocolError, match=message):
                call()
        assert dev.queues[0].ring.req_prod_pvt == before and not dev.queues[0].pending


def test_discard_needs_the_feature_and_4k_sectors_need_4k_alignment(world):
    disk = DiskInfo(sectors=SECTORS, sector_size=4096)
    dev, _ = attach_by_hand(world, offer=BackendOffer(discard=False), disk=disk)
    with quick(dev):
        with pytest.raises(LocalProtocolError, match="feature-discard"):
            dev.discard(0, 4096)
        with pytest.raises(LocalProtocolError, match="whole 4096-byte sectors"):
            dev.read(512, 4096)


def test_flush_falls_back_to_an_empty_barrier(world):
    offer = BackendOffer(max_queues=1, flush=False, barrier=True)
    dev, _ = attach_by_hand(world, offer=offer)
    with quick(dev):
        dev.submit_flush()
        (shadow,) = [sh for sh in dev.queues[0].shadow if sh is not None]
        assert shadow.op == c.BLKIF_OP_WRITE_BARRIER and shadow.length == 0


def test_a_response_to_no_request_fails_the_device(world, hypervisor):
    dev, conn = attach_by_hand(world, offer=BackendOffer(max_queues=1))
    with quick(dev), open_platform("sim", domid=0, path=hypervisor.path) as back:
        mapping = back.map_grants(DOMID, conn.queues[0].ring_refs)
        port = back.evtchn_bind_interdomain(DOMID, conn.queues[0].event_channel)
        view = mapping.buffer
        ring = BackRing(view, NATIVE)
        handle = dev.submit_read(0, 512)
        assert ring.pending_requests() == 1
        ring.copy_request(bytearray(NATIVE.request_size))
        ResponseWriter(NATIVE).put(ring, 999, c.BLKIF_OP_READ, c.BLKIF_RSP_OKAY)
        ring.push_responses()
        port.notify()
        with pytest.raises(BlockIOError, match="device failed: queue 0: response for "
                                               "unknown request id 999"):
            handle.result()
        with pytest.raises(NotConnected, match="device failed") as info:
            dev.wait_connected(1)
        assert isinstance(info.value.__cause__, RemoteProtocolError)
        assert world[0].read_state(FRONT + "/state") == S.Closed
        ring.release()
        view.release()
        port.close()
        mapping.unmap()


# -- the backend goes away and comes back ----------------------------------------

def test_backend_closing_fails_pending_and_reconnects(world):
    dom0 = world[0]
    dev, _ = attach_by_hand(world, offer=BackendOffer(max_queues=4, max_ring_page_order=2))
    with quick(dev):
        pending = [dev.submit_read(i * 4096, 4096) for i in range(8)]
        assert [len(q.pending) for q in dev.queues] == [2, 2, 2, 2]  # spread over queues
        assert not dev.wait(pending, 0.05)  # nobody serves the rings
        dom0.switch_state(BACK + "/state", S.Closing)
        assert len(dev.wait(pending, 5)) == 8
        for handle in pending:
            with pytest.raises(BlockIOError, match="read of 4096 bytes at .* backend went away"):
                handle.result()
        assert dev.state == S.Closed and not dev.queues
        assert dom0.read_state(FRONT + "/state") == S.Closed
        dom0.switch_state(BACK + "/state", S.Closed)
        with background() as pool:
            future = pool.submit(dev.wait_connected, 5)
            dom0.wait_for_state(FRONT + "/state", S.Initialising, 5)
            conn = offer_and_wait(dom0, BackendOffer(max_queues=2, max_ring_page_order=0))
            connect(dom0)
            future.result(5)
        assert len(conn.queues) == 2 and conn.ring_page_order == 0
        nodes = front_nodes(dom0)
        assert not nodes & {"queue-2", "queue-3", "ring-page-order"}, "stale ring nodes"
        assert dom0.list(FRONT + "/queue-0") == ["ring-ref", "event-channel"]
        assert dev.negotiated["queues"] == 2 and dev.connected


def test_without_reconnect_a_closed_device_stays_closed(world):
    dom0 = world[0]
    dev, _ = attach_by_hand(world, FrontendOptions(timeout=5, reconnect=False))
    with quick(dev):
        pending = dev.submit_read(0, 512)
        dom0.switch_state(BACK + "/state", S.Closed)
        with pytest.raises(BlockIOError, match="backend went away"):
            pending.result()
        with pytest.raises(NotConnected, match="reconnect is off"):
            dev.wait_connected(5)
        with pytest.raises(BlockIOError, match="reconnect is off"):
            dev.read(0, 512)
        assert dom0.read_state(FRONT + "/state") == S.Closed


def test_backend_refusing_every_setup_puts_the_device_in_error(world):
    dom0 = world[0]
    dev, _ = attach_by_hand(world)
    with quick(dev):
        pending = dev.submit_read(0, 512)
        dom0.switch_state(BACK + "/state", S.Closed)
        assert dev.wait([pending], 5) and pending.error
        with background() as pool:
            future = pool.submit(dev.wait_connected, 10)
            for _ in range(3):
                dom0.wait_for_state(FRONT + "/state", S.Initialising, 5)
                offer_and_wait(dom0)
                dom0.switch_state(BACK + "/state", S.Closed)
            with pytest.raises(NotConnected, match="closed 3 setups in a row"):
                future.result(5)
        with pytest.raises(BlockIOError, match="device failed"):
            dev.read(0, 512)


def test_bad_offer_fails_the_attach_cleanly(world):
    dom0, guest, platform = world
    dom0.write(BACK + "/max-ring-page-order", "9")
    dom0.switch_state(BACK + "/state", S.InitWait)
    with pytest.raises(NotConnected, match="max-ring-page-order") as info:
        BlockDevice.attach(guest, platform, DOMID, "xvda", FrontendOptions(timeout=5))
    assert isinstance(info.value.__cause__, RemoteProtocolError)
    assert dom0.read_state(FRONT + "/state") == S.Closed


def test_attach_timeout_names_both_states_and_leaves_nothing(world):
    dom0, guest, platform = world
    with pytest.raises(NotConnected, match=r"within 0.3s \(frontend Initialising, "
                                           r"backend Initialising at /local/domain/0"):
        BlockDevice.attach(guest, platform, DOMID, "xvda", FrontendOptions(timeout=0.3))
    assert dom0.read_state(FRONT + "/state") == S.Closed


def test_detach_handshake(world):
    dom0 = world[0]
    dev, _ = attach_by_hand(world)
    with background() as pool:
        future = pool.submit(dev.detach, 5)
        dom0.wait_for_state(FRONT + "/state", S.Closing, 5)
        assert dev.queues, "rings released before the backend closed"
        dom0.switch_state(BACK + "/state", S.Closing)
        dom0.wait_for_state(FRONT + "/state", S.Closed, 5)
        assert dev._retired, "rings released while the backend may map them"
        dom0.switch_state(BACK + "/state", S.Closed)
        future.result(5)
    assert not dev.queues and not dev._retired and dev._closed
    dev.detach()  # idempotent
    with pytest.raises(LocalProtocolError, match="detached"):
        dev.read(0, 512)


def test_reattach_after_detach_starts_over(world):
    dom0, guest, platform = world
    dev, _ = attach_by_hand(world)
    dev.detach(timeout=0.2)  # the test's backend does not answer: released anyway
    assert dom0.read_state(FRONT + "/state") == S.Closed
    dom0.switch_state(BACK + "/state", S.Closed)
    with background() as pool:
        future = pool.submit(BlockDevice.attach, guest, platform, DOMID, DEVID,
                             FrontendOptions(timeout=5))
        dom0.wait_for_state(FRONT + "/state", S.Initialising, 5)
        offer_and_wait(dom0)
        connect(dom0)
        future.result(5).detach(timeout=0.2)


def test_native_protocol_is_written(world):
    dev, conn = attach_by_hand(world)
    with quick(dev):
        assert conn.protocol == NATIVE.protocol


# -- against the backend service: `blkif serve` as a subprocess ------------------

IMAGE_SIZE = 4 << 20
LENGTHS = [512, 1536, 4096, 8192, 45056, 45568, 65536, 262144, 1 << 20]


class Served:
    """Our xenstored, the sim hypervisor and ``blkif serve``, each a process."""

    def __init__(self, tmp, hv_path, xs_path):
        self.tmp, self.hv_path, self.xs_path = tmp, hv_path, xs_path
        self.state_dir = str(tmp / "state")
        self.proc = None
        self.log = None
        self.options = ()
        self.vdevs = iter("xvd" + chr(c) for c in range(ord("a"), ord("z") + 1))

    def start(self, *options):
        self.options = options
        self.log = open(self.tmp / "serve.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "blkif", "-vv", "serve", "--platform", "sim",
             "--sim-path", self.hv_path, "--xenstore", self.xs_path,
             "--state-dir", self.state_dir, "--grace", "5", *options],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        self._service_json(lambda st: st.get("pid") == self.proc.pid)  # handlers are in

    def _service_json(self, ready, timeout=10):
        """service.json once ``ready(it)``; the service rewrites it every round."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "blkif serve exited"
            try:
                with open(os.path.join(self.state_dir, "service.json")) as f:
                    status = json.load(f)
                if ready(status):
                    return status
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise AssertionError("service.json never ready")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()
        return self.proc.returncode

    def restart(self, *options):
        self.stop()
        self.start(*options)

    def worker_pid(self, devid):
        """The pid of the running worker serving (DOMID, devid)."""
        def running(status):
            return [w["pid"] for w in status.get("workers", [])
                    if (w["domid"], w["devid"]) == (DOMID, devid) and w.get("pid")
                    and w["status"] == "running"]
        return running(self._service_json(running))[0]

    def vbd_status(self, devid, ready=lambda status: True, timeout=3):
        """The worker's status file once ``ready(status)`` (it is rewritten each second)."""
        path = os.path.join(self.state_dir, "vbd-%d-%d.json" % (DOMID, devid))
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(path) as f:
                    status = json.load(f)
                if ready(status):
                    return status
            except (OSError, ValueError):
                status = None
            if time.monotonic() > deadline:
                raise AssertionError("worker status never ready: %r" % (status,))
            time.sleep(0.05)


@pytest.fixture(scope="module")
def served(hypervisor, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("served")
    xs_path = str(tmp / "xenstored.sock")
    xs_proc = start_server(xs_path)
    with Xenstore.open(xs_path) as dom0:
        introduce(dom0, DOMID)
    service = Served(tmp, hypervisor.path, xs_path)
    service.start("--max-queues", "4")
    yield service
    code = service.stop()
    log = (tmp / "serve.log").read_text()
    assert code == 0, log
    assert "Traceback" not in log, log
    code, err = stop_server(xs_proc)
    assert code == 0, err


@contextlib.contextmanager
def new_vbd(served, hypervisor, tmp_path, mode="w"):
    """(image, devid, guest xenstore, guest platform) of a fresh VBD."""
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(IMAGE_SIZE))
    vdev = next(served.vdevs)
    with Xenstore.open(served.xs_path) as dom0:
        devid = create(dom0, DOMID, vdev, str(image), mode)
        with Xenstore.open(domain_socket_path(served.xs_path, DOMID)) as guest, \
                open_platform("sim", domid=DOMID, path=hypervisor.path) as platform:
            yield image, devid, guest, platform
        destroy(dom0, DOMID, vdev)


@pytest.fixture
def vbd(served, hypervisor, tmp_path):
    with new_vbd(served, hypervisor, tmp_path) as made:
        yield made


def pick_ranges(rng, size, count):
    """``count`` random sector ranges of mixed sizes that do not overlap."""
    taken = []
    while len(taken) < count:
        length = rng.choice(LENGTHS)
        offset = 512 * rng.randrange((size - length) // 512 + 1)
        if all(offset + length <= o or o + n <= offset for o, n in taken):
            taken.append((offset, length))
    return taken


def exercise(dev, image, rng, rounds=3, batch=24):
    """Random reads, writes and discards, many in flight, verified against a
    model, against what the device reads back and against the image file."""
    model = bytearray(image.read_bytes())
    discard = dev.negotiated["discard"]
    for _ in range(rounds):
        reads = []
        for offset, length in pick_ranges(rng, dev.size, batch):
            kind = rng.choice(["write", "write", "read", "discard" if discard else "read"])
            if kind == "write":
                data = rng.randbytes(length)
                model[offset:offset + length] = data
                handle = dev.submit_write(offset, data)
            elif kind == "discard":
                model[offset:offset + length] = bytes(length)
                handle = dev.submit_discard(offset, length)
            else:
                handle = dev.submit_read(offset, length)
                reads.append((handle, offset, length))
        assert not [h for h in dev.wait(timeout=10) if h.error], "a transfer failed"
        for handle, offset, length in reads:
            assert handle.result() == model[offset:offset + length]
        dev.flush()
        assert image.read_bytes() == model
    offset, length = pick_ranges(rng, dev.size, 1)[0]
    assert dev.read(offset, length) == model[offset:offset + length]
    return model


CONFIGS = {
    "q1-o0-direct": FrontendOptions(max_queues=1, max_ring_page_order=0,
                                    max_indirect_segments=0, timeout=10),
    "q2-o1-ind32-nopersist": FrontendOptions(max_queues=2, max_ring_page_order=1,
                                             max_indirect_segments=32, persistent=False,
                                             timeout=10),
    "q3-o2-ind256": FrontendOptions(max_queues=3, max_ring_page_order=2, timeout=10),
    "q4-o4-x86_32": FrontendOptions(max_queues=4, abi=X86_32, timeout=10),
    "q4-o3-x86_32-direct-nopersist": FrontendOptions(
        max_ring_page_order=3, max_indirect_segments=0, persistent=False, abi=X86_32,
        timeout=10),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_random_io_against_the_service(served, vbd, name):
    image, devid, guest, platform = vbd
    options = CONFIGS[name]
    with BlockDevice.attach(guest, platform, DOMID, devid, options) as dev:
        got = dev.negotiated
        wants = options.wants()
        assert got["queues"] == min(wants.max_queues, 4) == len(dev.queues)
        assert got["ring_page_order"] == wants.max_ring_page_order
        indirect = min(wants.max_indirect_segments, 256)  # the service offers 256
        assert got["indirect_segments"] == (0 if indirect <= 11 else indirect)
        assert got["persistent"] == options.persistent
        assert got["protocol"] == options.abi.protocol
        assert got["sectors"] * 512 == IMAGE_SIZE and not got["readonly"]
        exercise(dev, image, random.Random(name))
        back = served.vbd_status(devid, lambda st: st["negotiated"])["negotiated"]
        assert (back["queues"], back["ring_page_order"], back["persistent"],
                back["protocol"]) == (got["queues"], got["ring_page_order"],
                                      got["persistent"], got["protocol"])
    assert_detached(guest, platform, devid)


def assert_detached(guest, platform, devid):
    """Both ends Closed and nothing of ours granted or bound any more."""
    assert guest.read_state(frontend_path(DOMID, devid) + "/state") == S.Closed
    assert guest.read_state(backend_path(0, DOMID, devid) + "/state") == S.Closed
    assert not platform._objects, "grants or ports left behind"


def write_some(dev, rng, count=16):
    """Submit ``count`` writes at random places: [(handle, offset, data)]."""
    out = []
    for offset, length in pick_ranges(rng, dev.size, count):
        data = rng.randbytes(length)
        out.append((dev.submit_write(offset, data), offset, data))
    return out


def stop_process(pid, timeout=5):
    """SIGSTOP ``pid`` and wait until every one of its threads has stopped
    (kill() returns before the group stop reaches a thread busy in a ring)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for tid in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        if all(state in "tT" for state in states):
            return
        time.sleep(0.01)
    raise AssertionError("process %d did not stop" % pid)


def test_a_killed_worker_is_replaced_and_what_was_pending_completes(served, vbd):
    """Live restart under our device: what a stopped, then killed, worker
    left on the rings is answered by its successor; nothing fails."""
    image, devid, guest, platform = vbd
    rng = random.Random("kill")
    with BlockDevice.attach(guest, platform, DOMID, devid, FrontendOptions(timeout=10)) as dev:
        model = exercise(dev, image, rng, rounds=1)
        pid = served.worker_pid(devid)
        stop_process(pid)  # requests stay on the rings, unserved
        writes = write_some(dev, rng)
        pending = [h for h, _, _ in writes]
        pending += [dev.submit_read(o, n) for o, n in pick_ranges(rng, dev.size, 8)]
        assert not dev.wait(pending, 0.1)
        os.kill(pid, signal.SIGKILL)
        assert len(dev.wait(pending, 15)) == len(pending)
        for handle in pending:
            handle.result()  # no error
        for _, offset, data in writes:
            model[offset:offset + len(data)] = data
        dev.flush()
        assert image.read_bytes() == model
        deadline = time.monotonic() + 10
        while served.worker_pid(devid) == pid:  # service.json catches up
            assert time.monotonic() < deadline, "no successor"
            time.sleep(0.05)
        assert dev.read(0, IMAGE_SIZE) == model
        exercise(dev, image, rng, rounds=1)
    assert_detached(guest, platform, devid)


def test_service_stop_and_restart(served, vbd):
    image, devid, guest, platform = vbd
    rng = random.Random("restart")
    with BlockDevice.attach(guest, platform, DOMID, devid, FrontendOptions(timeout=2)) as dev:
        model = exercise(dev, image, rng, rounds=1)
        in_flight = write_some(dev, rng)
        served.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while served.proc.poll() is None and time.monotonic() < deadline:
            dev.poll(0.1)  # the worker serves what is queued, then waits for our Closed
        assert served.stop() == 0
        dev.wait([h for h, _, _ in in_flight], 1)
        for handle, offset, data in in_flight:  # served before the close, or failed
            assert handle.done
            if handle.error is None:
                model[offset:offset + len(data)] = data
            else:
                assert isinstance(handle.error, BlockIOError)
        with pytest.raises(BlockIOError, match="not connected within 2.0s"):
            dev.read(0, 512)
        assert guest.read_state(frontend_path(DOMID, devid) + "/state") == S.Initialising
        assert image.read_bytes() == model  # the worker flushed before it closed
        served.start(*served.options)
        assert dev.read(0, IMAGE_SIZE) == model  # waits for the reconnection
        exercise(dev, image, rng, rounds=1)
    assert_detached(guest, platform, devid)


def test_read_only_vbd(served, hypervisor, tmp_path):
    with new_vbd(served, hypervisor, tmp_path, mode="r") as (image, devid, guest, platform):
        with BlockDevice.attach(guest, platform, DOMID, devid,
                                FrontendOptions(timeout=10)) as dev:
            assert dev.negotiated["readonly"]
            assert dev.read(4096, 65536) == image.read_bytes()[4096:4096 + 65536]
            with pytest.raises(LocalProtocolError, match="read-only"):
                dev.write(0, bytes(512))




def test_the_service_offer_caps_what_we_use(served, hypervisor, tmp_path):
    limits = ("--max-queues", "1", "--max-ring-page-order", "0",
              "--max-indirect-segments", "0", "--no-persistent")
    defaults = served.options
    served.restart(*limits)
    try:
        with new_vbd(served, hypervisor, tmp_path) as (image, devid, guest, platform):
            with BlockDevice.attach(guest, platform, DOMID, devid,
                                    FrontendOptions(timeout=10)) as dev:
                got = dev.negotiated
                assert (got["queues"], got["ring_page_order"], got["indirect_segments"],
                        got["persistent"]) == (1, 0, 0, False)
                exercise(dev, image, random.Random("capped"), rounds=1)
            assert_detached(guest, platform, devid)
    finally:
        served.restart(*defaults)


def test_plugged_submits_go_out_together(served, vbd):
    image, devid, guest, platform = vbd
    with BlockDevice.attach(guest, platform, DOMID, devid,
                            FrontendOptions(max_queues=1, timeout=10)) as dev:
        queue = dev.queues[0]
        produced = queue.ring.req_prod_pvt
        with dev.plugged():
            handles = [dev.submit_write(i * 8192, bytes([i]) * 8192) for i in range(16)]
            assert queue.ring.req_prod_pvt == produced  # nothing on the ring yet
            assert len(queue.waiting) == 16
        assert queue.ring.req_prod_pvt == produced + 16  # all of them at once
        dev.wait(handles, 10)
        assert all(h.done and h.error is None for h in handles)
        dev.flush()
    assert image.read_bytes()[:16 * 8192] == b"".join(bytes([i]) * 8192 for i in range(16))


def test_indirect_segments_are_capped_at_the_page_pool():
    """An offer of 4096 indirect segments on 4 queues must not make each queue
    grant 4096 pages (the sim's grant table filled up: conformance fe-xenbus-8)."""
    offer = BackendOffer(max_queues=4, max_indirect_segments=4096)
    assert FrontendOptions(max_queues=4).wants().choose(offer)[2] == 512
    assert FrontendOptions(pool_pages=64).wants().choose(offer)[2] == 64
    assert FrontendOptions(pool_pages=8).wants().choose(offer)[2] == 0  # direct is as good
