"""The shared ring of xen/io/ring.h, sans-I/O, over any writable buffer.

A shared ring is a 64-byte header (``req_prod``, ``req_event``, ``rsp_prod``,
``rsp_event``, padding) followed by ``size`` slots, each the union of a
request and a response.  ``size`` is the number of slots that fit, rounded
down to a power of two (``__CONST_RING_SIZE``).  Indices are free-running
32-bit counters; a slot is ``index & (size - 1)``.

The frontend half (:class:`FrontRing`) produces requests and consumes
responses; the backend half (:class:`BackRing`) does the reverse.  Each method
is one ring.h macro and keeps its semantics and barriers exactly.  Neither half
does I/O: ``push_*`` and ``final_check_*`` return whether the caller should
notify the peer or has more work, as ``*_AND_CHECK_NOTIFY`` does.

The peer writes the shared header concurrently and may be hostile.  The
backend reads ``req_prod`` once per poll, rejects impossible values
(``RING_REQUEST_PROD_OVERFLOW``) and copies each request out of the shared
slot exactly once (``RING_COPY_REQUEST``) before anyone looks at it.
"""
from blkif.abi import ffi, lib
from blkif.abi.constants import SRING_HEADER_SIZE
from blkif.errors import LocalProtocolError, RemoteProtocolError

MASK32 = 0xFFFFFFFF


def ring_slots(nbytes, slot_size):
    """(raw, usable) slots in ``nbytes`` of ring; usable is ``__CONST_RING_SIZE``."""
    raw = max((nbytes - SRING_HEADER_SIZE) // slot_size, 0)
    return raw, 1 << (raw.bit_length() - 1) if raw else 0


class _Half:
    """What both halves share: the mapped header and slot addressing.

    ``layout`` gives ``slot_size``, ``request_size`` and ``response_size``
    (an :class:`blkif.abi.Abi` does).
    """

    def __init__(self, buffer, layout):
        self._keep = buffer
        self._mem = ffi.from_buffer("char[]", buffer, require_writable=True)
        slot_size = layout.slot_size
        self.size = ring_slots(len(self._mem), slot_size)[1]
        if self.size == 0:
            raise LocalProtocolError(
                "a %d-byte buffer holds no %d-byte ring slot" % (len(self._mem), slot_size)
            )
        self.slot_size = slot_size
        self.request_size = layout.request_size
        self.response_size = layout.response_size
        self._mask = self.size - 1
        self.sring = ffi.cast("struct blkif_sring_header *", self._mem)
        self._slots = self._mem + SRING_HEADER_SIZE

    def slot(self, idx):
        """A ``char *`` to the slot of free-running index ``idx``."""
        return self._slots + (idx & self._mask) * self.slot_size

    def release(self):
        """Let go of the buffer (so its owner can unmap it); the ring is dead after."""
        self.sring = self._slots = None
        ffi.release(self._mem)
        self._keep = None


class FrontRing(_Half):
    """The frontend's half: produce requests, consume responses.

    ``init=True`` is SHARED_RING_INIT + FRONT_RING_INIT (a fresh ring, indices
    at ``start``); ``init=False`` attaches to a ring already in use
    (FRONT_RING_ATTACH at the current ``rsp_prod``).
    """

    def __init__(self, buffer, layout, init=True, start=0):
        super().__init__(buffer, layout)
        if init:
            ffi.memmove(self._mem, b"\0" * SRING_HEADER_SIZE, SRING_HEADER_SIZE)
            start &= MASK32
            self.sring.req_prod = self.sring.rsp_prod = start
            self.sring.req_event = self.sring.rsp_event = (start + 1) & MASK32
        else:
            start = self.sring.rsp_prod
        self.req_prod_pvt = start
        self.rsp_cons = start

    def free_requests(self):
        """Slots we may fill now (RING_FREE_REQUESTS)."""
        return self.size - ((self.req_prod_pvt - self.rsp_cons) & MASK32)

    def full(self):
        return self.free_requests() == 0

    def request_slot(self):
        """A ``char *`` to the next request slot; fill it, then :meth:`advance`."""
        if self.full():
            raise LocalProtocolError("ring full: %d requests outstanding" % self.size)
        return self.slot(self.req_prod_pvt)

    def advance(self):
        """Count the request written into :meth:`request_slot` as produced."""
        self.req_prod_pvt = (self.req_prod_pvt + 1) & MASK32

    def put_request(self, data):
        """Copy ``data`` (at most one request) into the next slot and produce it."""
        ffi.memmove(self.request_slot(), data, len(data))
        self.advance()

    def push_requests(self):
        """Publish produced requests; True if the backend must be notified."""
        old = self.sring.req_prod
        new = self.req_prod_pvt
        lib.xen_wmb()
        self.sring.req_prod = new
        lib.xen_mb()
        return ((new - self.sring.req_event) & MASK32) < ((new - old) & MASK32)

    def pending_responses(self):
        """Responses ready to consume; reads ``rsp_prod`` once.

        Raises RemoteProtocolError when the backend claims more responses than
        requests outstanding (RING_RESPONSE_PROD_OVERFLOW).
        """
        prod = self.sring.rsp_prod
        lib.xen_rmb()
        pending = (prod - self.rsp_cons) & MASK32
        if pending > self.size:
            raise RemoteProtocolError(
                "backend rsp_prod %d is %d ahead of rsp_cons %d (ring of %d)"
                % (prod, pending, self.rsp_cons, self.size)
            )
        return pending

    def copy_response(self, dest):
        """Copy the next response into ``dest`` (RING_COPY_RESPONSE) and consume it.

        ``dest`` is a response-sized buffer or cdata pointer.
        """
        ffi.memmove(dest, self.slot(self.rsp_cons), self.response_size)
        self.rsp_cons = (self.rsp_cons + 1) & MASK32

    def final_check_for_responses(self):
        """True if responses are pending; else arm ``rsp_event`` and look again."""
        if (self.sring.rsp_prod - self.rsp_cons) & MASK32:
            return True
        self.sring.rsp_event = (self.rsp_cons + 1) & MASK32
        lib.xen_mb()
        return bool((self.sring.rsp_prod - self.rsp_cons) & MASK32)


class BackRing(_Half):
    """The backend's half: consume requests, produce responses.

    Attaches at the ring's current ``rsp_prod`` (BACK_RING_ATTACH), so a
    backend can reconnect to a ring already in use.  Raises
    RemoteProtocolError if the frontend's ``req_prod`` is impossible.
    """

    def __init__(self, buffer, layout):
        super().__init__(buffer, layout)
        start = self.sring.rsp_prod
        self.req_cons = start
        self.rsp_prod_pvt = start
        if ((self.sring.req_prod - start) & MASK32) > self.size:
            raise RemoteProtocolError(
                "frontend req_prod %d is beyond rsp_prod %d + ring size %d"
                % (self.sring.req_prod, start, self.size)
            )

    def pending_requests(self):
        """Requests we may consume now; reads ``req_prod`` once.

        Raises RemoteProtocolError if the frontend produced more requests than
        the ring holds (RING_REQUEST_PROD_OVERFLOW): the caller should shut
        the device down.  The count is also bounded so that consuming it never
        overruns responses not yet pushed (RING_REQUEST_CONS_OVERFLOW).
        """
        prod = self.sring.req_prod
        lib.xen_rmb()
        if ((prod - self.rsp_prod_pvt) & MASK32) > self.size:
            raise RemoteProtocolError(
                "frontend req_prod %d overruns the ring (rsp_prod_pvt %d, size %d)"
                % (prod, self.rsp_prod_pvt, self.size)
            )
        req = (prod - self.req_cons) & MASK32
        room = self.size - ((self.req_cons - self.rsp_prod_pvt) & MASK32)
        return min(req, room)

    def copy_request(self, dest):
        """Copy the next request into ``dest`` (RING_COPY_REQUEST) and consume it.

        ``dest`` is a request-sized buffer or cdata pointer.  Only call after
        :meth:`pending_requests` said one is there; validate ``dest``, never
        the shared slot.
        """
        ffi.memmove(dest, self.slot(self.req_cons), self.request_size)
        self.req_cons = (self.req_cons + 1) & MASK32

    def response_slot(self):
        """A ``char *`` to the next response slot; fill it, then :meth:`advance`."""
        if self.rsp_prod_pvt == self.req_cons:
            raise LocalProtocolError("no consumed request is waiting for a response")
        return self.slot(self.rsp_prod_pvt)

    def advance(self):
        """Count the response written into :meth:`response_slot` as produced."""
        self.rsp_prod_pvt = (self.rsp_prod_pvt + 1) & MASK32

    def put_response(self, data):
        """Copy ``data`` into the next response slot and produce it."""
        ffi.memmove(self.response_slot(), data, len(data))
        self.advance()

    def push_responses(self):
        """Publish produced responses; True if the frontend must be notified."""
        old = self.sring.rsp_prod
        new = self.rsp_prod_pvt
        lib.xen_wmb()
        self.sring.rsp_prod = new
        lib.xen_mb()
        return ((new - self.sring.rsp_event) & MASK32) < ((new - old) & MASK32)

    def _unconsumed(self):
        req = (self.sring.req_prod - self.req_cons) & MASK32
        rsp = self.size - ((self.req_cons - self.rsp_prod_pvt) & MASK32)
        return min(req, rsp)

    def final_check_for_requests(self):
        """True if requests are pending; else arm ``req_event`` and look again."""
        if self._unconsumed():
            return True
        self.sring.req_event = (self.req_cons + 1) & MASK32
        lib.xen_mb()
        return bool(self._unconsumed())
