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
- Sectors are 512 bytes whatever the device's (blkif.h); on a device of
  larger logical sectors (``sector-size`` 4096) ``sector_number`` and the
  sector count must be whole logical sectors, as blkback checks in
  ``dispatch_rw_block_io`` (discards too: the kernel refuses them otherwise).
- Anything that writes is refused on a read-only device.
- An operation we did not advertise answers EOPNOTSUPP; a malformed request
  answers ERROR.  Either way the caller gets a :class:`RequestError` carrying
  the response to send (an indirect request's carries its ``indirect_op``);
  nothing a frontend writes can raise anything else.
- A discard's secure flag counts only where ``discard-secure`` was offered.

Frontend side: :class:`RequestEncoder` writes requests into ring slots and
segment descriptors into indirect pages.

Segments travel in bulk, not one object each: a request's descriptors are
copied out as bytes and unpacked by one Struct, (gref, first_sect,
last_sect) per segment, then split with strided slices; the common case
(every segment a whole page) is checked with two ``count`` calls.  :class:`Request`
keeps ``grefs`` and, only when some segment is not a whole page, ``bounds``;
``Request.segments`` builds :class:`Segment` tuples on demand.
"""
import functools
import itertools
import struct
from dataclasses import dataclass
from typing import NamedTuple

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
    PAGE_SIZE,
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
    sector_size: int = SECTOR_SIZE  # sector-size: the device's logical sector, in bytes


class Request:
    """A validated request.  ``operation`` is echoed in the response;
    ``kind`` is what to do (the ``indirect_op`` of an indirect request).

    Its pages: ``grefs``, one per segment in order (None for an indirect
    request until :meth:`RequestDecoder.read_indirect`), and ``bounds``:
    None when every segment is a whole page, else ``(offset, length)`` in
    bytes per segment.
    """

    __slots__ = ("id", "operation", "kind", "sector_number", "nr_sectors", "nr_segments",
                 "grefs", "bounds", "indirect_grefs", "secure")

    def __init__(self, id, operation, kind, sector_number=0, nr_sectors=0, nr_segments=0,
                 secure=False):
        self.id, self.operation, self.kind = id, operation, kind
        self.sector_number, self.nr_sectors, self.nr_segments = (
            sector_number, nr_sectors, nr_segments)
        self.secure = secure  # a secure discard
        self.grefs = self.bounds = self.indirect_grefs = None

    @property
    def offset(self):
        """Byte offset on the device."""
        return self.sector_number * SECTOR_SIZE

    @property
    def segments(self):
        """[:class:`Segment`], or None until an indirect request's pages are read."""
        if self.grefs is None:
            return None
        if self.bounds is None:
            return [Segment(gref, 0, PAGE_SIZE) for gref in self.grefs]
        return [Segment(gref, *where) for gref, where in zip(self.grefs, self.bounds)]

    def __repr__(self):
        return "<Request id %d %s %d+%d sectors, %d segments>" % (
            self.id, OP_NAMES.get(self.kind, self.kind), self.sector_number, self.nr_sectors,
            self.nr_segments)


class RequestError(RemoteProtocolError):
    """A request to answer with ``status`` instead of doing it."""

    def __init__(self, id, operation, status, reason):
        super().__init__("request id %d (%s): %s" % (
            id, OP_NAMES.get(operation, "op %d" % operation), reason))
        self.id = id
        self.operation = operation
        self.status = status
        self.reason = reason


_SEG = "struct blkif_request_segment"
_WHOLE = SECTORS_PER_PAGE - 1  # last_sect of a whole page


@functools.lru_cache(maxsize=128)
def _descriptors(n):
    """The Struct of ``n`` (at most one page of) descriptors: (gref,
    first_sect, last_sect) each."""
    fields = [("gref", "I"), ("first_sect", "B"), ("last_sect", "B")]
    one, at = "", 0
    for name, code in fields:
        offset = ffi.offsetof(_SEG, name)
        one += "%dx" % (offset - at) if offset > at else ""
        one += code
        at = offset + struct.calcsize("=" + code)
    one += "%dx" % (SEGMENT_DESCRIPTOR_SIZE - at)
    return struct.Struct("=" + one * n)


def _unpack(raw):
    """(gref, first_sect, last_sect, gref, ...) of the descriptors in ``raw``."""
    page = BLKIF_SEGS_PER_INDIRECT_FRAME * SEGMENT_DESCRIPTOR_SIZE
    if len(raw) <= page:
        return _descriptors(len(raw) // SEGMENT_DESCRIPTOR_SIZE).unpack(raw)
    flat = []
    for at in range(0, len(raw), page):
        piece = raw[at:at + page]
        flat += _descriptors(len(piece) // SEGMENT_DESCRIPTOR_SIZE).unpack(piece)
    return flat


def _pack(flat):
    """Descriptors from (gref, first_sect, last_sect, gref, ...) ``flat``."""
    step = BLKIF_SEGS_PER_INDIRECT_FRAME * 3
    if len(flat) <= step:
        return _descriptors(len(flat) // 3).pack(*flat)
    return b"".join(_descriptors(len(flat[at:at + step]) // 3).pack(*flat[at:at + step])
                    for at in range(0, len(flat), step))


def _fill_segments(req, raw):
    """``req.grefs``, ``bounds`` and ``nr_sectors`` from descriptors ``raw``
    (bytes, our own copy); RequestError (answered with ``req.kind``) for a
    bad ``first_sect..last_sect``."""
    n = len(raw) // SEGMENT_DESCRIPTOR_SIZE
    flat = _unpack(raw)
    req.grefs = list(flat[0::3])
    firsts, lasts = flat[1::3], flat[2::3]
    if firsts.count(0) == n and lasts.count(_WHOLE) == n:
        req.bounds = None  # whole pages, the common case
        req.nr_sectors = n * SECTORS_PER_PAGE
        return
    bounds, sectors = [], 0
    for first, last in zip(firsts, lasts):
        if last >= SECTORS_PER_PAGE or last < first:
            raise RequestError(req.id, req.kind, BLKIF_RSP_ERROR,
                               "bad segment sectors %d..%d" % (first, last))
        bounds.append((first * SECTOR_SIZE, (last - first + 1) * SECTOR_SIZE))
        sectors += last - first + 1
    req.bounds = bounds
    req.nr_sectors = sectors


def pack_segments(segments):
    """Descriptors for ``segments`` [(gref, first_sect, last_sect)], as bytes."""
    try:
        return _pack(list(itertools.chain.from_iterable(segments)))
    except struct.error as exc:
        raise LocalProtocolError("bad segment in %r: %s" % (segments, exc)) from None


def pack_pages(grefs, last_sect=_WHOLE):
    """Descriptors for whole pages ``grefs``, the last one ending at ``last_sect``."""
    n = len(grefs)
    flat = [0, 0, _WHOLE] * n
    flat[0::3] = grefs
    if n:
        flat[-1] = last_sect
    return _pack(flat)


def _reader(ctype, fields):
    """A Struct reading ``fields`` [(name, format)], in offset order, of
    ``ctype`` in one call, at the offsets cffi gives (so it holds per ABI)."""
    fmt, at = "=", 0
    for name, code in fields:
        offset = ffi.offsetof(ctype, name)
        assert offset >= at, "fields out of order"
        fmt += "%dx" % (offset - at) if offset > at else ""
        fmt += code
        at = offset + struct.calcsize("=" + code)
    return struct.Struct(fmt)


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
        self._raw = ffi.buffer(self._buf)
        self._operation = ffi.cast("uint8_t *", self._buf)  # at offset 0 in every layout
        rw, ind, disc = abi.ctype("request"), abi.ctype("request_indirect"), abi.ctype(
            "request_discard")
        self._rw = _reader(rw, [("operation", "B"), ("nr_segments", "B"), ("id", "Q"),
                                ("sector_number", "Q")])
        self._seg_at = ffi.offsetof(rw, "seg")
        self._indirect = _reader(ind, [("indirect_op", "B"), ("nr_segments", "H"),
                                       ("id", "Q"), ("sector_number", "Q")])
        self._indirect_grefs = ffi.offsetof(ind, "indirect_grefs")
        self._discard = _reader(disc, [("flag", "B"), ("id", "Q"), ("sector_number", "Q"),
                                       ("nr_sectors", "Q")])

    def take(self, ring):
        """Copy the next request off ``ring`` and decode it."""
        ring.copy_request(self._buf)
        return self.decode()

    def copy(self, ring):
        """Copy the next request off ``ring`` for :meth:`decode`; its bytes
        (a view of our buffer, valid until the next copy)."""
        ring.copy_request(self._buf)
        return self._raw

    def load(self, raw):
        """Put a request's bytes (a journal's copy) in our buffer for :meth:`decode`."""
        ffi.memmove(self._buf, raw, self.abi.request_size)

    def decode(self):
        """Validate the request in our buffer (filled by :meth:`take`)."""
        op = self._operation[0]
        if op in (BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_FLUSH_DISKCACHE,
                  BLKIF_OP_WRITE_BARRIER):
            return self._direct(op)
        if op == BLKIF_OP_INDIRECT:
            return self._indirect_header()
        if op == BLKIF_OP_DISCARD:
            return self._discard_request()
        _, _, id, _ = self._rw.unpack_from(self._raw)
        raise RequestError(id, op, BLKIF_RSP_EOPNOTSUPP, "unsupported operation")

    def _refuse_write(self, req):
        if req.kind in WRITES and self.limits.readonly:
            raise RequestError(req.id, req.kind, BLKIF_RSP_ERROR,
                               "write to a read-only device")

    def _check_range(self, req):
        if not req.nr_sectors:
            return
        end = req.sector_number + req.nr_sectors
        if end > self.limits.sectors:
            raise RequestError(
                req.id, req.kind, BLKIF_RSP_ERROR,
                "sectors %d..%d beyond the device's %d" % (
                    req.sector_number, end, self.limits.sectors))
        mask = self.limits.sector_size // SECTOR_SIZE - 1
        if (req.sector_number | req.nr_sectors) & mask:
            raise RequestError(
                req.id, req.kind, BLKIF_RSP_ERROR,
                "sectors %d..%d are not whole %d-byte sectors" % (
                    req.sector_number, end, self.limits.sector_size))

    def _direct(self, op):
        limits = self.limits
        _, nseg, id, sector_number = self._rw.unpack_from(self._raw)
        req = Request(id, op, op, sector_number, nr_segments=nseg)
        if (op == BLKIF_OP_FLUSH_DISKCACHE and not limits.flush) or (
                op == BLKIF_OP_WRITE_BARRIER and not limits.barrier):
            raise RequestError(id, op, BLKIF_RSP_EOPNOTSUPP, "not advertised")
        lowest = 1 if op in (BLKIF_OP_READ, BLKIF_OP_WRITE) else 0
        if not lowest <= nseg <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
            raise RequestError(id, op, BLKIF_RSP_ERROR, "bad segment count %d" % nseg)
        self._refuse_write(req)
        at = self._seg_at
        _fill_segments(req, self._raw[at:at + nseg * SEGMENT_DESCRIPTOR_SIZE])
        self._check_range(req)
        return req

    def _indirect_header(self):
        limits = self.limits
        kind, nseg, id, sector_number = self._indirect.unpack_from(self._raw)
        req = Request(id, BLKIF_OP_INDIRECT, kind, sector_number, nr_segments=nseg)
        # Every answer to an indirect request carries its indirect_op, as
        # blkback's; Linux blkfront fails the whole disk on any other.
        if not limits.max_indirect_segments:
            raise RequestError(id, kind, BLKIF_RSP_EOPNOTSUPP,
                               "indirect descriptors not advertised")
        if kind not in (BLKIF_OP_READ, BLKIF_OP_WRITE):
            raise RequestError(id, kind, BLKIF_RSP_ERROR,
                               "indirect operation %d is not read or write" % kind)
        if not 1 <= nseg <= limits.max_indirect_segments:
            raise RequestError(id, kind, BLKIF_RSP_ERROR,
                               "bad indirect segment count %d (max %d)" % (
                                   nseg, limits.max_indirect_segments))
        self._refuse_write(req)
        pages = -(-nseg // BLKIF_SEGS_PER_INDIRECT_FRAME)
        at = self._indirect_grefs
        req.indirect_grefs = memoryview(self._raw[at:at + 4 * pages]).cast("I").tolist()
        return req

    def read_indirect(self, req, pages):
        """Fill ``req``'s segments from the mapped indirect ``pages`` (a buffer).

        The descriptors are copied once out of the shared pages, then checked.
        """
        size = req.nr_segments * SEGMENT_DESCRIPTOR_SIZE
        with memoryview(pages) as view:
            if view.nbytes < size:
                raise LocalProtocolError("%d bytes of indirect pages for %d descriptors"
                                         % (view.nbytes, req.nr_segments))
            raw = bytes(view[:size])
        _fill_segments(req, raw)
        self._check_range(req)
        return req

    def _discard_request(self):
        limits = self.limits
        flag, id, sector_number, nr_sectors = self._discard.unpack_from(self._raw)
        # blkif.h: the secure flag is ignored unless discard-secure was offered.
        req = Request(id, BLKIF_OP_DISCARD, BLKIF_OP_DISCARD, sector_number, nr_sectors,
                      secure=bool(flag & BLKIF_DISCARD_SECURE) and limits.discard_secure)
        if not limits.discard:
            raise RequestError(id, req.operation, BLKIF_RSP_EOPNOTSUPP,
                               "discard not advertised")
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
    """Frontend side: write requests into a FrontRing and indirect pages.

    Segments are given as [(gref, first_sect, last_sect)] or already packed
    (:func:`pack_segments`, :func:`pack_pages`: one memmove, no per-segment
    field writes).
    """

    def __init__(self, abi):
        self.abi = abi
        self._rw = abi.ctype("request") + " *"
        self._discard = abi.ctype("request_discard") + " *"
        self._indirect = abi.ctype("request_indirect") + " *"
        self._response = ffi.new(abi.ctype("response") + " *")
        self._seg_at = ffi.offsetof(abi.ctype("request"), "seg")

    def rw(self, ring, operation, id, sector_number, segments, handle=0):
        """A direct request: ``segments`` are (gref, first_sect, last_sect)."""
        if len(segments) > BLKIF_MAX_SEGMENTS_PER_REQUEST:
            raise LocalProtocolError("%d segments in a direct request" % len(segments))
        self.rw_packed(ring, operation, id, sector_number, pack_segments(segments), handle)

    def rw_packed(self, ring, operation, id, sector_number, packed, handle=0):
        """A direct request whose descriptors are ``packed``."""
        nseg = len(packed) // SEGMENT_DESCRIPTOR_SIZE
        if nseg > BLKIF_MAX_SEGMENTS_PER_REQUEST:
            raise LocalProtocolError("%d segments in a direct request" % nseg)
        slot = ring.request_slot()
        req = ffi.cast(self._rw, slot)
        req.operation = operation
        req.nr_segments = nseg
        req.handle = handle
        req.id = id
        req.sector_number = sector_number
        ffi.memmove(slot + self._seg_at, packed, len(packed))
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
        """Write (gref, first_sect, last_sect) descriptors into indirect ``pages``,
        or descriptors already packed."""
        packed = segments if isinstance(segments, (bytes, bytearray)) else pack_segments(
            segments)
        with memoryview(pages) as view:
            if len(packed) > view.nbytes:
                raise LocalProtocolError("%d descriptors overflow the indirect pages"
                                         % (len(packed) // SEGMENT_DESCRIPTOR_SIZE))
            view[:len(packed)] = packed

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
