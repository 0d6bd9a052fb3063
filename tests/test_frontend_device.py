"""BlockDevice, the frontend's xenbus side and block-device API.

Against a backend the test plays by hand in a real xenstored of ours (the
guest connected as domain 1 through its own socket): the nodes we write at
Initialised, argument checks against the published disk, the backend going
away and coming back, detach, timeouts.
"""
import concurrent.futures
import contextlib

import pytest

from blkif.abi import NATIVE, X86_32, constants as c
from blkif.errors import LocalProtocolError, RemoteProtocolError, UsageError
from blkif.frontend import BlockDevice, BlockIOError, FrontendOptions, NotConnected
from blkif.negotiate import BackendOffer, Connection, DiskInfo
from blkif.platform import open_platform
from blkif.platform.sim import SimHypervisor
from blkif.request import ResponseWriter
from blkif.ring import BackRing
from blkif.toolstack import backend_path, create, frontend_path
from xenstore import Xenstore, XenbusState as S, domain_socket_path
from xenstore_fixtures import xenstored  # noqa: F401

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
        dom0.introduce_domain(DOMID)
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

