"""One frontend ring (Linux: a blkfront ``blkfront_ring_info``).

:class:`FrontQueue` turns block I/O into blkif requests and responses back
into results.  Data moves through a pool of pages granted once to the backend
(persistent grants when the backend agrees; otherwise the backend maps and
unmaps them per request).  A transfer that does not fit one request is split:
11 pages per direct request, or up to ``indirect_segments`` pages per indirect
request whose descriptors sit in their own granted pages.

Nothing here waits on its own: :meth:`submit_*` queue requests and return a
tag, :meth:`kick` pushes them (notifying if the ring says so), and
:meth:`complete` consumes responses; :class:`blkif.frontend.device` waits.
"""
import collections

from blkif.abi.constants import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_OKAY,
    BLKIF_SEGS_PER_INDIRECT_FRAME,
    PAGE_SIZE,
    SECTOR_SIZE,
)
from blkif.errors import LocalProtocolError, RemoteProtocolError
from blkif.request import RequestEncoder
from blkif.ring import FrontRing


class _Shadow:
    """What we remember of a request in flight (blkfront's ``blk_shadow``)."""

    __slots__ = ("tag", "op", "pages", "length", "part")

    def __init__(self, tag, op, pages, length, part):
        self.tag, self.op, self.pages = tag, op, pages
        self.length, self.part = length, part


class Completion:
    """A finished transfer: ``status`` is BLKIF_RSP_*; ``data`` for reads."""

    __slots__ = ("tag", "status", "data", "_parts")

    def __init__(self, tag, parts, size):
        self.tag = tag
        self.status = BLKIF_RSP_OKAY
        self.data = bytearray(size) if size else None
        self._parts = parts

    @property
    def ok(self):
        return self.status == BLKIF_RSP_OKAY


class FrontQueue:
    """A ring granted to ``backend_domid`` with its event channel and page pool.

    ``pool_pages`` bounds the data in flight; ``indirect_segments`` is what
    was negotiated (0: direct requests only).
    """

    def __init__(self, platform, backend_domid, abi, ring_page_order=0,
                 indirect_segments=0, pool_pages=512):
        self.platform = platform
        self.abi = abi
        self.ring_grant = platform.grant_pages(backend_domid, 1 << ring_page_order)
        self.ring = FrontRing(self.ring_grant.buffer, abi)
        self.port = platform.evtchn_alloc_unbound(backend_domid)
        self.encoder = RequestEncoder(abi)
        self.segments = indirect_segments or BLKIF_MAX_SEGMENTS_PER_REQUEST
        self.indirect = bool(indirect_segments)
        pool_pages = max(pool_pages, self.segments)
        self.pool = platform.grant_pages(backend_domid, pool_pages)
        self.free_pages = collections.deque(range(pool_pages))
        ind_pages = -(-self.segments // BLKIF_SEGS_PER_INDIRECT_FRAME) if self.indirect else 0
        slots = self.ring.size
        self.ind_pool = (platform.grant_pages(backend_domid, slots * ind_pages, readonly=True)
                         if ind_pages else None)
        self.ind_pages = ind_pages
        self.free_ids = collections.deque(range(slots))
        self.shadow = [None] * slots
        self.waiting = collections.deque()  # requests not yet on the ring
        self.pending = {}  # tag -> Completion
        self._next_tag = 0

    @property
    def ring_refs(self):
        return self.ring_grant.refs

    def _tag(self, parts, size):
        self._next_tag += 1
        self.pending[self._next_tag] = Completion(self._next_tag, parts, size)
        return self._next_tag

    def _split(self, op, offset, length, data):
        if offset % SECTOR_SIZE or length % SECTOR_SIZE or length <= 0:
            raise LocalProtocolError("I/O of %d bytes at %d is not whole sectors"
                                     % (length, offset))
        chunk = self.segments * PAGE_SIZE
        parts = -(-length // chunk)
        tag = self._tag(parts, length if op == BLKIF_OP_READ else 0)
        for i in range(parts):
            start = i * chunk
            n = min(chunk, length - start)
            piece = data[start:start + n] if data is not None else None
            self.waiting.append((tag, op, offset + start, n, piece, start))
        return tag

    def submit_read(self, offset, length):
        return self._split(BLKIF_OP_READ, offset, length, None)

    def submit_write(self, offset, data):
        return self._split(BLKIF_OP_WRITE, offset, len(data), memoryview(data))

    def submit_flush(self, operation=BLKIF_OP_FLUSH_DISKCACHE):
        """A cache flush; ``operation`` BLKIF_OP_WRITE_BARRIER for a backend
        that offers only feature-barrier (an empty barrier, as blkfront's)."""
        if operation not in (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER):
            raise LocalProtocolError("operation %d is not a flush" % operation)
        tag = self._tag(1, 0)
        self.waiting.append((tag, operation, 0, 0, None, 0))
        return tag

    def submit_discard(self, offset, length):
        tag = self._tag(1, 0)
        self.waiting.append((tag, BLKIF_OP_DISCARD, offset, length, None, 0))
        return tag

    def kick(self):
        """Put waiting requests on the ring while slots and pages last; push."""
        while self.waiting and not self.ring.full() and self.free_ids:
            tag, op, offset, length, data, part = self.waiting[0]
            npages = -(-length // PAGE_SIZE)
            if npages > len(self.free_pages):
                break
            self.waiting.popleft()
            self._put(tag, op, offset, length, data, part, npages)
        if self.ring.push_requests():
            self.port.notify()

    def _put(self, tag, op, offset, length, data, part, npages):
        rid = self.free_ids.popleft()
        pages = [self.free_pages.popleft() for _ in range(npages)]
        buf, refs = self.pool.buffer, self.pool.refs
        if data is not None:
            for i, p in enumerate(pages):
                n = min(PAGE_SIZE, length - i * PAGE_SIZE)
                buf[p * PAGE_SIZE:p * PAGE_SIZE + n] = data[i * PAGE_SIZE:i * PAGE_SIZE + n]
        sector = offset // SECTOR_SIZE
        segs = [(refs[p], 0, (min(PAGE_SIZE, length - i * PAGE_SIZE) - 1) // SECTOR_SIZE)
                for i, p in enumerate(pages)]
        self.shadow[rid] = _Shadow(tag, op, pages, length, part)
        if op == BLKIF_OP_DISCARD:
            self.encoder.discard(self.ring, rid, sector, length // SECTOR_SIZE)
        elif self.indirect and op in (BLKIF_OP_READ, BLKIF_OP_WRITE) and (
                len(segs) > BLKIF_MAX_SEGMENTS_PER_REQUEST):
            first = rid * self.ind_pages
            view = self.ind_pool.buffer[first * PAGE_SIZE:(first + self.ind_pages) * PAGE_SIZE]
            self.encoder.write_descriptors(view, segs)
            view.release()
            grefs = self.ind_pool.refs[first:first + -(-len(segs) // BLKIF_SEGS_PER_INDIRECT_FRAME)]
            self.encoder.indirect(self.ring, op, rid, sector, len(segs), grefs)
        else:
            self.encoder.rw(self.ring, op, rid, sector, segs)

    def complete(self):
        """Consume every response; returns the transfers that finished.

        Freed slots and pages may let waiting requests go: :meth:`kick` next."""
        done = []
        while True:
            while self.ring.pending_responses():
                rid, _, status = self.encoder.take_response(self.ring)
                if rid >= len(self.shadow) or self.shadow[rid] is None:
                    raise RemoteProtocolError("response for unknown request id %d" % rid)
                finished = self._finish(rid, status)
                if finished:
                    done.append(finished)
            if not self.ring.final_check_for_responses():
                break
        return done

    def _finish(self, rid, status):
        sh = self.shadow[rid]
        self.shadow[rid] = None
        self.free_ids.append(rid)
        comp = self.pending[sh.tag]
        if status != BLKIF_RSP_OKAY:
            comp.status = status
        if sh.op == BLKIF_OP_READ and comp.data is not None:
            buf = self.pool.buffer
            for i, p in enumerate(sh.pages):
                n = min(PAGE_SIZE, sh.length - i * PAGE_SIZE)
                at = sh.part + i * PAGE_SIZE
                comp.data[at:at + n] = buf[p * PAGE_SIZE:p * PAGE_SIZE + n]
        self.free_pages.extend(sh.pages)
        comp._parts -= 1
        if comp._parts:
            return None
        return self.pending.pop(sh.tag)

    def fail_all(self, status):
        """The backend went away: every transfer in flight or waiting fails."""
        done = list(self.pending.values())
        for comp in done:
            comp.status = status
        self.pending.clear()
        self.waiting.clear()
        return done

    def close(self):
        self.ring.release()
        for thing in (self.port, self.ring_grant, self.pool, self.ind_pool):
            if thing is not None:
                thing.close()
