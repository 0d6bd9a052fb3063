"""The backend datapath for one ring (Linux: xen-blkback/blkback.c).

:meth:`RingServer.service` is one batch: consume every request on the ring,
do its I/O directly into the mapped grant pages (``preadv``/``pwritev``, no
copies), write all responses, push them once and notify at most once, then
look again (``RING_FINAL_CHECK_FOR_REQUESTS``) so no request is left behind.

A bad request gets an error response with its id (``RequestError``).  Only a
frontend that overruns the ring raises out of :meth:`service`
(RemoteProtocolError): the caller shuts that device down, nothing else.

Grants are mapped per request, all of its segments in one call, read-only
for writes.  With persistent grants each gref is mapped once, kept in a
bounded cache and reused, as Linux does with ``max_persistent_grants``;
indirect descriptor pages too (read-only), as blkback maps them through the
same cache.  The hot path allocates little: a request's pages come out of the
cache in one comprehension, and whole pages (the common case) go to
``preadv``/``pwritev`` as they are, without a view per segment.
"""
import errno
import logging
import os

from blkif.abi.constants import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    OP_NAMES,
    PAGE_SIZE,
    SECTOR_SIZE,
)
from blkif.platform import PlatformError
from blkif.request import RequestDecoder, RequestError, ResponseWriter
from blkif.ring import BackRing

log = logging.getLogger(__name__)

MAX_PERSISTENT_GRANTS = 1056  # Linux xen_blkif_max_pgrants
KINDS = (BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE,
         BLKIF_OP_DISCARD)  # what a request does; indirect ones are counted apart too


class Stats:
    """Counters for one VBD, summed over its rings (``blkif stats``)."""

    FIELDS = ("requests", "indirect", "errors", "read_bytes", "write_bytes", "batches",
              "notifies")

    def __init__(self):
        self.ops = {OP_NAMES[op]: 0 for op in KINDS}
        for name in self.FIELDS:
            setattr(self, name, 0)
        self.in_flight = 0
        self.persistent_grants = 0
        self.mapped_grants = 0

    def as_dict(self):
        out = {name: getattr(self, name) for name in self.FIELDS}
        out.update(ops=dict(self.ops), in_flight=self.in_flight,
                   persistent_grants=self.persistent_grants,
                   mapped_grants=self.mapped_grants)
        return out


class RingServer:
    """Serves one shared ring of a connected VBD.

    ``ring_buffer`` is the mapped ring (all its pages); ``port`` the bound
    event channel.  The caller waits on ``port`` and calls :meth:`service`;
    :meth:`close` releases every mapping this ring holds (not the ring itself).
    """

    def __init__(self, platform, domid, ring_buffer, port, abi, limits, store,
                 persistent=False, stats=None, label=""):
        self.platform = platform
        self.domid = domid
        self.port = port
        self.store = store
        self.ring = BackRing(ring_buffer, abi)
        self.decoder = RequestDecoder(abi, limits)
        self.responses = ResponseWriter(abi)
        # Persistent grants: (gref, writable) -> its one-page Mapping, and each
        # page's view by gref (data pages writable, indirect pages read-only).
        self.persistent = {} if persistent else None
        self._data_pages = {}
        self._indirect_pages = {}
        self.stats = stats or Stats()
        self.label = label

    def service(self):
        """Handle every request now on the ring; returns how many.

        Each batch is pushed with at most one notify; the loop ends only when
        the final check finds the ring empty with ``req_event`` armed, after
        giving the CPU away once (see below): on the sim, where guest and
        backend share the host's CPUs, it made 4 KiB reads at queue depth 32
        more than twice as fast, at half the CPU time per request
        (docs/bench.md).
        """
        ring = self.ring
        handled = 0
        while True:
            pending = ring.pending_requests()
            if not pending and handled:
                # Before arming req_event and sleeping, let the frontend run:
                # our notify may just have woken it on this very CPU (socket
                # wake-ups are "sync", and the scheduler puts the woken task
                # beside its waker); what it queues meanwhile is served in
                # this same wake-up, with no notify from it and none for us.
                os.sched_yield()
                pending = ring.pending_requests()
            if not pending:
                if ring.final_check_for_requests():
                    continue
                return handled
            for _ in range(pending):
                self._handle_one()
            handled += pending
            self.stats.batches += 1
            if ring.push_responses():
                self.port.notify()
                self.stats.notifies += 1

    def _handle_one(self):
        stats = self.stats
        stats.requests += 1
        stats.in_flight += 1
        try:
            req = self.decoder.take(self.ring)
        except RequestError as err:
            self._fail(err)
            return
        stats.ops[OP_NAMES[req.kind]] += 1  # an indirect read counts as a read
        if req.kind != req.operation:
            stats.indirect += 1
        try:
            status = self._execute(req)
        except RequestError as err:
            self._fail(err, req.kind)
            return
        # Answer with what was done (an indirect request's indirect_op), as
        # blkback's make_response does: blkfront checks it against that.
        self.responses.put(self.ring, req.id, req.kind, status)
        stats.in_flight -= 1

    def _fail(self, err, operation=None):
        log.warning("%s: %s", self.label, err)
        self.stats.errors += 1
        self.stats.in_flight -= 1
        self.responses.put(self.ring, err.id, err.operation if operation is None else operation,
                           err.status)

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
        pages = self._cached(self._indirect_pages, grefs, writable=False)
        if pages is not None:  # persistent: mapped once, read-only
            self.decoder.read_indirect(req, pages[0] if len(pages) == 1 else b"".join(pages))
            return
        with self.platform.map_grants(self.domid, grefs, writable=False) as mapping:
            self.decoder.read_indirect(req, mapping.buffer)

    def _cached(self, cache, grefs, writable):
        """The pages of ``grefs`` from persistent ``cache`` (mapping those not
        yet there), or None: no persistent grants, or the cache is full."""
        if self.persistent is None:
            return None
        try:
            return [cache[gref] for gref in grefs]  # the hot path: all there
        except KeyError:
            pass
        for gref in grefs:
            if gref not in cache:
                if len(self.persistent) >= MAX_PERSISTENT_GRANTS:
                    return None
                mapping = self.platform.map_grants(self.domid, [gref], writable=writable)
                self.persistent[(gref, writable)] = mapping
                cache[gref] = mapping.buffer
                self.stats.persistent_grants += 1
        return [cache[gref] for gref in grefs]

    def _transfer(self, req, is_read):
        """preadv/pwritev straight between the store and the granted pages.

        Whole pages (the common case) go as they are: the cached page views
        with persistent grants, else the one buffer of this request's mapping.
        """
        grefs, bounds = req.grefs, req.bounds
        pages = self._cached(self._data_pages, grefs, writable=True)
        mapping = None
        if pages is None:
            mapping = self.platform.map_grants(self.domid, grefs, writable=is_read)
            self.stats.mapped_grants += len(grefs)
            pages = [mapping.buffer]
            if bounds is not None:
                pages = [mapping.buffer[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
                         for i in range(len(grefs))]
        iov = pages
        if bounds is not None:
            iov = [page[offset:offset + length] for page, (offset, length) in zip(pages, bounds)]
        try:
            if is_read:
                self.store.readv(iov, req.offset)
                self.stats.read_bytes += req.nr_sectors * SECTOR_SIZE
            else:
                self.store.writev(iov, req.offset)
                self.stats.write_bytes += req.nr_sectors * SECTOR_SIZE
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
        """Drop persistent grants and let go of the ring (its owner unmaps it)."""
        self.ring.release()
        if self.persistent:
            self._data_pages.clear()
            self._indirect_pages.clear()
            for mapping in self.persistent.values():
                mapping.unmap()
            self.stats.persistent_grants -= len(self.persistent)
            self.persistent.clear()
