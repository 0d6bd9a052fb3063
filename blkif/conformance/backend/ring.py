"""Backend cases: the shared ring (xen/include/public/io/ring.h).

Indices are free-running 32-bit counters; the backend arms ``req_event`` so
the frontend knows when to notify (RING_FINAL_CHECK_FOR_REQUESTS), notifies
when ``rsp_prod`` passes ``rsp_event`` (RING_PUSH_RESPONSES_AND_CHECK_NOTIFY),
and stops a ring whose ``req_prod`` runs more than a ring ahead
(RING_REQUEST_PROD_OVERFLOW).
"""
import time

from blkif.abi.constants import BLKIF_OP_READ, BLKIF_RSP_OKAY
from blkif.conformance.catalogue import MUST, SHOULD, Failed, group
from xenstore import XenbusState as S

case = group("backend", "ring")
MASK32 = 0xFFFFFFFF


def _reads(peer, count, first_id=0):
    ref = peer.gref(0)

    def build(enc, ring):
        for i in range(count):
            enc.rw(ring, BLKIF_OP_READ, first_id + i, 0, [(ref, 0, 7)])
    return build


@case("ring-1", "ring.h: RING_FINAL_CHECK_FOR_REQUESTS", MUST,
      title="an idle backend arms req_event",
      sends="one READ, then nothing",
      expects="once answered, req_event = req_prod + 1 within a second",
      why="otherwise the frontend's next RING_PUSH_REQUESTS_AND_CHECK_NOTIFY sends no event "
          "and the request waits forever")
def _(peer):
    peer.connect()
    peer.alive()
    sring = peer.q.ring.sring
    deadline = time.monotonic() + 1.0
    while (sring.req_event - sring.req_prod) & MASK32 != 1:
        if time.monotonic() > deadline:
            raise Failed("req_event %d, req_prod %d" % (sring.req_event, sring.req_prod))
        time.sleep(0.01)


@case("ring-2", "ring.h: RING_PUSH_RESPONSES_AND_CHECK_NOTIFY", MUST,
      title="a response past rsp_event comes with an event",
      sends="rsp_event = rsp_cons + 1, a READ, a notify",
      expects="an event on the channel with the response",
      why="a frontend sleeping on its event channel must be woken")
def _(peer):
    peer.connect()
    q = peer.q
    q.ring.final_check_for_responses()  # arms rsp_event
    q.port.clear()
    _reads(peer, 1)(q.encoder, q.ring)
    peer.push()
    if not q.port.wait(5.0):
        raise Failed("no event within 5s (rsp_prod %d, rsp_event %d)"
                     % (q.ring.sring.rsp_prod, q.ring.sring.rsp_event))
    peer.responses(1)


@case("ring-3", "ring.h: RING_SIZE, __CONST_RING_SIZE", MUST,
      title="a full ring in one push",
      sends="as many READs as the ring has slots, one push, one notify",
      expects="exactly one OKAY response per id; rsp_prod ends equal to req_prod",
      why="the frontend may fill every slot; the backend must not answer more or less")
def _(peer):
    peer.connect()
    size = peer.q.ring.size
    got = peer.exchange(_reads(peer, size))
    if sorted(got) != list(range(size)) or any(v != (0, BLKIF_RSP_OKAY) for v in got.values()):
        raise Failed("responses: %s" % got)
    time.sleep(0.2)
    sring = peer.q.ring.sring
    if sring.rsp_prod != sring.req_prod:
        raise Failed("rsp_prod %d, req_prod %d" % (sring.rsp_prod, sring.req_prod))
    return "%d slots" % size


@case("ring-4", "ring.h: free-running indices; BACK_RING_ATTACH", SHOULD,
      title="indices wrap at 2**32",
      sends="a ring whose indices start at 2**32 - 20, then 3 batches of 16 READs",
      expects="every request answered OKAY across the wrap",
      why="indices are free-running 32-bit counters compared modulo 2**32; a backend that "
          "attaches at rsp_prod (BACK_RING_ATTACH, Linux 5.10+) shows it without 2**32 "
          "requests")
def _(peer):
    peer.connect(start=2**32 - 20)
    q = peer.q
    for batch in range(3):
        got = peer.exchange(_reads(peer, 16, batch * 16))
        bad = {k: v for k, v in got.items() if v != (0, BLKIF_RSP_OKAY)}
        if len(got) != 16 or bad:
            raise Failed("batch %d: %s" % (batch, got))
    return "req_prod now %d" % q.ring.sring.req_prod


@case("ring-5", "ring.h: RING_REQUEST_PROD_OVERFLOW", MUST,
      title="ring overrun: only that VBD stops",
      sends="req_prod set a ring and 5 beyond the last response, a notify",
      expects="another VBD of the same backend keeps serving; the backend answers no "
              "phantom requests",
      why="a hostile frontend must not make the backend read past the ring or hurt others")
def _(peer):
    other = peer.other()
    peer.connect()
    ring = peer.q.ring
    ring.sring.req_prod = (ring.req_prod_pvt + ring.size + 5) & MASK32
    peer.q.port.notify()
    time.sleep(0.3)
    other.alive()
    if (ring.sring.rsp_prod - ring.rsp_cons) & MASK32 > ring.size:
        raise Failed("rsp_prod %d: the backend answered phantom requests"
                     % ring.sring.rsp_prod)


@case("ring-6", "ring.h: RING_REQUEST_PROD_OVERFLOW; xenbus_dev_fatal", SHOULD,
      title="ring overrun closes the VBD with an error",
      sends="req_prod set a ring and 5 beyond the last response, a notify",
      expects="an error node and Closing (Linux blkback only halts the ring)",
      why="the guest and the toolstack learn why the disk stopped")
def _(peer):
    peer.connect()
    ring = peer.q.ring
    ring.sring.req_prod = (ring.req_prod_pvt + ring.size + 5) & MASK32
    peer.q.port.notify()
    state = peer.wait_backend([S.Closing, S.Closed], what="overrun")
    error = peer.error_node()
    if error is None:
        raise Failed("backend went %s without an error node" % state.name)
    return "error node: %s" % error
