"""Backend cases: grant references in requests (blkif.h ``gref``; Xen's
grant table: a page is mapped only by the domain it is granted to, and
written only if the grant is writable)."""
from blkif.abi.constants import BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_ERROR, PAGE_SIZE
from blkif.conformance.backend.requests import expect_answer, indirect_setup
from blkif.conformance.catalogue import MUST, Failed, group

case = group("backend", "grants")
STRANGER = 0x7FEF  # DOMID_FIRST_RESERVED - 1: a domain that is not the backend


@case("grant-1", "blkif.h: gref; grant table", MUST,
      title="a gref never granted",
      sends="a READ whose segment names gref 123456, never granted",
      expects="status ERROR; the VBD keeps serving",
      why="a bad gref fails its request, not the backend")
def _(peer):
    peer.connect()
    expect_answer(peer.one(lambda enc, ring: enc.rw(ring, BLKIF_OP_READ, 1, 0, [(123456, 0, 7)])),
            BLKIF_OP_READ, BLKIF_RSP_ERROR)
    peer.alive()


@case("grant-2", "grant table: GTF_readonly", MUST,
      title="a READ into a read-only grant",
      sends="a READ into a page granted read-only, filled with 0xA5",
      expects="status ERROR and the page unchanged",
      why="the backend must not write guest memory the guest did not let it write")
def _(peer):
    peer.connect()
    ro = peer.platform.grant_pages(peer.backend_id, 1, readonly=True)
    try:
        ro.buffer[:] = b"\xa5" * PAGE_SIZE
        expect_answer(peer.one(lambda enc, ring: enc.rw(ring, BLKIF_OP_READ, 2, 0,
                                                  [(ro.refs[0], 0, 7)])),
                BLKIF_OP_READ, BLKIF_RSP_ERROR)
        if bytes(ro.buffer) != b"\xa5" * PAGE_SIZE:
            raise Failed("the read-only page was written")
    finally:
        ro.close()
    peer.alive()


@case("grant-3", "grant table: a grant names its grantee", MUST,
      title="a page granted to another domain",
      sends="a WRITE from a page granted to domain %d, not to the backend" % STRANGER,
      expects="status ERROR; the VBD keeps serving",
      why="a backend must not reach pages meant for someone else")
def _(peer):
    peer.connect()
    elsewhere = peer.platform.grant_pages(STRANGER, 1)
    try:
        expect_answer(peer.one(lambda enc, ring: enc.rw(ring, BLKIF_OP_WRITE, 3, 0,
                                                  [(elsewhere.refs[0], 0, 7)])),
                BLKIF_OP_WRITE, BLKIF_RSP_ERROR)
    finally:
        elsewhere.close()
    peer.alive()


@case("grant-4", "blkif.h: blkif_request_indirect indirect_grefs", MUST,
      title="indirect descriptors in a page never granted",
      sends="an indirect READ of 16 segments whose indirect_grefs[0] is 123456",
      expects="status ERROR; the VBD keeps serving",
      why="the descriptor pages are guest memory like any other")
def _(peer):
    indirect_setup(peer)
    got = peer.one(lambda enc, ring: enc.indirect(ring, BLKIF_OP_READ, 4, 0, 16, [123456]))
    if got[1] != BLKIF_RSP_ERROR:  # the operation echoed is judged by req-18
        raise Failed("status %d, not ERROR" % got[1])
    peer.alive()
