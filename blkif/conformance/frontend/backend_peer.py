"""The suite as a backend: a VBD served by hand, so a case can answer anything.

:class:`BackendPeer` is backend domain ``domid`` for one VBD of a guest.  It
writes the offer a case chooses, waits for the frontend's rings, maps them,
publishes the disk and goes Connected; then a thread serves the rings from
an in-memory disk.  Each request goes through ``respond(peer, request,
default)``, which a case replaces to misbehave on purpose (wrong operation,
unknown or repeated id, no answer at all); :attr:`seen` keeps every request
the frontend sent, for the cases that judge what it asks for.
"""
import contextlib
import threading

from blkif.abi import ffi
from blkif.abi.constants import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    PAGE_SIZE,
    SECTOR_SIZE,
)
from blkif.conformance.catalogue import Failed
from blkif.negotiate import BackendOffer, Connection, DiskInfo
from blkif.platform import PlatformError
from blkif.request import Limits, RequestDecoder, RequestError
from blkif.ring import BackRing
from xenstore import WaitTimeout, XenbusState as S

TIMEOUT = 10.0
OFFER_NODES = BackendOffer(max_indirect_segments=1, discard=True).nodes()  # every one


def default_respond(peer, req, status):
    """The honest answer: [(id, operation, status)]."""
    return [(req.id, req.kind if req.kind in (BLKIF_OP_READ, BLKIF_OP_WRITE) else
             req.operation, status)]


class _Ring:
    def __init__(self, mapping, ring, port, decoder, abi):
        self.mapping, self.ring, self.port, self.decoder = mapping, ring, port, decoder
        self.rsp_ctype = abi.ctype("response") + " *"


class BackendPeer:
    """Backend ``domid``'s end of VBD ``devid`` of guest ``frontend_domid``."""

    def __init__(self, xs, platform, domid, frontend_domid, devid, sectors=8192, kind="vbd"):
        self.xs, self.platform = xs, platform
        self.domid, self.frontend_domid, self.devid = domid, frontend_domid, devid
        self.back = "/local/domain/%d/backend/%s/%d/%d" % (domid, kind, frontend_domid, devid)
        self.front = "/local/domain/%d/device/vbd/%d" % (frontend_domid, devid)
        self.disk = DiskInfo(sectors)
        self.data = bytearray(sectors * SECTOR_SIZE)
        self.respond = default_respond
        self.seen = []  # every Request the frontend sent, in order
        self.conn = None
        self.rings = []
        self.errors = []  # what went wrong in the serving thread
        self._stop = threading.Event()
        self._thread = None

    # -- xenbus -------------------------------------------------------------

    def frontend_state(self):
        return self.xs.read_state(self.front + "/state")

    def wait_frontend(self, states, timeout=TIMEOUT, what="frontend"):
        try:
            return self.xs.wait_for_state(self.front + "/state", states, timeout)
        except WaitTimeout:
            raise Failed("%s: frontend stayed %s, not %s within %.0fs" % (
                what, self.frontend_state().name, "/".join(s.name for s in states),
                timeout)) from None

    def switch(self, state):
        self.xs.switch_state(self.back + "/state", state)

    def read_front(self, key):
        return self.xs.read_str("%s/%s" % (self.front, key), None)

    def offer(self, offer=BackendOffer(), disk=None, omit=()):
        """Write ``offer`` (minus nodes in ``omit``) and InitWait."""
        self.offer_made = offer
        if disk is not None:
            self.disk = disk
            self.data = bytearray(disk.sectors * SECTOR_SIZE)
        for txn in self.xs.transactions():
            with txn:
                for key in set(OFFER_NODES) - set(offer.nodes()):  # an earlier offer's
                    if txn.exists("%s/%s" % (self.back, key)):
                        txn.rm("%s/%s" % (self.back, key))
                for key, value in offer.nodes().items():
                    if key not in omit:
                        txn.write("%s/%s" % (self.back, key), value)
                txn.switch_state(self.back + "/state", S.InitWait)

    def connect(self):
        """Once the frontend is Initialised: map its rings, bind its channels,
        publish the disk, Connected, and serve in a thread."""
        self.wait_frontend([S.Initialised, S.Connected], what="setup")
        self.conn = Connection.read(self.read_front, self.offer_made)
        limits = Limits(self.disk.sectors, readonly=self.disk.readonly,
                        flush=self.offer_made.flush, barrier=self.offer_made.barrier,
                        discard=self.offer_made.discard,
                        discard_secure=self.offer_made.discard_secure,
                        max_indirect_segments=self.offer_made.max_indirect_segments)
        abi = self.conn.abi
        for queue in self.conn.queues:
            mapping = self.platform.map_grants(self.frontend_domid, queue.ring_refs)
            port = self.platform.evtchn_bind_interdomain(self.frontend_domid,
                                                         queue.event_channel)
            self.rings.append(_Ring(mapping, BackRing(mapping.buffer, abi), port,
                                    RequestDecoder(abi, limits), abi))
        for txn in self.xs.transactions():
            with txn:
                for key, value in self.disk.nodes().items():
                    txn.write("%s/%s" % (self.back, key), value)
                txn.switch_state(self.back + "/state", S.Connected)
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name="conformance-backend")
        self._thread.start()

    @contextlib.contextmanager
    def connecting(self, connect=True):
        """With ``connect``, :meth:`connect` in a thread while the body has
        the frontend attach; Failed if it failed."""
        failure = []

        def run():
            try:
                self.connect()
            except Exception as exc:  # noqa: BLE001 - handed to the case as Failed
                failure.append(exc)
        thread = threading.Thread(target=run, daemon=True)
        if connect:
            thread.start()
        try:
            yield
        finally:
            if connect:
                thread.join(10)
            if failure:
                raise Failed("backend side: %s" % failure[0])

    # -- the rings ----------------------------------------------------------

    def _serve(self):
        try:
            while not self._stop.is_set():
                for ring in self.rings:
                    if ring.port.clear() or ring.ring.final_check_for_requests():
                        self._service(ring)
                if self.rings:
                    self.rings[0].port.wait(0.02)
        except Exception as exc:  # the frontend broke the ring or went away, or we did
            self.errors.append("%s: %s" % (type(exc).__name__, exc))

    def _service(self, ring):
        """Take every request first, then answer: a hostile answer (twice, or
        moving rsp_prod_pvt) must not disturb BackRing's count of this batch."""
        answers = []
        for _ in range(max(ring.ring.pending_requests(), 0)):
            try:
                req = ring.decoder.take(ring.ring)
                self.seen.append(req)
                status = self._do(ring, req)
            except RequestError as exc:
                self.seen.append(exc)
                answers.append((exc.id, exc.operation, exc.status))
            else:
                answers += self.respond(self, req, status)
        for rid, op, st in answers:
            self.put(ring, rid, op, st)
        if ring.ring.push_responses():
            ring.port.notify()

    @staticmethod
    def put(ring, rid, op, status):
        """Write a response into the next response slot, whether or not a
        request is waiting for it (a hostile backend may answer twice)."""
        rsp = ffi.cast(ring.rsp_ctype, ring.ring.slot(ring.ring.rsp_prod_pvt))
        rsp.id, rsp.operation, rsp.status = rid, op, status
        ring.ring.advance()

    def _do(self, ring, req):
        if req.kind in (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER) and not req.nr_segments:
            return BLKIF_RSP_OKAY
        if req.kind == BLKIF_OP_DISCARD:
            self.data[req.offset:req.offset + req.nr_sectors * SECTOR_SIZE] = bytes(
                req.nr_sectors * SECTOR_SIZE)
            return BLKIF_RSP_OKAY
        try:
            if req.grefs is None:
                pages = self.platform.map_grants(self.frontend_domid, req.indirect_grefs,
                                                 writable=False)
                with pages:
                    ring.decoder.read_indirect(req, pages.buffer)
            self._copy(req)
        except (PlatformError, RequestError):
            return BLKIF_RSP_ERROR
        return BLKIF_RSP_OKAY

    def _copy(self, req):
        writing = req.kind != BLKIF_OP_READ
        mapping = self.platform.map_grants(self.frontend_domid, req.grefs,
                                           writable=not writing)
        with mapping:
            buf = mapping.buffer
            at = req.offset
            for i, seg in enumerate(req.segments):
                page = i * PAGE_SIZE + seg.offset
                if writing:
                    self.data[at:at + seg.length] = buf[page:page + seg.length]
                else:
                    buf[page:page + seg.length] = self.data[at:at + seg.length]
                at += seg.length
            del buf

    def stop(self):
        """Stop serving (the rings stay mapped)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def close(self):
        """Stop serving, unmap the rings and unbind their channels."""
        self.stop()
        for ring in self.rings:
            ring.ring.release()
            for thing in (ring.port, ring.mapping):
                try:
                    thing.close()
                except PlatformError:
                    pass
        self.rings = []

    def disconnect(self):
        """Closed, rings released: ready for another :meth:`offer`."""
        self.close()
        self.switch(S.Closed)
        self.seen, self.errors, self.respond = [], [], default_respond
        self._stop = threading.Event()
        self._thread = None
