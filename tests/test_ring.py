"""blkif.ring against ring.h itself, and across two processes.

The reference is ring.h's own macros compiled with cffi.  Hypothesis drives
both with the same operations from the same start index (often just below
2**32, to cross the wrap) and compares every index, header field, count and
notify decision after each step.
"""
import mmap
import os
import select
import struct

import importlib.util

import cffi
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blkif.abi import X86_64, ffi
from blkif.errors import LocalProtocolError, RemoteProtocolError
from blkif.ring import MASK32, BackRing, FrontRing, ring_slots
from helpers import require_header

SLOT = X86_64.slot_size  # 112 bytes

REFERENCE = r"""
#include <stdint.h>
#include <string.h>
#define mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define wmb() __atomic_thread_fence(__ATOMIC_RELEASE)
#include <xen/xen.h>
#include <xen/io/ring.h>
#include <xen/io/blkif.h>

void ref_init(void *page, unsigned nbytes, struct blkif_front_ring *fr,
              struct blkif_back_ring *br, uint32_t start) {
    struct blkif_sring *s = page;
    SHARED_RING_INIT(s);
    s->req_prod = s->rsp_prod = start;
    s->req_event = s->rsp_event = start + 1;
    FRONT_RING_ATTACH(fr, s, start, nbytes);
    BACK_RING_ATTACH(br, s, s->rsp_prod, nbytes);
}
unsigned ref_size(struct blkif_front_ring *fr) { return RING_SIZE(fr); }
unsigned ref_free(struct blkif_front_ring *fr) { return RING_FREE_REQUESTS(fr); }
void ref_put_request(struct blkif_front_ring *fr, uint64_t id) {
    RING_GET_REQUEST(fr, fr->req_prod_pvt)->id = id;
    fr->req_prod_pvt++;
}
int ref_push_requests(struct blkif_front_ring *fr) {
    int notify; RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(fr, notify); return notify;
}
long ref_pending_requests(struct blkif_back_ring *br) {
    RING_IDX rp = br->sring->req_prod;
    if (RING_REQUEST_PROD_OVERFLOW(br, rp)) return -1;
    return XEN_RING_NR_UNCONSUMED_REQUESTS(br);
}
uint64_t ref_take_request(struct blkif_back_ring *br) {
    struct blkif_request req;
    RING_COPY_REQUEST(br, br->req_cons, &req);
    br->req_cons++;
    return req.id;
}
void ref_put_response(struct blkif_back_ring *br, uint64_t id) {
    RING_GET_RESPONSE(br, br->rsp_prod_pvt)->id = id;
    br->rsp_prod_pvt++;
}
int ref_push_responses(struct blkif_back_ring *br) {
    int notify; RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(br, notify); return notify;
}
unsigned ref_pending_responses(struct blkif_front_ring *fr) {
    return XEN_RING_NR_UNCONSUMED_RESPONSES(fr);
}
uint64_t ref_take_response(struct blkif_front_ring *fr) {
    struct blkif_response rsp;
    RING_COPY_RESPONSE(fr, fr->rsp_cons, &rsp);
    fr->rsp_cons++;
    return rsp.id;
}
int ref_final_requests(struct blkif_back_ring *br) {
    int work; RING_FINAL_CHECK_FOR_REQUESTS(br, work); return work != 0;
}
int ref_final_responses(struct blkif_front_ring *fr) {
    int work; RING_FINAL_CHECK_FOR_RESPONSES(fr, work); return work != 0;
}
"""

REFERENCE_CDEF = """
struct blkif_front_ring { uint32_t req_prod_pvt; uint32_t rsp_cons; unsigned int nr_ents; ...; };
struct blkif_back_ring { uint32_t rsp_prod_pvt; uint32_t req_cons; unsigned int nr_ents; ...; };
void ref_init(void *, unsigned, struct blkif_front_ring *, struct blkif_back_ring *, uint32_t);
unsigned ref_size(struct blkif_front_ring *);
unsigned ref_free(struct blkif_front_ring *);
void ref_put_request(struct blkif_front_ring *, uint64_t);
int ref_push_requests(struct blkif_front_ring *);
long ref_pending_requests(struct blkif_back_ring *);
uint64_t ref_take_request(struct blkif_back_ring *);
void ref_put_response(struct blkif_back_ring *, uint64_t);
int ref_push_responses(struct blkif_back_ring *);
unsigned ref_pending_responses(struct blkif_front_ring *);
uint64_t ref_take_response(struct blkif_front_ring *);
int ref_final_requests(struct blkif_back_ring *);
int ref_final_responses(struct blkif_front_ring *);
"""


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    require_header("/usr/include/xen/io/ring.h")
    builder = cffi.FFI()
    builder.cdef(REFERENCE_CDEF)
    builder.set_source("_ring_reference", REFERENCE)
    tmp = tmp_path_factory.mktemp("ringref")
    path = builder.compile(tmpdir=str(tmp))
    spec = importlib.util.spec_from_file_location("_ring_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Pair:
    """The Python ring and the C reference ring, each on its own buffer."""

    def __init__(self, ref, nbytes, start):
        self.lib, self.cffi = ref.lib, ref.ffi
        self.cbuf = self.cffi.new("char[]", nbytes)
        self.front = self.cffi.new("struct blkif_front_ring *")
        self.back = self.cffi.new("struct blkif_back_ring *")
        self.lib.ref_init(self.cbuf, nbytes, self.front, self.back, start)
        self.buf = bytearray(nbytes)
        self.f = FrontRing(self.buf, X86_64, start=start)
        self.b = BackRing(self.buf, X86_64)
        self.req = ffi.new("struct blkif_x86_64_request *")
        self.rsp = ffi.new("struct blkif_x86_64_response *")
        self.next_id = 1

    def header(self):
        return struct.unpack_from("<4I", self.buf), struct.unpack_from(
            "<4I", self.cffi.buffer(self.cbuf, 16)
        )

    def check(self):
        ours, theirs = self.header()
        assert ours == theirs
        assert (self.f.req_prod_pvt, self.f.rsp_cons) == (
            self.front.req_prod_pvt, self.front.rsp_cons)
        assert (self.b.rsp_prod_pvt, self.b.req_cons) == (
            self.back.rsp_prod_pvt, self.back.req_cons)
        assert self.f.free_requests() == self.lib.ref_free(self.front)
        assert self.b.pending_requests() == self.lib.ref_pending_requests(self.back)
        assert self.f.pending_responses() == self.lib.ref_pending_responses(self.front)

    # One method per operation; each does it on both rings and compares results.
    def put_requests(self, n):
        for _ in range(min(n, self.f.free_requests())):
            req = ffi.cast("struct blkif_x86_64_request *", self.f.request_slot())
            req.id = self.next_id
            self.f.advance()
            self.lib.ref_put_request(self.front, self.next_id)
            self.next_id += 1

    def push_requests(self, _):
        assert self.f.push_requests() == bool(self.lib.ref_push_requests(self.front))

    def take_requests(self, n):
        for _ in range(min(n, self.b.pending_requests())):
            self.b.copy_request(self.req)
            assert self.req.id == self.lib.ref_take_request(self.back)

    def put_responses(self, n):
        for _ in range(min(n, (self.b.req_cons - self.b.rsp_prod_pvt) & MASK32)):
            self.rsp.id = self.b.rsp_prod_pvt * 7
            self.b.put_response(ffi.buffer(self.rsp))
            self.lib.ref_put_response(self.back, self.rsp.id)

    def push_responses(self, _):
        assert self.b.push_responses() == bool(self.lib.ref_push_responses(self.back))

    def take_responses(self, n):
        for _ in range(min(n, self.f.pending_responses())):
            self.f.copy_response(self.rsp)
            assert self.rsp.id == self.lib.ref_take_response(self.front)

    def final_requests(self, _):
        assert self.b.final_check_for_requests() == bool(
            self.lib.ref_final_requests(self.back))

    def final_responses(self, _):
        assert self.f.final_check_for_responses() == bool(
            self.lib.ref_final_responses(self.front))


OPS = [name for name in vars(Pair) if not name.startswith("_") and name not in ("header", "check")]
STARTS = st.one_of(
    st.sampled_from([0, 1, MASK32, MASK32 - 1, MASK32 - 5, MASK32 - 31, 2**31]),
    st.integers(0, MASK32),
)
# Ring byte sizes giving 1, 2, 4, 8 and 32 slots, and the real 2-page ring.
SIZES = st.sampled_from([64 + SLOT, 64 + 3 * SLOT, 64 + 5 * SLOT, 64 + 9 * SLOT, 4096, 8192])


@settings(max_examples=300, deadline=None)
@given(
    nbytes=SIZES,
    start=STARTS,
    ops=st.lists(st.tuples(st.sampled_from(OPS), st.integers(1, 40)), max_size=60),
)
def test_same_indices_and_notify_decisions_as_ring_h(ref, nbytes, start, ops):
    pair = Pair(ref, nbytes, start)
    assert pair.f.size == ref.lib.ref_size(pair.front)
    pair.check()
    for name, n in ops:
        getattr(pair, name)(n)
        pair.check()


@settings(max_examples=300, deadline=None)
@given(
    start=STARTS,
    ops=st.lists(st.tuples(st.sampled_from(OPS), st.integers(1, 40)), max_size=30),
    req_prod=st.one_of(st.integers(0, MASK32), st.integers(-40, 40)),
)
def test_hostile_req_prod_is_caught_like_ring_h(ref, start, ops, req_prod):
    pair = Pair(ref, 4096, start)
    for name, n in ops:
        getattr(pair, name)(n)
    # A hostile frontend scribbles req_prod, relative to where it was or anywhere.
    value = req_prod & MASK32 if req_prod > 40 else (pair.f.req_prod_pvt + req_prod) & MASK32
    struct.pack_into("<I", pair.buf, 0, value)
    pair.cffi.cast("uint32_t *", pair.cbuf)[0] = value
    expected = pair.lib.ref_pending_requests(pair.back)
    if expected < 0:
        with pytest.raises(RemoteProtocolError, match="overruns"):
            pair.b.pending_requests()
    else:
        assert pair.b.pending_requests() == expected
        assert expected <= pair.b.size


@pytest.mark.parametrize("order,slots", [(0, 32), (1, 64), (2, 128), (3, 256), (4, 512)])
def test_ring_sizes(order, slots):
    assert ring_slots(4096 << order, SLOT)[1] == slots
    assert FrontRing(bytearray(4096 << order), X86_64).size == slots


def test_buffer_too_small_for_one_slot():
    with pytest.raises(LocalProtocolError, match="holds no"):
        FrontRing(bytearray(64 + SLOT - 1), X86_64)


def test_full_ring_refuses_another_request():
    front = FrontRing(bytearray(4096), X86_64)
    for _ in range(front.size):
        front.put_request(b"x")
    with pytest.raises(LocalProtocolError, match="ring full"):
        front.request_slot()


def test_response_needs_a_consumed_request():
    buf = bytearray(4096)
    FrontRing(buf, X86_64)
    with pytest.raises(LocalProtocolError, match="no consumed request"):
        BackRing(buf, X86_64).response_slot()


def test_backend_attaching_to_an_overrun_ring_refuses():
    buf = bytearray(4096)
    FrontRing(buf, X86_64)
    struct.pack_into("<I", buf, 0, 33)  # req_prod 33 ahead of rsp_prod 0
    with pytest.raises(RemoteProtocolError, match="beyond"):
        BackRing(buf, X86_64)


def test_backend_claiming_too_many_responses_is_caught():
    buf = bytearray(4096)
    front = FrontRing(buf, X86_64)
    struct.pack_into("<I", buf, 8, 40)  # rsp_prod
    with pytest.raises(RemoteProtocolError, match="rsp_prod"):
        front.pending_responses()


def _wait(fd, timeout=10.0):
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, "lost wake-up: peer never notified"
    os.read(fd, 4096)


def _backend(mem, kick_rd, notify_wr, total):
    """Echo every request id back as a response, notifying only when told to."""
    back = BackRing(mem, X86_64)
    req = ffi.new("struct blkif_x86_64_request *")
    rsp = ffi.new("struct blkif_x86_64_response *")
    done = 0
    while done < total:
        while back.pending_requests():
            back.copy_request(req)
            rsp.id, rsp.operation, rsp.status = req.id, req.operation, 0
            back.put_response(ffi.buffer(rsp))
            done += 1
        if back.push_responses():
            os.write(notify_wr, b"!")
        if not back.final_check_for_requests() and done < total:
            _wait(kick_rd)


def test_two_processes_over_shared_memory_lose_no_wakeup():
    total = 20000
    mem = mmap.mmap(-1, 4 * 4096)
    front = FrontRing(mem, X86_64)
    kick_rd, kick_wr = os.pipe()
    notify_rd, notify_wr = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            _backend(mem, kick_rd, notify_wr, total)
            status = 0
        finally:
            os._exit(status)
    rsp = ffi.new("struct blkif_x86_64_response *")
    sent = received = kicks = 0
    while received < total:
        batch = 0
        while sent < total and not front.full() and batch < 50:
            req = ffi.cast("struct blkif_x86_64_request *", front.request_slot())
            req.id, req.operation = sent, 1
            front.advance()
            sent += 1
            batch += 1
        if front.push_requests():
            os.write(kick_wr, b"!")
            kicks += 1
        while front.pending_responses():
            front.copy_response(rsp)
            assert (rsp.id, rsp.operation, rsp.status) == (received, 1, 0)
            received += 1
        if received < total and not front.final_check_for_responses() and front.full():
            _wait(notify_rd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # Event hold-off works: far fewer kicks than requests.
    assert 0 < kicks < total
