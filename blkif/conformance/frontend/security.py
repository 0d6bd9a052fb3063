"""Frontend cases from Xen security advisories: what a hostile backend must
not achieve against a guest (XSA-391: Linux frontends trusted the backend's
ring and events)."""
import threading
import time

from blkif.abi.constants import BLKIF_OP_READ
from blkif.conformance.catalogue import MUST, group
from blkif.conformance.frontend.responses import PLAIN, READ, must_fail
from blkif.conformance.frontend.xenbus import round_trip
from xenstore import XenbusState as S

case = group("frontend", "security")
MASK32 = 0xFFFFFFFF


@case("fe-sec-1", "XSA-391; ring.h: RING_RESPONSE_PROD_OVERFLOW", MUST,
      title="rsp_prod beyond the ring",
      sends="a READ answered by moving rsp_prod a ring and 5 past the last response",
      expects="the read is not reported done; the frontend lives",
      why="XSA-391: frontends consumed responses the backend never wrote")
def _(fut):
    fut.attach(PLAIN)

    def overrun(peer, req, status):
        ring = peer.rings[0].ring
        ring.rsp_prod_pvt = (ring.rsp_prod_pvt + ring.size + 5) & MASK32
        return []
    fut.backend.respond = overrun
    results = fut.io(READ)
    fut.alive()
    return must_fail(results[0], "an overrun rsp_prod")


@case("fe-sec-2", "XSA-391", MUST,
      title="a spurious event storm",
      sends="events on the channel as fast as we can for 2 s, while the guest does I/O",
      expects="the I/O completes with the right bytes; the frontend lives",
      why="XSA-391: a backend flooding events could hang or crash Linux frontends")
def _(fut):
    fut.attach(PLAIN)
    stop = threading.Event()
    sent = [0]

    def storm():
        port = fut.backend.rings[0].port
        deadline = time.monotonic() + 2.0
        while not stop.is_set() and time.monotonic() < deadline:
            port.notify()
            sent[0] += 1
    thread = threading.Thread(target=storm, daemon=True)
    thread.start()
    try:
        for i in range(5):
            round_trip(fut, i * 65536, 65536, seed=i)
    finally:
        stop.set()
        thread.join(5)
    fut.alive()
    return "%d events" % sent[0]


@case("fe-sec-3", "blkif.h: state machine (Closing)", MUST,
      title="the backend closes in the middle of I/O",
      sends="a READ left unanswered, then the backend switches Closing",
      expects="the read fails within the frontend's timeout and the frontend goes Closed",
      why="a guest must not hang forever on a backend that went away")
def _(fut):
    fut.attach(PLAIN)

    def vanish(peer, req, status):
        if req.kind == BLKIF_OP_READ:
            peer.switch(S.Closing)
            return []
        return [(req.id, req.kind, status)]
    fut.backend.respond = vanish
    results = fut.io(READ)
    fut.alive()
    error = must_fail(results[0], "the backend closing")
    fut.backend.wait_frontend([S.Closed], what="after Closing")
    return error
