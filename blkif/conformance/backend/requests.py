"""Backend cases: requests and responses (blkif.h "Request/Response
definitions", ``blkif_request``, ``blkif_request_segment``,
``blkif_request_indirect``, ``blkif_request_discard``).

Data written is read back through the ring and compared; sector numbers are
always 512-byte units, whatever ``sector-size`` says.
"""
import os

from blkif.abi.constants import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST as MAX_SEGMENTS,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    BLKIF_SEGS_PER_INDIRECT_FRAME,
    PAGE_SIZE,
)
from blkif.conformance.catalogue import INFO, MUST, SHOULD, Failed, Skipped, group
from blkif.request import pack_pages

case = group("backend", "requests")

OKAY, ERROR, NOTSUP = BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP
STATUS = {OKAY: "OKAY", ERROR: "ERROR", NOTSUP: "EOPNOTSUPP"}


def expect_answer(got, op, status):
    """Failed unless response ``got`` (operation, status) is ``op``/``status``
    (a status tuple allows any of them)."""
    statuses = status if isinstance(status, tuple) else (status,)
    if got[0] != op or got[1] not in statuses:
        raise Failed("answered operation %d status %s; expected operation %d status %s"
                     % (got[0], STATUS.get(got[1], got[1]), op,
                        "/".join(STATUS[s] for s in statuses)))


def _write_pages(peer, sector, data, op=BLKIF_OP_WRITE):
    """Write ``data`` (whole pages, from pool pages 0..) at ``sector``."""
    n = len(data) // PAGE_SIZE
    peer.q.pool.buffer[:len(data)] = data
    refs = [peer.gref(i) for i in range(n)]
    return peer.one(lambda enc, ring: enc.rw(ring, op, 1, sector, [(r, 0, 7) for r in refs]))


def read_pages(peer, sector, n, first_page=20):
    """Read ``n`` pages at ``sector`` into pool pages ``first_page``..; the bytes."""
    refs = [peer.gref(first_page + i) for i in range(n)]
    got = peer.one(lambda enc, ring: enc.rw(ring, BLKIF_OP_READ, 2, sector,
                                            [(r, 0, 7) for r in refs]))
    expect_answer(got, BLKIF_OP_READ, OKAY)
    return bytes(peer.q.pool.buffer[first_page * PAGE_SIZE:(first_page + n) * PAGE_SIZE])


def _round_trip(peer, sector, pages):
    data = os.urandom(pages * PAGE_SIZE)
    expect_answer(_write_pages(peer, sector, data), BLKIF_OP_WRITE, OKAY)
    if read_pages(peer, sector, pages) != data:
        raise Failed("read back %d page(s) at sector %d differ from what was written"
                     % (pages, sector))


@case("req-1", "blkif.h: BLKIF_OP_WRITE, BLKIF_OP_READ", MUST,
      title="1 segment written and read back",
      sends="a WRITE of one whole page at sector 8, then a READ of it",
      expects="both OKAY, the same bytes back",
      why="the smallest useful transfer")
def _(peer):
    peer.connect(pool_pages=32)
    _round_trip(peer, 8, 1)


@case("req-2", "blkif.h: BLKIF_MAX_SEGMENTS_PER_REQUEST", MUST,
      title="11 segments written and read back",
      sends="a WRITE of 11 whole pages, then a READ of them",
      expects="both OKAY, the same bytes back",
      why="11 is the most a direct request carries")
def _(peer):
    peer.connect(pool_pages=32)
    _round_trip(peer, 64, MAX_SEGMENTS)


def _bad(case_id, clause, title, sends, build):
    @case(case_id, clause, MUST, title=title, sends=sends,
          expects="a response with the request's id and operation, status ERROR; "
                  "the VBD keeps serving",
          why="a malformed request fails alone (blkback: dispatch_rw_block_io fail_response)")
    def _(peer):
        peer.connect(pool_pages=32)
        ref = peer.gref(0)
        expect_answer(peer.one(lambda enc, ring: build(peer, enc, ring, ref)), BLKIF_OP_READ, ERROR)
        peer.alive()


def _twelve(peer, enc, ring, ref):
    enc.rw(ring, BLKIF_OP_READ, 3, 0, [(ref, 0, 7)] * MAX_SEGMENTS)
    peer.request().nr_segments = MAX_SEGMENTS + 1


_bad("req-3", "blkif.h: BLKIF_MAX_SEGMENTS_PER_REQUEST", "12 segments in a direct request",
     "a READ with nr_segments 12", _twelve)
_bad("req-4", "blkif.h: blkif_request_segment (first_sect <= last_sect)",
     "first_sect after last_sect", "a READ of one segment with first_sect 5, last_sect 2",
     lambda peer, enc, ring, ref: enc.rw(ring, BLKIF_OP_READ, 4, 0, [(ref, 5, 2)]))
_bad("req-5", "blkif.h: blkif_request_segment (last_sect <= 7)", "last_sect 8",
     "a READ of one segment with last_sect 8",
     lambda peer, enc, ring, ref: enc.rw(ring, BLKIF_OP_READ, 5, 0, [(ref, 0, 8)]))
_bad("req-6", "blkif.h: BLKIF_OP_READ (nr_segments >= 1)", "a read without segments",
     "a READ with nr_segments 0",
     lambda peer, enc, ring, ref: enc.rw(ring, BLKIF_OP_READ, 6, 0, []))


@case("req-7", "blkif.h: blkif_request_segment (first_sect, last_sect); sector_number",
      MUST, title="part of a page, at 512-byte sector units",
      sends="a WRITE of sector 3 of a page (first_sect 3 = last_sect) at sector 101, then a "
            "READ of two pages at sector 96",
      expects="the 512 bytes at offset 3*512 of the page land at byte 101*512 of the disk",
      why="sector_number and first/last_sect count 512-byte sectors always "
          "(Unikraft once used sector-size units)")
def _(peer):
    disk = peer.connect(pool_pages=32)
    if disk.sector_size != 512:
        raise Skipped("sector-size %d: see req-8" % disk.sector_size)
    page = os.urandom(PAGE_SIZE)
    peer.q.pool.buffer[:PAGE_SIZE] = page
    ref = peer.gref(0)
    expect_answer(peer.one(lambda enc, ring: enc.rw(ring, BLKIF_OP_WRITE, 7, 101, [(ref, 3, 3)])),
            BLKIF_OP_WRITE, OKAY)
    back = read_pages(peer, 96, 2)
    if back[5 * 512:6 * 512] != page[3 * 512:4 * 512]:
        raise Failed("sector 3 of the page did not land at sector 101")


@case("req-8", "blkif.h: sector-size; sector_number in 512-byte units", MUST,
      title="512-byte sector numbers whatever sector-size is",
      sends="a WRITE of one page at sector 8 + sector-size/512, a READ of two pages at 8",
      expects="the page starts sector-size bytes into the read",
      why="blkif.h (Xen 4.20): sector_number is in 512-byte units even on 4 KiB-sector "
          "disks")
def _(peer):
    disk = peer.connect(pool_pages=32)
    k = disk.sector_size // 512
    data = os.urandom(PAGE_SIZE)
    expect_answer(_write_pages(peer, 8 + k, data), BLKIF_OP_WRITE, OKAY)
    if read_pages(peer, 8, 2)[k * 512:k * 512 + PAGE_SIZE] != data:
        raise Failed("with sector-size %d the page was not at byte %d"
                     % (disk.sector_size, k * 512))
    return "sector-size %d" % disk.sector_size


@case("req-9", "blkif.h: sectors", MUST,
      title="the last sector",
      sends="a READ of one sector (first_sect 0 = last_sect) at sectors - 1",
      expects="OKAY",
      why="the disk's end is inclusive of its last sector")
def _(peer):
    disk = peer.connect(pool_pages=32)
    ref = peer.gref(0)
    expect_answer(peer.one(lambda enc, ring: enc.rw(ring, BLKIF_OP_READ, 9, disk.sectors - 1,
                                              [(ref, 0, 0)])), BLKIF_OP_READ, OKAY)


@case("req-10", "blkif.h: sectors", MUST,
      title="past the end of the disk",
      sends="a READ of one page at sectors - 4, and one at sector 2**64 - 8",
      expects="both ERROR; the VBD keeps serving",
      why="a transfer must stay inside the disk; a huge sector number must not wrap")
def _(peer):
    disk = peer.connect(pool_pages=32)
    ref = peer.gref(0)

    def build(enc, ring):
        enc.rw(ring, BLKIF_OP_READ, 1, disk.sectors - 4, [(ref, 0, 7)])
        enc.rw(ring, BLKIF_OP_READ, 2, 2**64 - 8, [(ref, 0, 7)])
    got = peer.exchange(build)
    for rid in (1, 2):
        expect_answer(got[rid], BLKIF_OP_READ, ERROR)
    peer.alive()


@case("req-11", "blkif.h: BLKIF_RSP_EOPNOTSUPP", MUST,
      title="an unknown operation",
      sends="a request with operation 99",
      expects="a response with id and operation 99 echoed, status not OKAY",
      why="a frontend matches responses by id; an unknown operation must not be done")
def _(peer):
    peer.connect()
    ref = peer.gref(0)
    got = peer.one(lambda enc, ring: enc.rw(ring, 99, 11, 0, [(ref, 0, 7)]))
    expect_answer(got, 99, (NOTSUP, ERROR))
    peer.alive()
    return "status %s" % STATUS.get(got[1], got[1])


@case("req-12", "blkif.h: BLKIF_RSP_EOPNOTSUPP", SHOULD,
      title="an unknown operation is EOPNOTSUPP",
      sends="a request with operation 99",
      expects="status EOPNOTSUPP (Linux blkback: dispatch_other_io)",
      why="EOPNOTSUPP tells the frontend not to retry")
def _(peer):
    peer.connect()
    ref = peer.gref(0)
    expect_answer(peer.one(lambda enc, ring: enc.rw(ring, 99, 12, 0, [(ref, 0, 7)])), 99, NOTSUP)


@case("req-13", "blkif.h: BLKIF_OP_FLUSH_DISKCACHE, feature-flush-cache", MUST,
      title="flush: done when offered, EOPNOTSUPP when not",
      sends="a FLUSH_DISKCACHE without segments",
      expects="OKAY with feature-flush-cache=1, else EOPNOTSUPP",
      why="blkif.h: an operation the backend did not advertise answers EOPNOTSUPP")
def _(peer):
    peer.connect()
    offered = peer.read_back("feature-flush-cache") == "1"
    got = peer.one(lambda enc, ring: enc.rw(ring, BLKIF_OP_FLUSH_DISKCACHE, 13, 0, []))
    expect_answer(got, BLKIF_OP_FLUSH_DISKCACHE, OKAY if offered else NOTSUP)
    return "offered" if offered else "not offered"


@case("req-14", "blkif.h: BLKIF_OP_WRITE_BARRIER, feature-barrier", MUST,
      title="barrier: a write done when offered, EOPNOTSUPP when not",
      sends="a WRITE_BARRIER of one page, then a READ of it",
      expects="OKAY and the data there with feature-barrier=1, else EOPNOTSUPP",
      why="a barrier is a write plus ordering; the flush case (req-13) is separate")
def _(peer):
    peer.connect(pool_pages=32)
    offered = peer.read_back("feature-barrier") == "1"
    data = os.urandom(PAGE_SIZE)
    got = _write_pages(peer, 24, data, BLKIF_OP_WRITE_BARRIER)
    expect_answer(got, BLKIF_OP_WRITE_BARRIER, OKAY if offered else NOTSUP)
    if offered and read_pages(peer, 24, 1) != data:
        raise Failed("the barrier's data is not on the disk")
    return "offered" if offered else "not offered"


def _discard(peer, secure):
    peer.connect()
    if peer.read_back("feature-discard") != "1":
        raise Skipped("feature-discard not offered")
    return peer.one(lambda enc, ring: enc.discard(ring, 15, 64, 16, secure=secure))


@case("req-15", "blkif.h: BLKIF_OP_DISCARD", MUST,
      title="discard",
      sends="a DISCARD of 16 sectors at sector 64 (feature-discard offered)",
      expects="OKAY",
      why="an advertised operation must work")
def _(peer):
    expect_answer(_discard(peer, False), BLKIF_OP_DISCARD, OKAY)


@case("req-16", "blkif.h: discard-secure, BLKIF_DISCARD_SECURE", MUST,
      title="secure discard without discard-secure",
      sends="a DISCARD with the secure flag while discard-secure is 0 (or absent)",
      expects="OKAY, done as a plain discard",
      why="blkif.h: with discard-secure=0 the frontend's secure flag is ignored")
def _(peer):
    expect_answer(_discard(peer, True), BLKIF_OP_DISCARD, OKAY)
    if peer.read_back("discard-secure") == "1":
        return "discard-secure offered: a secure discard"


def indirect_setup(peer):
    offer = peer.offer()
    if offer.max_indirect_segments <= MAX_SEGMENTS:
        raise Skipped("feature-max-indirect-segments %d" % offer.max_indirect_segments)
    n = offer.max_indirect_segments
    peer.connect(indirect=n, pool_pages=n + 1)
    return n


def _indirect(peer, indirect_op, nseg, sector, rid=0):
    """An indirect request of ``nseg`` whole pool pages at ``sector``."""
    q = peer.q
    pages = -(-nseg // BLKIF_SEGS_PER_INDIRECT_FRAME)
    descriptors = pack_pages([q.pool.refs[i % len(q.pool.refs)] for i in range(nseg)])
    with q.ind_pool.buffer[:pages * PAGE_SIZE] as view:
        q.encoder.write_descriptors(view, descriptors)
    return peer.one(lambda enc, ring: enc.indirect(ring, indirect_op, rid, sector, nseg,
                                                   q.ind_pool.refs[:pages]))


@case("req-17", "blkif.h: feature-max-indirect-segments, BLKIF_OP_INDIRECT", MUST,
      title="indirect up to the advertised maximum",
      sends="an indirect WRITE of feature-max-indirect-segments pages, then an indirect READ",
      expects="both OKAY, answered with the indirect_op (WRITE, READ), the same bytes back",
      why="the advertised maximum is a promise")
def _(peer):
    n = indirect_setup(peer)
    data = os.urandom(n * PAGE_SIZE)
    peer.q.pool.buffer[:len(data)] = data
    expect_answer(_indirect(peer, BLKIF_OP_WRITE, n, 0), BLKIF_OP_WRITE, OKAY)
    peer.q.pool.buffer[:len(data)] = bytes(len(data))
    expect_answer(_indirect(peer, BLKIF_OP_READ, n, 0), BLKIF_OP_READ, OKAY)
    if bytes(peer.q.pool.buffer[:len(data)]) != data:
        raise Failed("%d indirect segments read back differ" % n)
    return "%d segments" % n


@case("req-18", "blkif.h: feature-max-indirect-segments; Linux blkfront blkif_interrupt",
      MUST, title="indirect one past the maximum, answered with its indirect_op",
      sends="an indirect READ of feature-max-indirect-segments + 1 pages",
      expects="operation BLKIF_OP_READ (the indirect_op, not 6), status ERROR",
      why="blkback answers an indirect request with its indirect_op; Linux blkfront fails "
          "the whole disk on a response with operation 6")
def _(peer):
    n = indirect_setup(peer)
    expect_answer(_indirect(peer, BLKIF_OP_READ, n + 1, 0), BLKIF_OP_READ, ERROR)
    peer.alive()


@case("req-19", "blkif.h: BLKIF_OP_INDIRECT (indirect_op READ or WRITE only)", MUST,
      title="indirect with a flush as indirect_op",
      sends="an indirect request whose indirect_op is FLUSH_DISKCACHE, one page",
      expects="operation FLUSH_DISKCACHE (the indirect_op), status ERROR",
      why="only reads and writes may be indirect; the answer still carries the indirect_op")
def _(peer):
    indirect_setup(peer)
    expect_answer(_indirect(peer, BLKIF_OP_FLUSH_DISKCACHE, 1, 0), BLKIF_OP_FLUSH_DISKCACHE, ERROR)
    peer.alive()


@case("req-20", "blkif.h: blkif_response id", MUST,
      title="ids are echoed whole",
      sends="READs with ids 0, 2**63 + 1 and 2**64 - 1 in one batch",
      expects="one OKAY response per id, the id unchanged",
      why="the id is opaque to the backend: blkfront keeps pointers or indices in it")
def _(peer):
    peer.connect()
    ref = peer.gref(0)
    ids = (0, 2**63 + 1, 2**64 - 1)

    def build(enc, ring):
        for rid in ids:
            enc.rw(ring, BLKIF_OP_READ, rid, 0, [(ref, 0, 7)])
    got = peer.exchange(build)
    if sorted(got) != sorted(ids):
        raise Failed("ids answered: %s" % sorted(got))
    for rid in ids:
        expect_answer(got[rid], BLKIF_OP_READ, OKAY)


@case("req-21", "blkif.h: info (VDISK_READONLY), mode", MUST,
      title="a read-only VBD",
      sends="on a VBD the toolstack made read-only: a READ, a WRITE, a WRITE_BARRIER",
      expects="info has VDISK_READONLY; the READ OKAY, the writes ERROR (or EOPNOTSUPP)",
      why="a read-only disk must stay unchanged whatever the guest sends")
def _(peer):
    ro = peer.readonly()
    disk = ro.connect(pool_pages=32)
    if not disk.readonly:
        raise Failed("info %#x lacks VDISK_READONLY" % disk.info)
    ref = ro.gref(0)

    def build(enc, ring):
        enc.rw(ring, BLKIF_OP_READ, 1, 0, [(ref, 0, 7)])
        enc.rw(ring, BLKIF_OP_WRITE, 2, 0, [(ref, 0, 7)])
        enc.rw(ring, BLKIF_OP_WRITE_BARRIER, 3, 0, [(ref, 0, 7)])
    got = ro.exchange(build)
    expect_answer(got[1], BLKIF_OP_READ, OKAY)
    expect_answer(got[2], BLKIF_OP_WRITE, (ERROR, NOTSUP))
    expect_answer(got[3], BLKIF_OP_WRITE_BARRIER, (ERROR, NOTSUP))


@case("req-22", "blkif.h: sector-size, physical-sector-size", INFO,
      title="sector sizes",
      sends="a default connect",
      expects="recorded: sector-size and physical-sector-size",
      why="4 KiB-sector disks change what a frontend may send")
def _(peer):
    disk = peer.connect()
    return "sector-size %d, physical-sector-size %d" % (disk.sector_size,
                                                        disk.physical_sector_size)
