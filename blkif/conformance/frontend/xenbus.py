"""Frontend cases: negotiation (blkif.h "Backend/Frontend XenBus Nodes").

The frontend must connect to any offer, even one without a single optional
node, and use only what was offered: ring pages, queues, indirect segments,
flush or barrier, discard; sector numbers in 512-byte units always.
"""
import hashlib

from blkif.abi.constants import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
)
from blkif.conformance.catalogue import INFO, MUST, Failed, group
from blkif.conformance.frontend.guest import pattern
from blkif.conformance.pairwise import all_pairs
from blkif.negotiate import BackendOffer, DiskInfo

case = group("frontend", "xenbus")

OPTIONAL = ("max-ring-page-order", "multi-queue-max-queues", "feature-persistent",
            "feature-flush-cache", "feature-barrier", "feature-discard")
BARE = BackendOffer(max_ring_page_order=0, max_queues=1, max_indirect_segments=0,
                    persistent=False, flush=False, barrier=False)


def round_trip(fut, offset, length, seed=1):
    """Write then read back through the guest; Failed unless both work and
    the backend's disk holds the bytes."""
    wrote, read = fut.io({"op": "write", "offset": offset, "length": length, "seed": seed},
                         {"op": "read", "offset": offset, "length": length})
    if not wrote["ok"] or not read["ok"]:
        raise Failed("write %s, read %s" % (wrote.get("error", "ok"), read.get("error", "ok")))
    data = pattern(seed, length)
    if bytes(fut.backend.data[offset:offset + length]) != data:
        raise Failed("the disk does not hold what the frontend wrote at %d" % offset)
    if read["sha256"] != hashlib.sha256(data).hexdigest():
        raise Failed("the frontend read back other bytes than the disk holds")


def ops_seen(fut):
    return [getattr(r, "operation", None) for r in fut.backend.seen]


@case("fe-xenbus-1", "blkif.h: Backend Features (all optional)", MUST,
      title="a bare offer: no optional node at all",
      sends="InitWait with none of max-ring-page-order, multi-queue-max-queues, "
            "feature-max-indirect-segments, feature-persistent, flush, barrier, discard",
      expects="the frontend connects with one single-page ring (ring-ref, no "
              "ring-page-order) and a write reads back",
      why="every feature node is optional; Unikraft could not connect without "
          "multi-queue-max-queues")
def _(fut):
    fut.attach(BARE, omit=OPTIONAL)
    if fut.backend.read_front("ring-ref") is None:
        raise Failed("no ring-ref node")
    if fut.backend.read_front("ring-page-order") not in (None, "0"):
        raise Failed("ring-page-order %s with none offered"
                     % fut.backend.read_front("ring-page-order"))
    round_trip(fut, 4096, 8192)


@case("fe-xenbus-2", "blkif.h: max-ring-page-order, multi-queue-max-queues, "
      "feature-max-indirect-segments", MUST,
      title="the frontend stays inside the offer",
      sends="an offer of 4 ring pages, 2 queues, 32 indirect segments; then a 1 MiB write",
      expects="ring-page-order <= 2, multi-queue-num-queues <= 2, no request of more than "
              "32 segments",
      why="the backend sized its resources by its offer")
def _(fut):
    fut.attach(BackendOffer(max_ring_page_order=2, max_queues=2, max_indirect_segments=32))
    order = int(fut.backend.read_front("ring-page-order") or 0)
    queues = int(fut.backend.read_front("multi-queue-num-queues") or 1)
    if order > 2 or queues > 2:
        raise Failed("ring-page-order %d, multi-queue-num-queues %d" % (order, queues))
    round_trip(fut, 0, 1 << 20)
    most = max(r.nr_segments for r in fut.backend.seen if hasattr(r, "nr_segments"))
    if most > 32:
        raise Failed("a request of %d segments" % most)
    return "ring-page-order %d, %d queue(s), largest request %d segments" % (order, queues,
                                                                              most)


@case("fe-xenbus-3", "blkif.h: feature-max-indirect-segments", MUST,
      title="no indirect requests unless offered",
      sends="an offer without feature-max-indirect-segments; then a 1 MiB write",
      expects="only direct requests of at most 11 segments",
      why="a backend without the feature does not understand BLKIF_OP_INDIRECT")
def _(fut):
    fut.attach(BackendOffer(max_queues=1, max_indirect_segments=0))
    round_trip(fut, 0, 1 << 20)
    if BLKIF_OP_INDIRECT in ops_seen(fut):
        raise Failed("an indirect request was sent")


@case("fe-xenbus-4", "blkif.h: feature-flush-cache, feature-barrier", MUST,
      title="flush with only feature-barrier",
      sends="an offer of feature-barrier=1, feature-flush-cache=0; the guest flushes",
      expects="no FLUSH_DISKCACHE request (a WRITE_BARRIER, or nothing)",
      why="an operation the backend did not advertise must not be sent")
def _(fut):
    fut.attach(BackendOffer(max_queues=1, flush=False, barrier=True))
    fut.io({"op": "write", "offset": 0, "length": 4096, "seed": 2}, {"op": "flush"})
    if BLKIF_OP_FLUSH_DISKCACHE in ops_seen(fut):
        raise Failed("FLUSH_DISKCACHE sent with feature-flush-cache=0")
    return "barrier sent" if BLKIF_OP_WRITE_BARRIER in ops_seen(fut) else "nothing sent"


@case("fe-xenbus-5", "blkif.h: feature-flush-cache, feature-barrier, feature-discard", MUST,
      title="no flush, barrier or discard when none is offered",
      sends="an offer with flush, barrier and discard all 0; the guest flushes and discards",
      expects="neither request reaches the ring; the discard is not reported done (a flush "
              "may be: with neither flush nor barrier offered the disk has no write cache, "
              "as Linux takes it)",
      why="an operation the backend did not advertise must not be sent")
def _(fut):
    fut.attach(BackendOffer(max_queues=1, flush=False, barrier=False, discard=False))
    flush, discard = fut.io({"op": "flush"}, {"op": "discard", "offset": 0, "length": 4096})
    sent = {BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_DISCARD} & set(
        ops_seen(fut))
    if sent:
        raise Failed("operations %s sent" % sorted(sent))
    if discard["ok"]:
        raise Failed("a discard reported done though never sent")
    return "flush %s" % ("reported done" if flush["ok"] else "failed: " + flush["error"])


@case("fe-xenbus-6", "blkif.h: sector-size; sector_number in 512-byte units", MUST,
      title="a 4 KiB-sector disk is addressed in 512-byte sectors",
      sends="sector-size 4096; the guest writes 4096 bytes at byte 8192",
      expects="one WRITE with sector_number 16, the bytes at 8192 of the disk",
      why="blkif.h (Xen 4.20): sector_number counts 512 bytes whatever sector-size is; "
          "Unikraft used sector-size units")
def _(fut):
    fut.attach(BackendOffer(max_queues=1), disk=DiskInfo(8192, 4096, 4096))
    round_trip(fut, 8192, 4096)
    writes = [r.sector_number for r in fut.backend.seen
              if getattr(r, "kind", None) == BLKIF_OP_WRITE]
    if writes != [16]:
        raise Failed("WRITE sector numbers %s" % writes)


# Every pair of these values meets in one offer (ring pages, queues, indirect
# segments, persistent, flush, barrier, discard).
FACTORS = [[0, 1, 2, 3, 4], [1, 2, 3, 4], [0, 11, 32, 256, 4096], [False, True], [False, True],
           [False, True], [False, True]]
OFFERS = all_pairs(FACTORS)


@case("fe-xenbus-8", "blkif.h: Backend Features", MUST,
      title="every kind of offer, one after another",
      sends="%d offers in turn in which every pair of values meets (ring pages 1..16, queues "
            "1..4, indirect 0..4096, persistent, flush, barrier, discard on and off), the "
            "backend closing between them (a guest's disk is then removed and added afresh, "
            "as a toolstack does)" % len(OFFERS),
      expects="each time the frontend reconnects inside the offer and a 256 KiB write reads "
              "back",
      why="a frontend meets many backends; each offer must work")
def _(fut):
    fut.attach(BackendOffer(max_queues=1))
    for n, (order, queues, indirect, persistent, flush, barrier, discard) in enumerate(OFFERS):
        offer = BackendOffer(order, queues, indirect, persistent, flush, barrier, discard)
        fut.reattach(offer)
        used = int(fut.backend.read_front("ring-page-order") or 0), len(fut.backend.rings)
        if used[0] > order or used[1] > queues:
            raise Failed("offer %s: ring-page-order %d, %d queue(s)" % (offer, *used))
        round_trip(fut, 1 << 20, 256 << 10, seed=n)
        if max(getattr(r, "nr_segments", 0) for r in fut.backend.seen) > max(indirect, 11):
            raise Failed("offer %s: a request beyond %d segments" % (offer, indirect))


@case("fe-xenbus-7", "blkif.h: Frontend XenBus Nodes", INFO,
      title="what the frontend writes",
      sends="a full offer (16 ring pages, 4 queues, 256 indirect, persistent, discard)",
      expects="recorded: protocol, ring-page-order, queues, feature-persistent",
      why="implementations differ")
def _(fut):
    fut.attach(BackendOffer(max_queues=4, discard=True))
    read = fut.backend.read_front
    return "protocol=%s ring-page-order=%s multi-queue-num-queues=%s feature-persistent=%s" % (
        read("protocol"), read("ring-page-order"), read("multi-queue-num-queues"),
        read("feature-persistent"))
