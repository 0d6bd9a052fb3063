"""The frontend's queue in C (blkif/frontend/fastpath.py over csrc/front.c)
against the Python FrontQueue, its reference: the same transfers give the
same ring bytes, indirect pages, data pages and notifies; the same responses,
hostile ones included, give the same completions or the same refusal.  Then
run_pattern against the C engine on the sim, checked in the image file."""
import collections
import mmap
import os
import socket

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from blkif.abi import X86_32, X86_64, constants as c, ffi
from blkif.backend.backing import Store
from blkif.backend.engine import RingEngine
from blkif.errors import BlkifError, LocalProtocolError, RemoteProtocolError
from blkif.frontend.fastpath import FastQueue, run_pattern
from blkif.frontend.queue import FrontQueue
from blkif.platform import open_platform
from blkif.platform.sim import SimHypervisor
from blkif.request import Limits


# -- a platform of plain memory: two queues over it get the same grant refs --

class _Pages:
    def __init__(self, first_ref, n):
        self._map = mmap.mmap(-1, n * c.PAGE_SIZE)
        self.buffer = memoryview(self._map)
        self.refs = list(range(first_ref, first_ref + n))

    def close(self):
        self.buffer.release()
        self._map.close()


class _Port:
    transport = "socket"
    port = 7

    def __init__(self):
        self.mine, self.peer = socket.socketpair()
        self.mine.setblocking(False)
        self.peer.setblocking(False)

    def notify(self):
        self.mine.send(b"\x01")

    def fileno(self):
        return self.mine.fileno()

    def events(self):
        """Notifies sent so far (the backend's end reads them)."""
        try:
            return len(self.peer.recv(1 << 16))
        except BlockingIOError:
            return 0

    def close(self):
        self.mine.close()
        self.peer.close()


class _Memory:
    def __init__(self):
        self.next_ref = 8

    def grant_pages(self, domid, n):
        pages = _Pages(self.next_ref, n)
        self.next_ref += n
        return pages

    def evtchn_alloc_unbound(self, domid):
        return _Port()


def _twins(abi, order, indirect, pool_pages):
    """A Python queue and a C one, each on its own identical memory."""
    py = FrontQueue(_Memory(), 0, abi, order, indirect, pool_pages)
    cq = FrontQueue(_Memory(), 0, abi, order, indirect, pool_pages)
    return py, cq, FastQueue(cq)


def _memory(queue):
    return [bytes(queue.ring_grant.buffer), bytes(queue.pool.buffer),
            bytes(queue.ind_pool.buffer) if queue.ind_pool else b""]


def _outstanding(queue, abi):
    """(id, operation) of each request on ``queue``'s ring not yet answered,
    read from the slots as a backend would."""
    ring = queue.ring
    req = "struct blkif_%s_request *" % abi.tag
    ind = "struct blkif_%s_request_indirect *" % abi.tag
    out = []
    for idx in range(ring.sring.rsp_prod, ring.sring.req_prod):
        r = ffi.cast(req, ring.slot(idx))
        op = ffi.cast(ind, ring.slot(idx)).indirect_op if r.operation == c.BLKIF_OP_INDIRECT \
            else r.operation
        out.append((r.id, op))
    return out


def _respond(queue, abi, answers, prod=None):
    """Write responses (id, operation, status) at ``rsp_prod`` and publish."""
    ring = queue.ring
    rsp = "struct blkif_%s_response *" % abi.tag
    at = ring.sring.rsp_prod
    for i, (rid, op, status) in enumerate(answers):
        slot = ring.slot(at + i)
        ffi.memmove(slot, bytes(ring.response_size), ring.response_size)
        r = ffi.cast(rsp, slot)
        r.id, r.operation, r.status = rid, op, status
    ring.sring.rsp_prod = (at + len(answers) if prod is None else prod) & 0xFFFFFFFF


def _outcome(take):
    try:
        return take()
    except RemoteProtocolError:
        return "refused"


OPS = st.sampled_from(["read", "write", "flush", "discard"])
STEP = st.one_of(
    st.tuples(st.just("submit"), OPS, st.integers(0, 4000), st.integers(1, 8 * 600),
              st.binary(min_size=1, max_size=1)),
    st.tuples(st.just("answer"), st.randoms(use_true_random=False),
              st.sampled_from([c.BLKIF_RSP_OKAY, c.BLKIF_RSP_ERROR, c.BLKIF_RSP_EOPNOTSUPP])),
    st.tuples(st.just("hostile"), st.sampled_from(["unknown id", "wrong op", "overrun",
                                                    "huge id"])),
)
CONFIGS = [(X86_64, 0, 0), (X86_64, 1, 256), (X86_32, 0, 32), (X86_32, 2, 0),
           (X86_64, 0, 512)]


@pytest.mark.parametrize("abi,order,indirect", CONFIGS,
                         ids=["%s-o%d-ind%d" % (a.tag, o, i) for a, o, i in CONFIGS])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(STEP, max_size=40))
def test_c_queue_builds_and_takes_exactly_as_the_python_queue(abi, order, indirect, steps):
    py, cq, fast = _twins(abi, order, indirect, pool_pages=64)
    chunk = py.segments * c.PAGE_SIZE
    waiting = collections.deque()  # the C side's transfers not yet on the ring
    reads = {}  # tag -> the C side's buffer for a read

    def kick_both():
        py.kick()
        while waiting and fast.put(*waiting[0]):
            waiting.popleft()
        fast.push()
        assert _memory(py) == _memory(cq)
        assert py.port.events() == cq.port.events()

    try:
        for step in steps:
            if step[0] == "submit":
                _, op, sector, sectors, fill = step
                offset, length = sector * 512, min(sectors * 512, chunk)
                if op == "read":
                    tag = py.submit_read(offset, length)
                    reads[tag] = bytearray(length)
                    waiting.append((tag, c.BLKIF_OP_READ, offset, length, None, reads[tag]))
                elif op == "write":
                    data = fill * length
                    tag = py.submit_write(offset, data)
                    waiting.append((tag, c.BLKIF_OP_WRITE, offset, length, data))
                elif op == "flush":
                    tag = py.submit_flush()
                    waiting.append((tag, c.BLKIF_OP_FLUSH_DISKCACHE, 0, 0))
                else:
                    tag = py.submit_discard(offset, length)
                    waiting.append((tag, c.BLKIF_OP_DISCARD, offset, length))
                kick_both()
                continue
            outstanding = _outstanding(py, abi)
            assert outstanding == _outstanding(cq, abi)
            if step[0] == "answer":
                _, rng, status = step
                chosen = rng.sample(outstanding, rng.randint(0, len(outstanding)))
                answers = [(rid, op, status) for rid, op in chosen]
                data = rng.randbytes(len(py.pool.buffer))  # what the backend read
                py.pool.buffer[:] = data
                cq.pool.buffer[:] = data
                prod = None
            else:
                kind = step[1]
                free = [i for i in range(py.ring.size) if i not in dict(outstanding)]
                answers = ([(free[0], c.BLKIF_OP_READ, 0)] if kind == "unknown id" and free
                           else [(2 ** 63 + 5, c.BLKIF_OP_READ, 0)] if kind == "huge id"
                           else [(outstanding[0][0], outstanding[0][1] ^ 1, 0)]
                           if kind == "wrong op" and outstanding else [])
                prod = (py.ring.sring.rsp_prod + py.ring.size + 1
                        if kind == "overrun" else None)
            for queue in (py, cq):
                _respond(queue, abi, answers, prod)
            got_py = _outcome(lambda: [(comp.tag, comp.status, comp.data)
                                       for comp in py.complete()])
            got_c = _outcome(fast.take)
            if got_py == "refused" or got_c == "refused":
                assert got_py == got_c
                return  # the device is failed now: nothing more to compare
            assert [(tag, status) for tag, status, _ in got_py] == got_c
            for tag, status, data in got_py:
                if tag in reads:
                    assert data == bytes(reads.pop(tag))
            kick_both()
    finally:
        fast.close()
        py.close()
        cq.close()


def test_what_the_python_queue_would_refuse_never_reaches_the_ring():
    py, cq, fast = _twins(X86_64, 0, 0, pool_pages=64)
    with pytest.raises(LocalProtocolError, match="does not fit"):
        fast.put(1, c.BLKIF_OP_READ, 0, 12 * c.PAGE_SIZE)
    with pytest.raises(LocalProtocolError, match="does not fit"):
        fast.put(1, c.BLKIF_OP_READ, 100, 4096)
    for args, words in [((1, 9, 0, 4096), "operation 9 is not"),
                        ((1, c.BLKIF_OP_FLUSH_DISKCACHE, 0, 4096), "of 4096 bytes"),
                        ((1, c.BLKIF_OP_READ, 0, 0), "of 0 bytes"),
                        ((1, c.BLKIF_OP_WRITE, 0, 8192, b"short"), "data holds fewer"),
                        ((1, c.BLKIF_OP_WRITE, 0, 4096), "needs its data"),
                        ((1, c.BLKIF_OP_READ, 0, 4096, None, bytearray(512)), "dest holds")]:
        with pytest.raises(LocalProtocolError, match=words):
            fast.put(*args)
    assert fast.in_flight == 0 and cq.ring.sring.req_prod == 0
    assert fast.put(1, c.BLKIF_OP_READ, 0, 4096, None, bytearray(4096))
    with pytest.raises(LocalProtocolError, match="in flight"):
        run_pattern([fast], c.BLKIF_OP_READ, 4096, 1, False, 1 << 20, 0, 0.1, 1)
    fast.close()
    for q in (py, cq):
        q.close()


def test_a_busy_queue_cannot_be_taken_over():
    py = FrontQueue(_Memory(), 0, X86_64)
    py.submit_read(0, 4096)
    with pytest.raises(LocalProtocolError, match="in flight"):
        FastQueue(py)
    py.close()


# -- run_pattern against the C engine on the sim -----------------------------

SIZE = 4 << 20


@pytest.fixture
def served(tmp_path):
    """Two queues of a guest (domain 1) served by the C engine, on an image."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SIZE))
    store = Store(str(image))
    with SimHypervisor() as hv:
        front = open_platform("sim", domid=1, path=hv.path)
        back = open_platform("sim", domid=0, path=hv.path)
        queues, engines, maps, ports = [], [], [], []
        failures = []
        for _ in range(2):
            q = FrontQueue(front, 0, X86_64, 1, 256, pool_pages=1024)
            maps.append(back.map_grants(1, q.ring_refs))
            ports.append(back.evtchn_bind_interdomain(1, q.port.port))
            engine = RingEngine(back, 1, maps[-1].buffer, ports[-1], X86_64,
                                Limits(sectors=SIZE // 512, max_indirect_segments=256,
                                       flush=True), store, persistent=True, label="t")
            engine.start(failures.append)
            queues.append(q)
            engines.append(engine)
        yield queues, image, engines, failures
        for engine in engines:
            engine.close()
        for thing in maps:
            thing.unmap()
        for q in queues:
            q.close()
        for thing in ports + [back, front]:
            thing.close()
    store.close()


@pytest.mark.parametrize("block,depth", [(4096, 32), (1 << 20, 4), (12 * 4096, 3),
                                         (2 << 20, 2)])
def test_run_pattern_writes_reach_the_image_and_reads_come_back(served, block, depth):
    queues, image, engines, failures = served
    data = os.urandom(block)
    fast = [FastQueue(q) for q in queues]
    latencies, seconds = run_pattern(fast, c.BLKIF_OP_WRITE, block, depth, False, SIZE,
                                     seed=1, seconds=0.5, timeout=10, data=data)
    assert len(latencies) >= SIZE // block, "every block written at least once"
    assert 0 < max(latencies) <= seconds
    latencies, _ = run_pattern(fast, c.BLKIF_OP_READ, block, depth, True, SIZE,
                               seed=2, seconds=0.3, timeout=10)
    assert latencies and all(x > 0 for x in latencies)
    for f in fast:
        f.close()
    whole = image.read_bytes()
    for at in range(0, SIZE - block + 1, block):
        assert whole[at:at + block] == data, "block at %d" % at
    # The Python queues carry on where the C ones stopped.
    tag = queues[0].submit_read(block, block)
    queues[0].kick()
    for _ in range(1000):
        queues[0].port.wait(0.01)
        queues[0].port.clear()
        done = queues[0].complete()
        if done:
            break
    assert done[0].tag == tag and done[0].data == data
    assert failures == []


def test_run_pattern_reports_a_transfer_answered_with_an_error(served):
    queues, _, engines, _ = served
    fast = [FastQueue(q) for q in queues]
    # Past the end of the disk: the engine refuses it.
    with pytest.raises(BlkifError, match="answered with status -1"):
        run_pattern(fast, c.BLKIF_OP_READ, 4096, 1, False, SIZE + (1 << 20), seed=0,
                    seconds=5, timeout=5)


def test_run_pattern_says_so_when_the_backend_goes_away(served):
    queues, _, engines, _ = served
    fast = [FastQueue(q) for q in queues]
    engines[1].close()  # queue 1's backend stops serving: its transfers never finish
    with pytest.raises(BlkifError, match="no transfer finished"):
        run_pattern(fast, c.BLKIF_OP_READ, 4096, 8, True, SIZE, seed=0, seconds=0.2,
                    timeout=0.5)
