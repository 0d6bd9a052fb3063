"""Frontend cases: responses (blkif.h ``blkif_response``; Linux xen-blkfront
``blkif_interrupt`` since the XSA-376/391 hardening).

A response names a request in flight by ``id`` and echoes its operation
(an indirect request's ``indirect_op``).  Anything else is a broken backend:
the transfer must not be reported done, and the frontend must not crash.
"""
import hashlib

from blkif.abi.constants import (
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
)
from blkif.conformance.catalogue import MUST, Failed, group
from blkif.conformance.frontend.guest import pattern
from blkif.conformance.frontend.xenbus import round_trip
from blkif.negotiate import BackendOffer

case = group("frontend", "responses")
PLAIN = BackendOffer(max_queues=1, max_indirect_segments=0, persistent=False)


def _hostile(fut, respond, *ops):
    """Attach, answer reads with ``respond``; the guest's results for ``ops``."""
    fut.attach(PLAIN)
    default = fut.backend.respond

    def answer(peer, req, status):
        if req.kind == BLKIF_OP_READ:
            return respond(peer, req, status)
        return default(peer, req, status)
    fut.backend.respond = answer
    results = fut.io(*ops)
    fut.alive()
    return results


READ = {"op": "read", "offset": 0, "length": 4096}


def must_fail(result, what):
    if result["ok"]:
        raise Failed("the read was reported done despite %s" % what)
    return result["error"]


@case("fe-rsp-1", "blkif.h: blkif_response operation; Linux blkif_interrupt", MUST,
      title="a response with the wrong operation",
      sends="a READ answered OKAY but with operation WRITE",
      expects="the read is not reported done (Linux fails the device); the frontend lives",
      why="an operation that does not match the request means the backend is broken or "
          "hostile; trusting it could hand back a buffer never filled")
def _(fut):
    results = _hostile(fut, lambda peer, req, st: [(req.id, BLKIF_OP_WRITE, st)], READ)
    return must_fail(results[0], "operation WRITE in its response")


@case("fe-rsp-2", "blkif.h: blkif_response id", MUST,
      title="a response with an unknown id",
      sends="a READ answered OKAY with id + 1000, an id never sent",
      expects="the read is not reported done; the frontend lives",
      why="an id outside the requests in flight must not index the frontend's shadow "
          "state (XSA-376 class)")
def _(fut):
    results = _hostile(fut, lambda peer, req, st: [(req.id + 1000, req.kind, st)], READ)
    return must_fail(results[0], "an unknown id")


@case("fe-rsp-3", "blkif.h: blkif_response id", MUST,
      title="a response repeated",
      sends="every READ answered twice with the same id",
      expects="no read returns bytes other than the disk's; the frontend lives",
      why="a repeated id must not complete another request, nor one twice")
def _(fut):
    results = _hostile(fut, lambda peer, req, st: [(req.id, req.kind, st)] * 2,
                       {"op": "write", "offset": 0, "length": 4096, "seed": 3}, READ, READ)
    good = hashlib.sha256(pattern(3, 4096)).hexdigest()
    for r in results[1:]:
        if r["ok"] and r["sha256"] != good:
            raise Failed("a read returned other bytes than the disk's")
    return "; ".join("ok" if r["ok"] else r["error"] for r in results[1:])


@case("fe-rsp-4", "blkif.h: BLKIF_RSP_ERROR", MUST,
      title="an error status fails the transfer",
      sends="a READ answered BLKIF_RSP_ERROR",
      expects="the read fails; the next write and read work",
      why="the guest must learn that its I/O failed")
def _(fut):
    results = _hostile(fut, lambda peer, req, st: [(req.id, req.kind, BLKIF_RSP_ERROR)], READ)
    must_fail(results[0], "status ERROR")
    fut.backend.respond = lambda peer, req, st: [(req.id, req.kind, st)]
    round_trip(fut, 8192, 4096)


@case("fe-rsp-5", "blkif.h: BLKIF_RSP_EOPNOTSUPP", MUST,
      title="EOPNOTSUPP for a flush",
      sends="a FLUSH_DISKCACHE answered BLKIF_RSP_EOPNOTSUPP",
      expects="the flush is not reported done",
      why="a flush the backend did not do must not be taken as durability")
def _(fut):
    fut.attach(BackendOffer(max_queues=1, flush=True))
    fut.backend.respond = lambda peer, req, st: [(req.id, req.operation, (
        BLKIF_RSP_EOPNOTSUPP if req.kind == BLKIF_OP_FLUSH_DISKCACHE else st))]
    flush, = fut.io({"op": "flush"})
    fut.alive()
    if flush["ok"]:
        raise Failed("the flush was reported done")
