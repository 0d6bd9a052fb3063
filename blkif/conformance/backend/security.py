"""Backend cases from Xen security advisories: what a hostile frontend must
not achieve (leak backend memory, make the backend act on two versions of one
request, starve other guests, exhaust the backend through xenstore)."""
import os
import threading
import time

from blkif.abi import ffi
from blkif.abi.constants import (
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
)
from blkif.conformance.backend.requests import read_pages
from blkif.conformance.catalogue import MUST, Failed, group
from xenstore import XenbusState as S

case = group("backend", "security")


def _padding(abi):
    """Byte offsets of a response that are none of id, operation, status."""
    ctype = abi.ctype("response")
    used = set()
    for name, size in (("id", 8), ("operation", 1), ("status", 2)):
        at = ffi.offsetof(ctype, name)
        used.update(range(at, at + size))
    return [i for i in range(ffi.sizeof(ctype)) if i not in used]


@case("sec-1", "XSA-216; blkif.h: blkif_response", MUST,
      title="response padding leaks nothing",
      sends="good, bad and unknown requests whose slots we remember byte for byte",
      expects="every padding byte of each response is 0 or the byte the frontend itself "
              "wrote in that slot (responses fill slots in completion order)",
      why="XSA-216: blkback copied responses with uninitialised padding, leaking its "
          "stack to guests")
def _(peer):
    peer.connect()
    ref = peer.gref(0)
    q = peer.q
    ids = [0x0102030405060708, 0xF1F2F3F4F5F6F7F8, 0x1111111111111111]
    before = []  # each slot's bytes as we wrote them, in ring order
    for rid, op, segs in ((ids[0], BLKIF_OP_READ, [(ref, 0, 7)]),
                          (ids[1], BLKIF_OP_READ, [(ref, 5, 2)]),
                          (ids[2], 77, [(ref, 0, 7)])):
        at = q.ring.req_prod_pvt
        q.encoder.rw(q.ring, op, rid, 0, segs)
        before.append(bytes(ffi.buffer(q.ring.slot(at), q.ring.response_size)))
    peer.push()
    pads = _padding(peer.abi)
    # A response may land in any of the batch's slots (completion order).
    for mine, (rid, _op, _status, raw) in zip(before, peer.responses(3, raw=True)):
        leaked = [i for i in pads if raw[i] not in (0, mine[i])]
        if leaked:
            raise Failed("response %#x: padding bytes %s are %s" % (
                rid, leaked, raw[leaked[0]:leaked[-1] + 1].hex()))


@case("sec-2", "XSA-155; ring.h: RING_COPY_REQUEST", MUST,
      title="a request rewritten after the notify is acted on once, consistently",
      sends="40 times: a valid one-page READ, push, notify, then at once rewrite the slot "
            "to a WRITE of 200 segments from another page",
      expects="each answered either READ/OKAY (the first copy) or WRITE/ERROR (the second); "
              "never a mix; the disk unchanged",
      why="XSA-155: a backend that reads a shared request twice can validate one version "
          "and execute another")
def _(peer):
    peer.connect(pool_pages=32)
    q = peer.q
    before = read_pages(peer, 0, 1)
    q.pool.buffer[:4096] = b"\x5a" * 4096  # page 0: what a mixed-up WRITE would write
    for i in range(40):
        q.encoder.rw(q.ring, BLKIF_OP_READ, i, 0, [(peer.gref(1), 0, 7)])
        req = peer.request()
        peer.push()
        req.operation = BLKIF_OP_WRITE
        req.nr_segments = 200
        req.seg[0].gref = peer.gref(0)
        (rid, op, status), = peer.responses(1)
        if (op, status) not in ((BLKIF_OP_READ, BLKIF_RSP_OKAY),
                                (BLKIF_OP_WRITE, BLKIF_RSP_ERROR)):
            raise Failed("round %d: answered operation %d status %d" % (i, op, status))
    if read_pages(peer, 0, 1) != before:
        raise Failed("sector 0 was written")


@case("sec-3", "XSA-332", MUST,
      title="an event storm does not starve other VBDs",
      sends="events on one VBD's channel as fast as we can for 2 s, with no requests",
      expects="another VBD's reads each finish within 1 s meanwhile; the stormed VBD "
              "still serves afterwards",
      why="XSA-332: a guest flooding event channels could keep the backend busy and "
          "starve other guests")
def _(peer):
    other = peer.other()
    peer.connect()
    stop = threading.Event()
    sent = [0]

    def storm():
        while not stop.is_set():
            try:
                peer.q.port.notify()
            except Exception:
                return
            sent[0] += 1
    thread = threading.Thread(target=storm, daemon=True)
    thread.start()
    worst = 0.0
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            started = time.monotonic()
            other.alive(timeout=5.0)
            worst = max(worst, time.monotonic() - started)
    finally:
        stop.set()
        thread.join(5)
    if worst > 1.0:
        raise Failed("another VBD's read took %.2fs during the storm" % worst)
    peer.alive()
    return "%d events sent; the other VBD's slowest read %.3fs" % (sent[0], worst)


@case("sec-4", "XSA-349", MUST,
      title="a xenstore watch flood does not stop the backend",
      sends="2000 writes under the frontend directory (new nodes and the unchanged state)",
      expects="the VBD stays Connected and serves; another VBD serves within 1 s",
      why="XSA-349: backends queued watch events without bound while a guest wrote "
          "xenstore nodes as fast as it could")
def _(peer):
    other = peer.other()
    peer.connect()
    for i in range(1000):
        peer.write_front("flood-%d" % (i % 50), str(i))
        peer.switch(S.Connected)
    started = time.monotonic()
    other.alive()
    took = time.monotonic() - started
    if took > 1.0:
        raise Failed("another VBD's read took %.2fs after the flood" % took)
    if peer.backend_state() != S.Connected:
        raise Failed("backend went %s" % peer.backend_state().name)
    peer.alive()


@case("sec-5", "blkif.h: Request/Response; ring.h: RING_COPY_REQUEST", MUST,
      title="random bytes in every slot",
      sends="a full ring of random request bytes (operation byte random), one notify",
      expects="the backend answers or closes the VBD; another VBD keeps serving",
      why="nothing a guest writes in its ring may crash or wedge the backend")
def _(peer):
    other = peer.other()
    peer.connect()
    q = peer.q
    for _ in range(q.ring.size):
        q.ring.put_request(os.urandom(q.ring.request_size))
    peer.push()
    time.sleep(0.5)
    other.alive()
    return "backend %s" % peer.backend_state().name
