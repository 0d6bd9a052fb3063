"""Constants of xen/io/blkif.h, xen/io/protocols.h and xen/grant_table.h.

Names are the C names, so one grep finds a concept in Xen, Linux and here.
"""

PAGE_SIZE = 4096  # XEN_PAGE_SIZE
SECTOR_SIZE = 512  # blkif sector numbers are always in 512-byte units
SECTORS_PER_PAGE = PAGE_SIZE // SECTOR_SIZE

# Request operations.
BLKIF_OP_READ = 0
BLKIF_OP_WRITE = 1
BLKIF_OP_WRITE_BARRIER = 2
BLKIF_OP_FLUSH_DISKCACHE = 3
BLKIF_OP_RESERVED_1 = 4
BLKIF_OP_DISCARD = 5
BLKIF_OP_INDIRECT = 6

OP_NAMES = {
    BLKIF_OP_READ: "read",
    BLKIF_OP_WRITE: "write",
    BLKIF_OP_WRITE_BARRIER: "write_barrier",
    BLKIF_OP_FLUSH_DISKCACHE: "flush_diskcache",
    BLKIF_OP_RESERVED_1: "reserved_1",
    BLKIF_OP_DISCARD: "discard",
    BLKIF_OP_INDIRECT: "indirect",
}

# Response statuses.
BLKIF_RSP_EOPNOTSUPP = -2
BLKIF_RSP_ERROR = -1
BLKIF_RSP_OKAY = 0

BLKIF_DISCARD_SECURE = 1 << 0

# Segment limits.
BLKIF_MAX_SEGMENTS_PER_REQUEST = 11
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8
SEGMENT_DESCRIPTOR_SIZE = 8  # sizeof(struct blkif_request_segment), both ABIs
BLKIF_SEGS_PER_INDIRECT_FRAME = PAGE_SIZE // SEGMENT_DESCRIPTOR_SIZE  # 512
# The largest feature-max-indirect-segments we accept or offer: 8 pages x 512.
BLKIF_MAX_INDIRECT_SEGMENTS = (
    BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * BLKIF_SEGS_PER_INDIRECT_FRAME
)

# The "info" node bits.
VDISK_CDROM = 0x1
VDISK_REMOVABLE = 0x2
VDISK_READONLY = 0x4

# The "protocol" node values.
XEN_IO_PROTO_ABI_X86_32 = "x86_32-abi"
XEN_IO_PROTO_ABI_X86_64 = "x86_64-abi"
XEN_IO_PROTO_ABI_ARM = "arm-abi"

# Shared ring header: four RING_IDX, then 48 bytes of private/padding.
SRING_HEADER_SIZE = 64
XENBUS_MAX_RING_GRANT_ORDER = 4  # Linux: at most 16 pages of ring

# Grant table v1 (xen/grant_table.h).
GTF_invalid = 0
GTF_permit_access = 1
GTF_accept_transfer = 2
GTF_transitive = 3
GTF_type_mask = 3
GTF_readonly = 1 << 2
GTF_reading = 1 << 3
GTF_writing = 1 << 4
GTF_transfer_committed = 1 << 2  # with GTF_accept_transfer only
GTF_transfer_completed = 1 << 3

GNTST_okay = 0
GNTST_general_error = -1
GNTST_bad_domain = -2
GNTST_bad_gntref = -3
GNTST_bad_handle = -4
GNTST_bad_virt_addr = -5
GNTST_bad_dev_addr = -6
GNTST_no_device_space = -7
GNTST_permission_denied = -8
GNTST_bad_page = -9
GNTST_bad_copy_arg = -10
GNTST_address_too_big = -11
GNTST_eagain = -12
GNTST_no_space = -13
