"""FrontQueue against the backend's RingServer on the sim platform: random
transfers split into direct or indirect requests, verified against a model of
the disk and the image file itself."""
import os
import random

import pytest

from blkif.abi import X86_32, X86_64, constants as c
from blkif.backend.ring_service import RingServer
from blkif.backend.backing import Store
from blkif.errors import LocalProtocolError, RemoteProtocolError
from blkif.frontend.queue import FrontQueue
from blkif.platform import open_platform
from blkif.platform.sim import SimHypervisor
from blkif.request import Limits, RequestDecoder, ResponseWriter
from blkif.ring import BackRing

SIZE = 8 << 20


@pytest.fixture(scope="module")
def hypervisor():
    with SimHypervisor() as hv:
        yield hv


@pytest.fixture
def pair(hypervisor, tmp_path, request):
    abi, order, indirect, persistent = request.param
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SIZE))
    front = open_platform("sim", domid=1, path=hypervisor.path)
    back = open_platform("sim", domid=0, path=hypervisor.path)
    queue = FrontQueue(front, 0, abi, ring_page_order=order, indirect_segments=indirect,
                       pool_pages=600)
    ring_map = back.map_grants(1, queue.ring_refs)
    port = back.evtchn_bind_interdomain(1, queue.port.port)
    store = Store(str(image))
    server = RingServer(back, 1, ring_map.buffer, port, abi,
                        Limits(sectors=SIZE // 512, discard=True, max_indirect_segments=256),
                        store, persistent=persistent, label="q")
    yield queue, server, image
    server.close()
    ring_map.unmap()
    queue.close()
    store.close()
    for thing in (port, back, front):
        thing.close()


def drive(queue, server, tags):
    """Run both ends until every tag completes; returns {tag: Completion}."""
    done = {}
    queue.kick()
    for _ in range(10000):
        if server.port.wait(0):
            server.service()
        if queue.port.wait(0):
            for comp in queue.complete():
                done[comp.tag] = comp
            queue.kick()
        if set(tags) <= set(done):
            return done
        server.service()
        for comp in queue.complete():
            done[comp.tag] = comp
        queue.kick()
    raise AssertionError("transfers never completed: %s" % sorted(set(tags) - set(done)))


CONFIGS = [
    (X86_64, 0, 0, False), (X86_64, 2, 256, True), (X86_32, 1, 256, False),
    (X86_32, 0, 0, True), (X86_64, 4, 32, False),
]


@pytest.mark.parametrize("pair", CONFIGS, indirect=True,
                         ids=["%s-o%d-ind%d-p%d" % (a.tag, o, i, p) for a, o, i, p in CONFIGS])
def test_random_transfers_match_the_model_and_the_file(pair):
    queue, server, image = pair
    rng = random.Random(7)
    model = bytearray(SIZE)
    tags = {}
    for _ in range(40):
        length = rng.choice([512, 4096, 45056, 65536, 1 << 20]) + 512 * rng.randrange(3)
        offset = 512 * rng.randrange((SIZE - length) // 512)
        data = os.urandom(length)
        model[offset:offset + length] = data
        tags[queue.submit_write(offset, data)] = None
    done = drive(queue, server, list(tags))
    assert all(done[t].ok for t in tags)
    flush = queue.submit_flush()
    assert drive(queue, server, [flush])[flush].ok
    assert image.read_bytes() == bytes(model)
    reads = {}
    for _ in range(20):
        length = 512 * rng.randrange(1, 2048)
        offset = 512 * rng.randrange((SIZE - length) // 512)
        reads[queue.submit_read(offset, length)] = (offset, length)
    done = drive(queue, server, list(reads))
    for tag, (offset, length) in reads.items():
        assert done[tag].ok and done[tag].data == model[offset:offset + length]


@pytest.mark.parametrize("pair", [CONFIGS[1]], indirect=True)
def test_large_transfer_uses_indirect_requests(pair):
    queue, server, _ = pair
    tag = queue.submit_write(0, os.urandom(1 << 20))
    drive(queue, server, [tag])
    assert server.stats.indirect == 1 and server.stats.ops["write"] == 1


@pytest.mark.parametrize("pair", [CONFIGS[0]], indirect=True)
def test_without_indirect_large_transfers_are_split_into_44k_requests(pair):
    queue, server, _ = pair
    tag = queue.submit_read(0, 1 << 20)
    assert drive(queue, server, [tag])[tag].ok
    assert server.stats.ops["read"] == -(-(1 << 20) // 45056)


@pytest.mark.parametrize("pair", [CONFIGS[0]], indirect=True)
def test_discard_and_errors(pair):
    queue, server, image = pair
    w = queue.submit_write(0, b"\xff" * 8192)
    drive(queue, server, [w])
    d = queue.submit_discard(0, 4096)
    bad = queue.submit_read(SIZE - 512, 1024)  # runs off the end
    done = drive(queue, server, [d, bad])
    assert done[d].ok and done[bad].status == c.BLKIF_RSP_ERROR
    assert image.read_bytes()[:8192] == bytes(4096) + b"\xff" * 4096
    with pytest.raises(LocalProtocolError, match="whole sectors"):
        queue.submit_read(100, 512)


@pytest.mark.parametrize("pair", [CONFIGS[0]], indirect=True)
def test_a_discard_larger_than_the_page_pool_goes_out(pair):
    """A discard carries no data: it needs a slot, never pool pages."""
    queue, server, image = pair
    w = queue.submit_write(SIZE - (4 << 20), b"\xee" * (4 << 20))
    drive(queue, server, [w])
    d = queue.submit_discard(SIZE - (4 << 20), 4 << 20)  # 1024 pages; the pool has 600
    assert drive(queue, server, [d])[d].ok
    assert image.read_bytes()[SIZE - (4 << 20):] == bytes(4 << 20)


def test_indirect_descriptor_pages_are_granted_writable(hypervisor):
    """Linux blkback maps a persistent-grant connection's indirect pages
    read-write; a read-only grant of them fails every indirect request."""
    front = open_platform("sim", domid=1, path=hypervisor.path)
    queue = FrontQueue(front, 0, X86_64, indirect_segments=256, pool_pages=256)
    try:
        assert queue.ind_pool is not None and not queue.ind_pool.readonly
    finally:
        queue.close()
        front.close()


@pytest.mark.parametrize("indirect", [0, 32])
def test_a_response_with_another_operation_is_a_protocol_error(hypervisor, indirect):
    """Linux blkfront's check: the response echoes its request's operation
    (an indirect request's indirect_op); anything else fails the queue."""
    front = open_platform("sim", domid=1, path=hypervisor.path)
    back = open_platform("sim", domid=0, path=hypervisor.path)
    queue = FrontQueue(front, 0, X86_64, indirect_segments=indirect, pool_pages=64)
    ring_map = back.map_grants(1, queue.ring_refs)
    ring = BackRing(ring_map.buffer, X86_64)
    try:
        decoder = RequestDecoder(X86_64, Limits(sectors=SIZE // 512, max_indirect_segments=32))
        for _ in range(2):  # each one indirect request, or two direct ones
            queue.submit_read(0, 16 * 4096)
        queue.kick()
        first, second = decoder.take(ring), decoder.take(ring)
        assert second.operation == (c.BLKIF_OP_INDIRECT if indirect else c.BLKIF_OP_READ)
        writer = ResponseWriter(X86_64)
        writer.put(ring, first.id, first.kind, c.BLKIF_RSP_OKAY)  # right
        # wrong: 6 for an indirect READ, WRITE for a direct one
        writer.put(ring, second.id, second.operation if indirect else c.BLKIF_OP_WRITE,
                   c.BLKIF_RSP_OKAY)
        ring.push_responses()
        with pytest.raises(RemoteProtocolError, match="has operation"):
            queue.complete()
    finally:
        ring.release()
        ring_map.unmap()
        queue.close()
        back.close()
        front.close()
