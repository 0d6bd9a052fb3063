"""Request decoding and validation: one table of cases for each rule, a
round trip from the frontend's encoder to the backend's decoder for both
ABIs, and random bytes that must never escape as anything but RequestError."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blkif.abi import X86_32, X86_64, constants as c, ffi
from blkif.request import Limits, RequestDecoder, RequestEncoder, RequestError, Segment
from blkif.ring import BackRing, FrontRing

ABIS = [X86_64, X86_32]
SECTORS = 2048  # a 1 MiB device
FULL = Limits(sectors=SECTORS, discard=True, discard_secure=True, max_indirect_segments=256)


def rings(abi):
    buf = bytearray(4096)
    return FrontRing(buf, abi), BackRing(buf, abi)


def roundtrip(abi, limits, write):
    """Encode with ``write(encoder, front)``, push, and decode one request."""
    front, back = rings(abi)
    write(RequestEncoder(abi), front)
    front.push_requests()
    assert back.pending_requests() == 1
    return RequestDecoder(abi, limits).take(back)


@pytest.mark.parametrize("abi", ABIS)
def test_read_with_eleven_segments(abi):
    segs = [(100 + i, i % 8, 7) for i in range(11)]
    req = roundtrip(abi, FULL, lambda e, f: e.rw(f, c.BLKIF_OP_READ, 2**63 + 5, 8, segs))
    assert (req.id, req.operation, req.kind, req.sector_number) == (2**63 + 5, 0, 0, 8)
    assert req.segments[0] == Segment(100, 0, 4096)
    assert req.segments[3] == Segment(103, 3 * 512, 5 * 512)
    assert req.nr_sectors == sum(8 - (i % 8) for i in range(11))


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("op", [c.BLKIF_OP_FLUSH_DISKCACHE, c.BLKIF_OP_WRITE_BARRIER])
def test_flush_and_barrier_may_have_no_segments(abi, op):
    req = roundtrip(abi, FULL, lambda e, f: e.rw(f, op, 9, 0, []))
    assert (req.kind, req.segments, req.nr_sectors) == (op, [], 0)


@pytest.mark.parametrize("abi", ABIS)
def test_indirect_request_and_its_descriptors(abi):
    decoder = RequestDecoder(abi, FULL)
    front, back = rings(abi)
    enc = RequestEncoder(abi)
    page = bytearray(4096)
    segs = [(1000 + i, 0, 7) for i in range(256)]
    enc.write_descriptors(page, segs)
    enc.indirect(front, c.BLKIF_OP_WRITE, 77, 0, 256, [55])
    front.push_requests()
    req = decoder.take(back)
    assert (req.operation, req.kind, req.indirect_grefs, req.segments) == (
        c.BLKIF_OP_INDIRECT, c.BLKIF_OP_WRITE, [55], None)
    decoder.read_indirect(req, page)
    assert req.segments[255] == Segment(1255, 0, 4096)
    assert req.nr_sectors == 256 * 8


@pytest.mark.parametrize("abi", ABIS)
def test_discard_round_trip(abi):
    req = roundtrip(abi, FULL, lambda e, f: e.discard(f, 3, 100, 50, secure=True))
    assert (req.kind, req.sector_number, req.nr_sectors, req.secure) == (
        c.BLKIF_OP_DISCARD, 100, 50, True)


ERR, NOTSUP = c.BLKIF_RSP_ERROR, c.BLKIF_RSP_EOPNOTSUPP
R, W = c.BLKIF_OP_READ, c.BLKIF_OP_WRITE
RO = Limits(sectors=SECTORS, readonly=True, discard=True, max_indirect_segments=256)
BARE = Limits(sectors=SECTORS, flush=False, barrier=False)
K4 = Limits(sectors=SECTORS, discard=True, max_indirect_segments=256, sector_size=4096)

# (name, limits, encode, expected status, words in the reason)
BAD = [
    ("read of no segments", FULL, lambda e, f: e.rw(f, R, 1, 0, []), ERR, "segment count 0"),
    ("write of no segments", FULL, lambda e, f: e.rw(f, W, 1, 0, []), ERR, "segment count 0"),
    ("last_sect 8", FULL, lambda e, f: e.rw(f, R, 1, 0, [(1, 0, 8)]), ERR, "bad segment"),
    ("first after last", FULL, lambda e, f: e.rw(f, R, 1, 0, [(1, 5, 4)]), ERR, "bad segment"),
    ("past the end", FULL, lambda e, f: e.rw(f, R, 1, SECTORS - 7, [(1, 0, 7)]), ERR, "beyond"),
    ("wraps 2**64", FULL, lambda e, f: e.rw(f, R, 1, 2**64 - 4, [(1, 0, 7)]), ERR, "beyond"),
    ("write read-only", RO, lambda e, f: e.rw(f, W, 1, 0, [(1, 0, 7)]), ERR, "read-only"),
    ("flush read-only", RO, lambda e, f: e.rw(f, c.BLKIF_OP_FLUSH_DISKCACHE, 1, 0, []),
     ERR, "read-only"),
    ("discard read-only", RO, lambda e, f: e.discard(f, 1, 0, 8), ERR, "read-only"),
    ("discard past end", FULL, lambda e, f: e.discard(f, 1, SECTORS, 1), ERR, "beyond"),
    ("discard off", BARE, lambda e, f: e.discard(f, 1, 0, 8), NOTSUP, "discard"),
    ("secure discard read-only", RO, lambda e, f: e.discard(f, 1, 0, 8, secure=True), ERR,
     "read-only"),
    ("flush off", BARE, lambda e, f: e.rw(f, c.BLKIF_OP_FLUSH_DISKCACHE, 1, 0, []), NOTSUP,
     "not advertised"),
    ("barrier off", BARE, lambda e, f: e.rw(f, c.BLKIF_OP_WRITE_BARRIER, 1, 0, []), NOTSUP,
     "not advertised"),
    ("indirect off", BARE, lambda e, f: e.indirect(f, R, 1, 0, 20, [1]), NOTSUP, "indirect"),
    ("indirect flush", FULL, lambda e, f: e.indirect(f, c.BLKIF_OP_FLUSH_DISKCACHE, 1, 0, 1,
                                                     [1]), ERR, "not read or write"),
    ("indirect 0 segs", FULL, lambda e, f: e.indirect(f, R, 1, 0, 0, [1]), ERR, "count 0"),
    ("indirect too many", FULL, lambda e, f: e.indirect(f, R, 1, 0, 257, [1]), ERR,
     "count 257"),
    ("indirect write read-only", RO, lambda e, f: e.indirect(f, W, 1, 0, 8, [1]), ERR,
     "read-only"),
    ("4k: start not whole", K4, lambda e, f: e.rw(f, R, 1, 4, [(1, 0, 7)]), ERR,
     "not whole 4096-byte"),
    ("4k: length not whole", K4, lambda e, f: e.rw(f, W, 1, 8, [(1, 0, 7), (2, 0, 3)]), ERR,
     "not whole 4096-byte"),
    ("4k: discard not whole", K4, lambda e, f: e.discard(f, 1, 8, 4), ERR,
     "not whole 4096-byte"),
    ("4k: flush data not whole", K4,
     lambda e, f: e.rw(f, c.BLKIF_OP_FLUSH_DISKCACHE, 1, 0, [(1, 0, 0)]), ERR,
     "not whole 4096-byte"),
]


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("name,limits,encode,status,reason", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_an_error_with_its_id(abi, name, limits, encode, status, reason):
    with pytest.raises(RequestError) as err:
        roundtrip(abi, limits, encode)
    assert (err.value.id, err.value.status) == (1, status)
    assert reason in err.value.reason


@pytest.mark.parametrize("abi", ABIS)
def test_bad_indirect_request_is_answered_with_its_indirect_op(abi):
    """blkback answers with indirect_op; Linux blkfront fails the disk on 6."""
    for encode in (lambda e, f: e.indirect(f, W, 1, 0, 257, [1]),
                   lambda e, f: e.indirect(f, W, 1, 0, 1, [1])):
        with pytest.raises(RequestError) as err:
            roundtrip(abi, RO, encode)
        assert err.value.operation == W


@pytest.mark.parametrize("abi", ABIS)
def test_secure_flag_is_ignored_unless_offered(abi):
    """blkif.h: discard-secure=0 means the flag is ignored, not refused."""
    plain = Limits(sectors=SECTORS, discard=True)
    req = roundtrip(abi, plain, lambda e, f: e.discard(f, 3, 100, 50, secure=True))
    assert (req.kind, req.secure) == (c.BLKIF_OP_DISCARD, False)


@pytest.mark.parametrize("abi", ABIS)
@pytest.mark.parametrize("op", [c.BLKIF_OP_RESERVED_1, 7, 200, 255])
def test_unknown_operation_is_eopnotsupp_echoing_id_and_op(abi, op):
    def encode(e, f):
        e.rw(f, R, 4242, 0, [(1, 0, 7)])
        ffi.cast(abi.ctype("request") + " *", f.slot(0)).operation = op

    with pytest.raises(RequestError) as err:
        roundtrip(abi, FULL, encode)
    assert (err.value.id, err.value.operation, err.value.status) == (4242, op, NOTSUP)


@pytest.mark.parametrize("abi", ABIS)
def test_bad_indirect_descriptor(abi):
    decoder = RequestDecoder(abi, FULL)
    front, back = rings(abi)
    enc = RequestEncoder(abi)
    page = bytearray(4096)
    enc.write_descriptors(page, [(5, 0, 7)] * 9 + [(5, 3, 9)])
    enc.indirect(front, R, 31, 0, 10, [9])
    front.push_requests()
    req = decoder.take(back)
    with pytest.raises(RequestError, match="bad segment sectors 3..9") as err:
        decoder.read_indirect(req, page)
    assert err.value.id == 31


def test_indirect_beyond_device_checked_after_descriptors():
    decoder = RequestDecoder(X86_64, FULL)
    front, back = rings(X86_64)
    page = bytearray(4096)
    RequestEncoder.write_descriptors(page, [(1, 0, 7)] * 2)
    RequestEncoder(X86_64).indirect(front, R, 1, SECTORS - 8, 2, [3])
    front.push_requests()
    req = decoder.take(back)
    with pytest.raises(RequestError, match="beyond"):
        decoder.read_indirect(req, page)


@pytest.mark.parametrize("abi", ABIS)
@settings(max_examples=400, deadline=None)
@given(op=st.integers(0, 8) | st.integers(0, 255), rest=st.binary(min_size=111, max_size=111),
       descriptors=st.binary(max_size=2048))
def test_random_bytes_decode_or_raise_request_error_only(abi, op, rest, descriptors):
    raw = bytes([op]) + rest
    page = descriptors.ljust(4096, b"\0")
    front, back = rings(abi)
    ffi.memmove(front.request_slot(), raw, abi.request_size)
    front.advance()
    front.push_requests()
    decoder = RequestDecoder(abi, FULL)
    try:
        req = decoder.take(back)
        if req.segments is None:
            decoder.read_indirect(req, page)
    except RequestError as err:
        assert err.status in (ERR, NOTSUP)
        return
    # A pure flush (no sectors) has no range; anything else is inside the device.
    assert req.nr_sectors == 0 or req.sector_number + req.nr_sectors <= SECTORS
    for seg in req.segments:
        assert 0 <= seg.offset < seg.offset + seg.length <= 4096


@pytest.mark.parametrize("abi", ABIS)
@settings(max_examples=200, deadline=None)
@given(
    op=st.sampled_from([R, W]),
    id=st.integers(0, 2**64 - 1),
    segs=st.lists(
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 7), st.integers(0, 7))
        .map(lambda t: (t[0], min(t[1], t[2]), max(t[1], t[2]))),
        min_size=1, max_size=11),
    sector=st.integers(0, SECTORS - 88),
)
def test_what_the_encoder_writes_the_decoder_reads(abi, op, id, segs, sector):
    req = roundtrip(abi, FULL, lambda e, f: e.rw(f, op, id, sector, segs))
    assert (req.id, req.kind, req.sector_number) == (id, op, sector)
    assert [(s.gref, s.offset // 512, (s.offset + s.length) // 512 - 1)
            for s in req.segments] == segs


@pytest.mark.parametrize("abi", ABIS)
def test_4k_device_takes_whole_logical_sectors(abi):
    """Sectors stay 512 bytes on the wire; 8 of them at a multiple of 8 is one 4 KiB sector."""
    req = roundtrip(abi, K4, lambda e, f: e.rw(f, R, 1, 16, [(1, 0, 7), (2, 0, 7)]))
    assert (req.sector_number, req.nr_sectors) == (16, 16)
    flush = roundtrip(abi, K4, lambda e, f: e.rw(f, c.BLKIF_OP_FLUSH_DISKCACHE, 2, 3, []))
    assert flush.nr_sectors == 0  # a pure flush moves no data: nothing to align
    assert roundtrip(abi, K4, lambda e, f: e.discard(f, 3, 8, 16)).nr_sectors == 16
