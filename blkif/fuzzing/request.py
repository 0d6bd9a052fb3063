"""Fuzz target: one request slot and its indirect pages, as the ring server
takes them (``RequestDecoder.take`` off a ring, ``read_indirect``, the answer
through ``ResponseWriter``), and the C engine's decoder on the same bytes.

The input is laid out as ``csrc/fuzz_engine.c``'s, so one corpus seeds both:
byte 0 picks the ABI (bit 0), the device size (bits 1-2), the advertised
indirect segments (bits 3-5) and the logical sector (bit 6: 4096, else 512);
byte 1 the features (bits: read-only, flush,
barrier, discard, discard-secure); then one request slot; then up to eight
indirect pages, zero-padded.

Rules checked on every input:

- nothing escapes but :class:`RequestError`;
- an accepted request does only what was advertised, inside the device,
  on whole logical sectors, with 1..11 segments (0..11 for a flush or barrier) or 1..max indirect
  ones in ceil(n / 512) pages, each segment inside its page on sector
  bounds, the segments adding up to ``nr_sectors``;
- a refused one is answered ERROR or EOPNOTSUPP, and the response the
  frontend reads carries the request's ``id`` and its operation (an
  indirect request's ``indirect_op``);
- the C decoder gives the same verdict, field for field.
"""
from blkif.abi import X86_32, X86_64, constants as c, ffi, lib
from blkif.fuzzing import BrokenRule
from blkif.request import WRITES, Limits, RequestDecoder, RequestError, ResponseWriter
from blkif.ring import BackRing, FrontRing

SECTORS = (0, 8, 2048, 2**64 - 1)  # fuzz_engine.c's tables
INDIRECT = (0, 1, 11, 32, 256, 512, 513, 4096)
MAX_PAGES = c.BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST
PAGE = c.PAGE_SIZE
MAX_SEGS = c.BLKIF_MAX_INDIRECT_SEGMENTS


def limits_from(b0, b1):
    return Limits(sectors=SECTORS[b0 >> 1 & 3], max_indirect_segments=INDIRECT[b0 >> 3 & 7],
                  readonly=bool(b1 & 1), flush=bool(b1 & 2), barrier=bool(b1 & 4),
                  discard=bool(b1 & 8), discard_secure=bool(b1 & 16),
                  sector_size=4096 if b0 & 0x40 else 512)


class _Ring:
    """A one-page ring for one ABI, reused: the frontend puts the slot, the
    server takes it and answers, the frontend reads the answer."""

    def __init__(self, abi):
        buf = bytearray(PAGE)
        self.abi = abi
        self.front, self.back = FrontRing(buf, abi), BackRing(buf, abi)
        self.writer = ResponseWriter(abi)
        self.response = ffi.new(abi.ctype("response") + " *")

    def exchange(self, slot, decoder, answer):
        """Put ``slot`` on the ring, ``answer(decoder.take(back))`` -> (id, op,
        status) to write back; the response the frontend reads."""
        self.front.put_request(slot)
        self.front.push_requests()
        if self.back.pending_requests() != 1:
            raise BrokenRule("one request pushed, %d pending" % self.back.pending_requests())
        self.writer.put(self.back, *answer(decoder))
        self.back.push_responses()
        if self.front.pending_responses() != 1:
            raise BrokenRule("one response pushed, %d pending" % self.front.pending_responses())
        self.front.copy_response(self.response)
        return self.response.id, self.response.operation, self.response.status


RINGS = {}
DECODERS = {}


def python_verdict(abi, b0, b1, slot, pages):
    """("error", status, operation, id) or ("ok", fields...), through a ring."""
    key = (abi.tag, b0 & 0x7F, b1 & 0x1F)
    decoder = DECODERS.get(key)
    if decoder is None:
        decoder = DECODERS[key] = RequestDecoder(abi, limits_from(b0, b1))
    ring = RINGS.get(abi.tag) or RINGS.setdefault(abi.tag, _Ring(abi))
    outcome = {}

    def answer(dec):
        try:
            req = dec.take(ring.back)
            if req.operation == c.BLKIF_OP_INDIRECT:
                dec.read_indirect(req, pages[:len(req.indirect_grefs) * PAGE])
        except RequestError as err:
            outcome["error"] = err
            return err.id, err.operation, err.status
        outcome["request"] = req
        return req.id, req.kind, c.BLKIF_RSP_OKAY

    response = ring.exchange(slot, decoder, answer)
    if "error" in outcome:
        err = outcome["error"]
        _check_refusal(abi, slot, err, response)
        return ("error", err.status, err.operation, err.id)
    req = outcome["request"]
    _check_accepted(decoder.limits, req)
    n = len(req.grefs or [])
    return ("ok", req.id, req.operation, req.kind, req.sector_number, req.nr_sectors,
            req.nr_segments if n else 0, list(req.grefs or []), req.bounds if n else None,
            req.secure)


def _check_refusal(abi, slot, err, response):
    op = slot[0]
    ctype = {c.BLKIF_OP_INDIRECT: "request_indirect", c.BLKIF_OP_DISCARD: "request_discard"}
    raw = ffi.cast(abi.ctype(ctype.get(op, "request")) + " *", ffi.from_buffer(slot))
    want_op = raw.indirect_op if op == c.BLKIF_OP_INDIRECT else op
    if err.status not in (c.BLKIF_RSP_ERROR, c.BLKIF_RSP_EOPNOTSUPP):
        raise BrokenRule("refused with status %d" % err.status)
    if (err.id, err.operation) != (raw.id, want_op):
        raise BrokenRule("refusal of id %d op %d names id %d op %d"
                         % (raw.id, want_op, err.id, err.operation))
    if response != (raw.id, want_op, err.status):
        raise BrokenRule("response %r for refused id %d op %d" % (response, raw.id, want_op))


def _check_accepted(limits, req):
    kind = req.kind
    if limits.readonly and kind in WRITES:
        raise BrokenRule("%r accepted on a read-only device" % req)
    advertised = {c.BLKIF_OP_READ: True, c.BLKIF_OP_WRITE: True,
                  c.BLKIF_OP_FLUSH_DISKCACHE: limits.flush,
                  c.BLKIF_OP_WRITE_BARRIER: limits.barrier, c.BLKIF_OP_DISCARD: limits.discard}
    if not advertised.get(kind) or (req.operation == c.BLKIF_OP_INDIRECT
                                    and not limits.max_indirect_segments):
        raise BrokenRule("%r accepted, not advertised" % req)
    if req.nr_sectors and req.sector_number + req.nr_sectors > limits.sectors:
        raise BrokenRule("%r ends past the device's %d sectors" % (req, limits.sectors))
    per = limits.sector_size // 512
    if req.nr_sectors and (req.sector_number % per or req.nr_sectors % per):
        raise BrokenRule("%r is not whole %d-byte sectors" % (req, limits.sector_size))
    if req.secure and not limits.discard_secure:
        raise BrokenRule("secure discard accepted, not advertised")
    if kind == c.BLKIF_OP_DISCARD:
        return
    if req.operation == c.BLKIF_OP_INDIRECT:
        pages = -(-req.nr_segments // c.BLKIF_SEGS_PER_INDIRECT_FRAME)
        if not 1 <= req.nr_segments <= limits.max_indirect_segments or (
                len(req.indirect_grefs) != pages or pages > MAX_PAGES):
            raise BrokenRule("%r: %d indirect pages" % (req, len(req.indirect_grefs)))
    elif not (1 if kind in (c.BLKIF_OP_READ, c.BLKIF_OP_WRITE) else 0) <= req.nr_segments <= 11:
        raise BrokenRule("%r: segment count" % req)
    segments = req.segments
    if len(segments) != req.nr_segments:
        raise BrokenRule("%r: %d segments decoded" % (req, len(segments)))
    sectors = 0
    for seg in segments:
        if seg.length <= 0 or seg.offset % 512 or seg.length % 512 or (
                seg.offset + seg.length > PAGE):
            raise BrokenRule("%r: segment %r outside its page" % (req, seg))
        sectors += seg.length // 512
    if sectors != req.nr_sectors:
        raise BrokenRule("%r: segments add up to %d sectors" % (req, sectors))


def c_verdict(abi, limits, slot, pages):
    """The C engine's decoder on the same bytes, in :func:`python_verdict`'s shape
    (tests/test_engine.py's differential test uses it too)."""
    lim = ffi.new("struct eng_limits *", {
        "sectors": limits.sectors, "readonly": limits.readonly, "flush": limits.flush,
        "barrier": limits.barrier, "discard": limits.discard,
        "discard_secure": limits.discard_secure, "sector_size": limits.sector_size,
        "max_indirect_segments": limits.max_indirect_segments})
    out = ffi.new("struct eng_request *")
    grefs, bounds = ffi.new("uint32_t[]", MAX_SEGS), ffi.new("uint32_t[]", 2 * MAX_SEGS)
    code = lib.ENG_ABI_X86_32 if abi is X86_32 else lib.ENG_ABI_X86_64
    if lib.eng_decode(code, lim, slot, out, grefs, bounds) < 0:
        return ("error", out.status, out.kind, out.id)
    if out.operation == c.BLKIF_OP_INDIRECT:
        keep = [ffi.from_buffer(pages[at:at + PAGE]) for at in range(0, len(pages), PAGE)]
        if lib.eng_decode_indirect(lim, out, ffi.new("char *[]", keep or [ffi.NULL]), grefs,
                                   bounds) < 0:
            return ("error", out.status, out.kind, out.id)
    n = out.nr_segments if out.kind != c.BLKIF_OP_DISCARD else 0
    segs = None if out.whole_pages else [(bounds[2 * i], bounds[2 * i + 1]) for i in range(n)]
    return ("ok", out.id, out.operation, out.kind, out.sector_number, out.nr_sectors,
            out.nr_segments if n else 0, list(grefs[0:n]), segs if n else None,
            bool(out.secure))


def test_one_input(data):
    if len(data) < 2:
        return
    abi = X86_32 if data[0] & 1 else X86_64
    size = abi.request_size
    if len(data) < 2 + size:
        return
    slot = bytes(data[2:2 + size])
    pages = bytes(data[2 + size:2 + size + MAX_PAGES * PAGE]).ljust(MAX_PAGES * PAGE, b"\0")
    py = python_verdict(abi, data[0], data[1], slot, pages)
    cv = c_verdict(abi, limits_from(data[0], data[1]), slot, pages)
    if py != cv:
        raise BrokenRule("the decoders disagree:\n  python %r\n  c      %r" % (py, cv))
