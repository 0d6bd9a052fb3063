"""One ring's service in Python: the readable reference of the C engine.

``blkif serve --engine python`` runs it; the C engine (``blkif.backend.engine``,
``csrc/engine.c``) is the default, and tests hold the two to the same
answers.  :meth:`RingServer.service` is one batch, as blkback's
``do_block_io_op``: consume every request on the ring, do its I/O directly
into the mapped grant pages (``preadv``/``pwritev``, no copies), write all
responses, push them once and notify at most once, then look again
(``RING_FINAL_CHECK_FOR_REQUESTS``) so no request is left behind.  Requests
are done one after the other, in order, so a FLUSH covers everything
answered before it and a BARRIER has nothing in flight to wait for.

A bad request gets an error response with its id (``RequestError``); an
indirect request is answered with its ``indirect_op``, as blkback does.  Only
a frontend that overruns the ring raises out of :meth:`service`
(RemoteProtocolError): the caller shuts that device down, nothing else.

Grants are mapped per request, all of its segments in one call; with
persistent grants they come from a :class:`GrantCache`.

With a journal region (live restart), the request in hand is kept there
from its taking to its answer, in the C engine's format
(:class:`~blkif.backend.journal.RingJournal`); a server made with
``resume`` first does and answers what its killed predecessor, of either
engine, had taken.
"""
import contextlib
import errno
import logging
import os
import select
import threading
import time

from blkif.abi.constants import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    OP_NAMES,
    PAGE_SIZE,
    SECTOR_SIZE,
)
from blkif.backend.counters import RingCounters
from blkif.backend.engine import MAX_PERSISTENT_GRANTS, engine_abi
from blkif.backend.grant_cache import GrantCache
from blkif.backend.journal import RingJournal
from blkif.errors import RemoteProtocolError
from blkif.platform import EventChannelClosed, PlatformError
from blkif.request import RequestDecoder, RequestError, ResponseWriter
from blkif.ring import BackRing
from blkif.wakeup import Wakeup

log = logging.getLogger(__name__)

POLL_MS = 200


class RingServer:
    """Serves one shared ring of a connected VBD.

    ``ring_buffer`` is the mapped ring (all its pages); ``port`` the bound
    event channel.  Either call :meth:`service` when the port fires, or let
    :meth:`start` do that on a thread of its own (as the C engine does);
    :meth:`close` releases every mapping this ring holds (not the ring itself).
    """

    def __init__(self, platform, domid, ring_buffer, port, abi, limits, store,
                 persistent=False, label="", max_grants=MAX_PERSISTENT_GRANTS,
                 journal=None, resume=False):
        self.platform = platform
        self.domid = domid
        self.port = port
        self.store = store
        self.ring = BackRing(ring_buffer, abi)
        self.journal = None  # a RingJournal over ``journal``, the ring's region
        self._recover = []  # (journal entry, request bytes) a predecessor left unanswered
        self._entry = 0  # the journal entry of the request in hand
        if journal is not None:
            self.journal = RingJournal(journal, self.ring.size, engine_abi(abi))
            if resume:
                cons, rsp, self._recover = self.journal.resume(self.ring.sring.rsp_prod)
                self.ring.req_cons, self.ring.rsp_prod_pvt = cons, rsp
            else:
                self.journal.start(self.ring.req_cons)
        self.decoder = RequestDecoder(abi, limits)
        self.responses = ResponseWriter(abi)
        self.grants = GrantCache(platform, domid, max_grants) if persistent else None
        self.stats = RingCounters()
        self.label = label
        self.io_mode, self.io_note = "sync", "preadv/pwritev in the ring's thread"
        self.failure = None
        self._thread = self._stop = None

    def service(self):
        """Handle every request now on the ring; returns how many.

        Each batch is pushed with at most one notify; the loop ends only when
        the final check finds the ring empty with ``req_event`` armed, after
        giving the CPU away once: on the sim, where guest and backend share
        the host's CPUs, it made 4 KiB reads at queue depth 32 more than
        twice as fast (docs/bench.md).
        """
        ring = self.ring
        # a killed predecessor may have answered and died before it pushed
        unpublished = ring.rsp_prod_pvt != ring.sring.rsp_prod
        handled = self._recovered() if self._recover or unpublished else 0
        while True:
            pending = ring.pending_requests()
            if not pending and handled:
                os.sched_yield()  # let a frontend we just woke queue more
                pending = ring.pending_requests()
            if not pending:
                if ring.final_check_for_requests():
                    continue
                if self.grants is not None:
                    self.grants.purge()
                    self.grants.clean()
                return handled
            for _ in range(pending):
                self._handle_one()
            handled += pending
            self.stats.batches += 1
            if ring.push_responses():
                self.port.notify()
                self.stats.notifies += 1

    # -- on a thread, like the engine ---------------------------------------

    def start(self, on_error):
        """Serve on a thread: wait for the port, :meth:`service`, repeat."""
        self._stop = Wakeup()
        self._thread = threading.Thread(target=self._serve, args=(on_error,),
                                        name="blkif %s" % self.label, daemon=True)
        self._thread.start()

    def _serve(self, on_error):
        poll = select.poll()
        poll.register(self.port.fileno(), select.POLLIN)
        poll.register(self._stop.fileno(), select.POLLIN)
        try:
            self.service()
            while True:
                ready = dict(poll.poll(POLL_MS))
                if self._stop.fileno() in ready:
                    return
                self.stats.events += 1 if ready else 0
                self.port.clear()
                self.service()
        except EventChannelClosed:
            self.failure = "the frontend closed its event channel"
        except (RemoteProtocolError, PlatformError) as exc:
            self.failure = str(exc)
        on_error(self.failure)

    def stop(self):
        if self._thread is not None:
            self._stop.wake()
            self._thread.join()
            self._stop.close()
            self._thread = None

    def drain(self, timeout=None):
        """After :meth:`stop`: serve what the frontend already queued."""
        if self.failure is None:
            try:
                self.service()
            except (RemoteProtocolError, PlatformError) as exc:
                log.warning("%s: while draining: %s", self.label, exc)

    def set_sectors(self, sectors):
        """The store grew: accept requests up to ``sectors`` from now on."""
        self.decoder.limits.sectors = sectors

    def counters(self):
        stats = self.stats
        if self.grants is not None:
            stats.persistent_grants = len(self.grants)
            stats.grant_hits, stats.grant_misses = self.grants.hits, self.grants.misses
            stats.grant_evictions, stats.grant_purged = self.grants.evictions, self.grants.purged
        return stats

    # -- one request ----------------------------------------------------------

    def _recovered(self):
        """Do and answer what a killed predecessor had taken (journal order
        need not be ring order: answers may have come out of order), and
        publish those answers with any it wrote but did not push."""
        count = len(self._recover)
        for entry, raw in self._recover:  # in ring order
            self._entry = entry
            self.decoder.load(raw)
            self.stats.resumed += 1
            self._handle_one(resumed=True)
        self._recover = []
        if self.ring.push_responses():
            self.port.notify()
            self.stats.notifies += 1
        return count

    def _handle_one(self, resumed=False):
        stats = self.stats
        taken = time.monotonic_ns()
        stats.requests += 1
        stats.in_flight += 1
        if not resumed:
            at = self.ring.req_cons
            raw = self.decoder.copy(self.ring)
            if self.journal is not None:
                self._entry = 0  # one request in hand: the first entry
                self.journal.take(raw, at, 0)
        try:
            req = self.decoder.decode()
        except RequestError as err:
            self._fail(err, taken)
            return
        stats.ops[OP_NAMES[req.kind]] += 1  # an indirect read counts as a read
        if req.kind != req.operation:
            stats.indirect += 1
        try:
            status = self._execute(req)
        except RequestError as err:
            self._fail(err, taken)
            return
        # Answer with what was done (an indirect request's indirect_op), as
        # blkback's make_response does: blkfront checks it against that.
        self._put_response(req.id, req.kind, status)
        stats.in_flight -= 1
        stats.observe(time.monotonic_ns() - taken)

    def _fail(self, err, taken, entry=None):
        log.warning("%s: %s", self.label, err)
        self.stats.errors += 1
        self.stats.in_flight -= 1
        self._put_response(err.id, err.operation, err.status, entry)
        self.stats.observe(time.monotonic_ns() - taken)

    def _put_response(self, id, operation, status, entry=None):
        """The response, and its request's journal entry (``entry``, default
        the one request in hand) freed."""
        at = self.ring.rsp_prod_pvt
        self.responses.put(self.ring, id, operation, status)
        if self.journal is not None:
            self.journal.answered(self._entry if entry is None else entry, at)

    def _execute(self, req):
        kind = req.kind
        try:
            if kind == BLKIF_OP_DISCARD:
                self.store.discard(req.offset, req.nr_sectors * SECTOR_SIZE, req.secure)
                return BLKIF_RSP_OKAY
            if kind in (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER):
                # Everything answered so far is already written: we answer a
                # request only when its I/O is done, so the ring is drained.
                self.store.flush()
            if req.grefs is None:
                self._read_indirect(req)
            if req.grefs:
                self._transfer(req, kind == BLKIF_OP_READ)
            if kind == BLKIF_OP_WRITE_BARRIER and req.grefs:
                self.store.flush()
            return BLKIF_RSP_OKAY
        except OSError as exc:
            log.error("%s: %s of %d sectors at %d failed: %s", self.label,
                      OP_NAMES[kind], req.nr_sectors, req.sector_number, exc.strerror)
            self.stats.errors += 1
            if exc.errno == errno.EOPNOTSUPP:
                return BLKIF_RSP_EOPNOTSUPP
            return BLKIF_RSP_ERROR
        except PlatformError as exc:
            log.warning("%s: request id %d: %s", self.label, req.id, exc)
            self.stats.errors += 1
            return BLKIF_RSP_ERROR

    def _read_indirect(self, req):
        grefs = req.indirect_grefs
        pages = self.grants.pages(grefs) if self.grants is not None else None
        if pages is not None:
            self.decoder.read_indirect(req, pages[0] if len(pages) == 1 else b"".join(pages))
            return
        with self.platform.map_grants(self.domid, grefs, writable=False) as mapping:
            self.decoder.read_indirect(req, mapping.buffer)

    def _transfer(self, req, is_read):
        """preadv/pwritev straight between the store and the granted pages."""
        with self._segments(req, writable=is_read) as iov:
            if is_read:
                self.store.readv(iov, req.offset)
                self.stats.read_bytes += req.nr_sectors * SECTOR_SIZE
            else:
                self.store.writev(iov, req.offset)
                self.stats.write_bytes += req.nr_sectors * SECTOR_SIZE

    @contextlib.contextmanager
    def _segments(self, req, writable):
        """The request's segments as buffers over the granted pages.

        Whole pages (the common case) go as they are: the cached page views
        with persistent grants, else the one buffer of this request's mapping.
        No view outlives the ``with``; a per-request mapping is unmapped then.
        """
        grefs, bounds = req.grefs, req.bounds
        pages = self.grants.pages(grefs) if self.grants is not None else None
        mapping = None
        if pages is None:
            mapping = self.platform.map_grants(self.domid, grefs, writable=writable)
            self.stats.mapped_grants += len(grefs)
            pages = [mapping.buffer]
            if bounds is not None:
                pages = [mapping.buffer[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
                         for i in range(len(grefs))]
        iov = pages
        if bounds is not None:
            iov = [page[offset:offset + length] for page, (offset, length) in zip(pages, bounds)]
        try:
            yield iov
        finally:  # no view of ours may outlive a mapping
            if iov is not pages:
                for view in iov:
                    view.release()
            if mapping is not None:
                if pages[0] is not mapping.buffer:
                    for view in pages:
                        view.release()
                mapping.unmap()

    def close(self):
        """Stop, drop persistent grants and let go of the ring (its owner unmaps it)."""
        self.stop()
        self.ring.release()
        if self.grants is not None:
            self.grants.clear()
