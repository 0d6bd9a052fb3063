"""blkif requests and responses, sans-I/O: decode and validate, encode.

Backend side: :class:`RequestDecoder` copies each request out of the shared
ring once (``BackRing.copy_request``) into its own buffer and validates only
that copy, with Linux blkback's rules (``dispatch_rw_block_io``,
``xen_blkbk_parse_indirect``, ``vbd_translate``):

- READ and WRITE carry 1..11 segments; FLUSH_DISKCACHE and WRITE_BARRIER
  0..11 (0 means a pure flush); INDIRECT 1..``max_indirect_segments``
  descriptors in ceil(n / 512) granted pages, for READ or WRITE only.
- Each segment has ``first_sect <= last_sect <= 7``.
- ``sector_number + sectors`` stays inside the device (Python integers cannot
  wrap, so a huge ``sector_number`` simply fails the bound).
- Anything that writes is refused on a read-only device.
- An operation we did not advertise answers EOPNOTSUPP; a malformed request
  answers ERROR.  Either way the caller gets a :class:`RequestError` carrying
  the response to send; nothing a frontend writes can raise anything else.

Frontend side: :class:`RequestEncoder` writes requests into ring slots and
segment descriptors into indirect pages.
"""
from dataclasses import dataclass
from typing import List, NamedTuple, Optional

from blkif.abi import ffi
from blkif.abi.constants import (
    BLKIF_DISCARD_SECURE,
    BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_SEGS_PER_INDIRECT_FRAME,
    OP_NAMES,
    SECTOR_SIZE,
    SECTORS_PER_PAGE,
    SEGMENT_DESCRIPTOR_SIZE,
)
from blkif.errors import LocalProtocolError, RemoteProtocolError

WRITES = frozenset({BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE,
                    BLKIF_OP_DISCARD})


class Segment(NamedTuple):
    """One granted page's part of a transfer, in bytes."""

    gref: int
    offset: int  # first_sect * 512
    length: int  # (last_sect - first_sect + 1) * 512


@dataclass
class Limits:
    """What the backend advertised for one VBD; requests are checked against it."""

    sectors: int
    readonly: bool = False
    flush: bool = True  # feature-flush-cache
    barrier: bool = True  # feature-barrier
    discard: bool = False  # feature-discard
    discard_secure: bool = False  # discard-secure
    max_indirect_segments: int = 0  # feature-max-indirect-segments; 0: none


@dataclass
class Request:
    """A validated request.  ``operation`` is echoed in the response;
    ``kind`` is what to do (the ``indirect_op`` of an indirect request)."""

    id: int
    operation: int
    kind: int
    sector_number: int = 0
    nr_sectors: int = 0
    segments: Optional[List[Segment]] = None  # None until indirect pages are read
    indirect_grefs: Optional[List[int]] = None
    nr_segments: int = 0
    secure: bool = False  # a secure discard

    @property
    def offset(self):
        """Byte offset on the device."""
        return self.sector_number * SECTOR_SIZE


class RequestError(RemoteProtocolError):
    """A request to answer with ``status`` instead of doing it."""

    def __init__(self, id, operation, status, reason):
        super().__init__("request id %d (%s): %s" % (
            id, OP_NAMES.get(operation, "op %d" % operation), reason))
        self.id = id
        self.operation = operation
        self.status = status
        self.reason = reason


def _segment(first_sect, last_sect, gref, req):
    if last_sect >= SECTORS_PER_PAGE or last_sect < first_sect:
        raise RequestError(req.id, req.operation, BLKIF_RSP_ERROR,
                           "bad segment sectors %d..%d" % (first_sect, last_sect))
    return Segment(gref, first_sect * SECTOR_SIZE, (last_sect - first_sect + 1) * SECTOR_SIZE)


class RequestDecoder:
    """Copies requests off a :class:`~blkif.ring.BackRing` and validates them.

    One per ring: it owns the buffer each request is copied into.  Call
    :meth:`take` once per pending request; it returns a :class:`Request` or
    raises :class:`RequestError` (answer it with ``error.status``).  For an
    indirect request, map ``indirect_grefs`` read-only and call
    :meth:`read_indirect` before doing the I/O.
    """

    def __init__(self, abi, limits):
        self.abi = abi
        self.limits = limits
        self._buf = ffi.new("char[]", abi.request_size)
        self._rw = ffi.cast(abi.ctype("request") + " *", self._buf)
        self._discard = ffi.cast(abi.ctype("request_discard") + " *", self._buf)
        self._indirect = ffi.cast(abi.ctype("request_indirect") + " *", self._buf)

    def take(self, ring):
        """Copy the next request off ``ring`` and decode it."""
        ring.copy_request(self._buf)
        return self.decode()

    def decode(self):
        """Validate the request in our buffer (filled by :meth:`take`)."""
        rw = self._rw
        op = rw.operation
        if op in (BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_FLUSH_DISKCACHE,
                  BLKIF_OP_WRITE_BARRIER):
            return self._direct(op, rw)
        if op == BLKIF_OP_INDIRECT:
            return self._indirect_header()
        if op == BLKIF_OP_DISCARD:
            return self._discard_request()
        raise RequestError(rw.id, op, BLKIF_RSP_EOPNOTSUPP, "unsupported operation")

    def _refuse_write(self, req):
        if req.kind in WRITES and self.limits.readonly:
            raise RequestError(req.id, req.operation, BLKIF_RSP_ERROR,
                               "write to a read-only device")

    def _check_range(self, req):
        end = req.sector_number + req.nr_sectors
        if req.nr_sectors and end > self.limits.sectors:
            raise RequestError(
                req.id, req.operation, BLKIF_RSP_ERROR,
                "sectors %d..%d beyond the device's %d" % (
                    req.sector_number, end, self.limits.sectors))

    def _direct(self, op, rw):
        limits = self.limits
        req = Request(rw.id, op, op, rw.sector_number, nr_segments=rw.nr_segments)
        if (op == BLKIF_OP_FLUSH_DISKCACHE and not limits.flush) or (
                op == BLKIF_OP_WRITE_BARRIER and not limits.barrier):
            raise RequestError(req.id, op, BLKIF_RSP_EOPNOTSUPP, "not advertised")
        nseg = rw.nr_segments
        lowest = 1 if op in (BLKIF_OP_READ, BLKIF_OP_WRITE) else 0
        if not lowest <= nseg <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
            raise RequestError(req.id, op, BLKIF_RSP_ERROR, "bad segment count %d" % nseg)
        self._refuse_write(req)
        seg = rw.seg
        req.segments = [_segment(seg[i].first_sect, seg[i].last_sect, seg[i].gref, req)
                        for i in range(nseg)]
        req.nr_sectors = sum(s.length for s in req.segments) // SECTOR_SIZE
        self._check_range(req)
        return req

    def _indirect_header(self):
        ind = self._indirect
        limits = self.limits
        req = Request(ind.id, BLKIF_OP_INDIRECT, ind.indirect_op, ind.sector_number,
                      nr_segments=ind.nr_segments)
        if not limits.max_indirect_segments:
            raise RequestError(req.id, req.operation, BLKIF_RSP_EOPNOTSUPP,
                               "indirect descriptors not advertised")
        if req.kind not in (BLKIF_OP_READ, BLKIF_OP_WRITE):
            raise RequestError(req.id, req.operation, BLKIF_RSP_ERROR,
                               "indirect operation %d is not read or write" % req.kind)
        if not 1 <= req.nr_segments <= limits.max_indirect_segments:
            raise RequestError(req.id, req.operation, BLKIF_RSP_ERROR,
                               "bad indirect segment count %d (max %d)" % (
                                   req.nr_segments, limits.max_indirect_segments))
        self._refuse_write(req)
        pages = -(-req.nr_segments // BLKIF_SEGS_PER_INDIRECT_FRAME)
        req.indirect_grefs = [ind.indirect_grefs[i] for i in range(pages)]
        return req

    def read_indirect(self, req, pages):
        """Fill ``req.segments`` from the mapped indirect ``pages`` (a buffer).

        Each descriptor is copied once out of the shared pages, then checked.
        """
        n = req.nr_segments
        local = ffi.new("struct blkif_request_segment[]", n)
        ffi.memmove(local, ffi.from_buffer(pages), n * SEGMENT_DESCRIPTOR_SIZE)
        req.segments = [_segment(d.first_sect, d.last_sect, d.gref, req) for d in local]
        req.nr_sectors = sum(s.length for s in req.segments) // SECTOR_SIZE
        self._check_range(req)
        return req

    def _discard_request(self):
        d = self._discard
        limits = self.limits
        req = Request(d.id, BLKIF_OP_DISCARD, BLKIF_OP_DISCARD, d.sector_number,
                      d.nr_sectors, secure=bool(d.flag & BLKIF_DISCARD_SECURE))
        if not limits.discard:
            raise RequestError(req.id, req.operation, BLKIF_RSP_EOPNOTSUPP,
                               "discard not advertised")
        if req.secure and not limits.discard_secure:
            raise RequestError(req.id, req.operation, BLKIF_RSP_EOPNOTSUPP,
                               "secure discard not advertised")
        self._refuse_write(req)
        self._check_range(req)
        return req


class ResponseWriter:
    """Writes responses into a BackRing's slots (one per ring)."""

    def __init__(self, abi):
        self._ctype = abi.ctype("response") + " *"

    def put(self, ring, id, operation, status):
        rsp = ffi.cast(self._ctype, ring.response_slot())
        rsp.id = id
        rsp.operation = operation
        rsp.status = status
        ring.advance()


class RequestEncoder:
    """Frontend side: write requests into a FrontRing and indirect pages."""

    def __init__(self, abi):
        self.abi = abi
        self._rw = abi.ctype("request") + " *"
        self._discard = abi.ctype("request_discard") + " *"
        self._indirect = abi.ctype("request_indirect") + " *"
        self._response = ffi.new(abi.ctype("response") + " *")

    def rw(self, ring, operation, id, sector_number, segments, handle=0):
        """A direct request: ``segments`` are (gref, first_sect, last_sect)."""
        if len(segments) > BLKIF_MAX_SEGMENTS_PER_REQUEST:
            raise LocalProtocolError("%d segments in a direct request" % len(segments))
        req = ffi.cast(self._rw, ring.request_slot())
        req.operation = operation
        req.nr_segments = len(segments)
        req.handle = handle
        req.id = id
        req.sector_number = sector_number
        for i, (gref, first, last) in enumerate(segments):
            req.seg[i].gref = gref
            req.seg[i].first_sect = first
            req.seg[i].last_sect = last
        ring.advance()

    def indirect(self, ring, indirect_op, id, sector_number, nr_segments,
                 indirect_grefs, handle=0):
        """An indirect request whose descriptors are already in the granted pages."""
        if not 0 < len(indirect_grefs) <= BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST:
            raise LocalProtocolError("%d indirect pages" % len(indirect_grefs))
        req = ffi.cast(self._indirect, ring.request_slot())
        req.operation = BLKIF_OP_INDIRECT
        req.indirect_op = indirect_op
        req.nr_segments = nr_segments
        req.id = id
        req.sector_number = sector_number
        req.handle = handle
        for i, gref in enumerate(indirect_grefs):
            req.indirect_grefs[i] = gref
        ring.advance()

    @staticmethod
    def write_descriptors(pages, segments):
        """Write (gref, first_sect, last_sect) descriptors into indirect ``pages``."""
        n = len(segments)
        desc = ffi.cast("struct blkif_request_segment *", ffi.from_buffer(pages))
        if n * SEGMENT_DESCRIPTOR_SIZE > len(pages):
            raise LocalProtocolError("%d descriptors overflow the indirect pages" % n)
        for i, (gref, first, last) in enumerate(segments):
            desc[i].gref = gref
            desc[i].first_sect = first
            desc[i].last_sect = last

    def discard(self, ring, id, sector_number, nr_sectors, secure=False, handle=0):
        req = ffi.cast(self._discard, ring.request_slot())
        req.operation = BLKIF_OP_DISCARD
        req.flag = BLKIF_DISCARD_SECURE if secure else 0
        req.handle = handle
        req.id = id
        req.sector_number = sector_number
        req.nr_sectors = nr_sectors
        ring.advance()

    def take_response(self, ring):
        """Copy the next response off ``ring``: (id, operation, status)."""
        ring.copy_response(self._response)
        rsp = self._response
        return rsp.id, rsp.operation, rsp.status
