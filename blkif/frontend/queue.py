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

Free pool pages are a stack: the pages a request frees are the next one's,
so a backend with persistent grants keeps mapping the same few pages, and a
request mostly gets a run of consecutive pages, whose data moves with one
slice copy and whose grefs are one list slice.
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
from blkif.request import RequestEncoder, pack_pages
from blkif.ring import FrontRing


class _Shadow:
    """What we remember of a request in flight (blkfront's ``blk_shadow``)."""

    __slots__ = ("tag", "op", "pages", "length", "part", "run")

    def __init__(self, tag, op, pages, length, part, run):
        self.tag, self.op, self.pages = tag, op, pages
        self.length, self.part, self.run = length, part, run  # run: consecutive pages


class Completion:
    """A finished transfer: ``status`` is BLKIF_RSP_*; ``data`` the bytes a
    read brought (its parts joined once the last one is in)."""

    __slots__ = ("tag", "status", "data", "_parts", "_size", "_pieces")

    def __init__(self, tag, parts, size):
        self.tag = tag
        self.status = BLKIF_RSP_OKAY
        self.data = None
        self._parts = parts
        self._size = size  # bytes a read brings; 0 for anything else
        self._pieces = []  # (offset in the transfer, bytes) of a read's parts

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
        self.free_pages = list(range(pool_pages - 1, -1, -1))  # a stack; page 0 on top
        ind_pages = -(-self.segments // BLKIF_SEGS_PER_INDIRECT_FRAME) if self.indirect else 0
        slots = self.ring.size
        # Writable, as blkfront grants them: with persistent grants Linux
        # blkback maps every grant read-write, descriptor pages included
        # (xen_blkbk_map), and fails the request if it cannot.
        self.ind_pool = (platform.grant_pages(backend_domid, slots * ind_pages)
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
            npages = 0 if op == BLKIF_OP_DISCARD else -(-length // PAGE_SIZE)
            if npages > len(self.free_pages):
                break
            self.waiting.popleft()
            self._put(tag, op, offset, length, data, part, npages)
        if self.ring.push_requests():
            self.port.notify()

    def _put(self, tag, op, offset, length, data, part, npages):
        rid = self.free_ids.popleft()
        free = self.free_pages
        pages = free[len(free) - npages:]
        del free[len(free) - npages:]
        pages.reverse()  # the top npages, lowest first
        first = pages[0] if pages else 0
        run = pages == list(range(first, first + npages))  # consecutive pages
        buf, refs = self.pool.buffer, self.pool.refs
        if data is not None:
            if run:
                buf[first * PAGE_SIZE:first * PAGE_SIZE + length] = data
            else:
                for i, p in enumerate(pages):
                    n = min(PAGE_SIZE, length - i * PAGE_SIZE)
                    buf[p * PAGE_SIZE:p * PAGE_SIZE + n] = data[i * PAGE_SIZE:i * PAGE_SIZE + n]
        sector = offset // SECTOR_SIZE
        self.shadow[rid] = _Shadow(tag, op, pages, length, part, run)
        if op == BLKIF_OP_DISCARD:
            self.encoder.discard(self.ring, rid, sector, length // SECTOR_SIZE)
            return
        grefs = refs[first:first + npages] if run else [refs[p] for p in pages]
        tail = (length - (npages - 1) * PAGE_SIZE) // SECTOR_SIZE - 1 if npages else 0
        packed = pack_pages(grefs, tail)
        if self.indirect and op in (BLKIF_OP_READ, BLKIF_OP_WRITE) and (
                npages > BLKIF_MAX_SEGMENTS_PER_REQUEST):
            at = rid * self.ind_pages * PAGE_SIZE
            with self.ind_pool.buffer[at:at + self.ind_pages * PAGE_SIZE] as view:
                self.encoder.write_descriptors(view, packed)
            first_ind = rid * self.ind_pages
            used = -(-npages // BLKIF_SEGS_PER_INDIRECT_FRAME)
            self.encoder.indirect(self.ring, op, rid, sector, npages,
                                  self.ind_pool.refs[first_ind:first_ind + used])
        else:
            self.encoder.rw_packed(self.ring, op, rid, sector, packed)

    def complete(self):
        """Consume every response; returns the transfers that finished.

        Raises RemoteProtocolError for a response whose id is not in flight or
        whose operation is not its request's (Linux blkfront ``blkif_interrupt``):
        the caller fails the device.

        Freed slots and pages may let waiting requests go: :meth:`kick` next."""
        done = []
        while True:
            while self.ring.pending_responses():
                rid, op, status = self.encoder.take_response(self.ring)
                if rid >= len(self.shadow) or self.shadow[rid] is None:
                    raise RemoteProtocolError("response for unknown request id %d" % rid)
                if op != self.shadow[rid].op:  # an indirect request's is its indirect_op
                    raise RemoteProtocolError(
                        "response for request id %d has operation %d, not %d"
                        % (rid, op, self.shadow[rid].op))
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
        if sh.op == BLKIF_OP_READ and comp._size:
            comp._pieces.append((sh.part, self._gather(sh)))
        self.free_pages.extend(reversed(sh.pages))  # back on top, in the same order
        comp._parts -= 1
        if comp._parts:
            return None
        if comp._pieces:
            pieces = comp._pieces
            if len(pieces) == 1:
                comp.data = pieces[0][1]
            else:
                pieces.sort(key=lambda piece: piece[0])
                comp.data = b"".join([data for _, data in pieces])
            comp._pieces = None
        return self.pending.pop(sh.tag)

    def _gather(self, sh):
        """The bytes a read request brought into its pages."""
        buf = self.pool.buffer
        if sh.run:
            at = sh.pages[0] * PAGE_SIZE
            return bytes(buf[at:at + sh.length])
        last = sh.length - (len(sh.pages) - 1) * PAGE_SIZE
        return b"".join([buf[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] for p in sh.pages[:-1]]
                        + [buf[sh.pages[-1] * PAGE_SIZE:sh.pages[-1] * PAGE_SIZE + last]])

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
