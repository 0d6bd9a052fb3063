"""linux/include/uapi/xen/gntdev.h: map another domain's grants (backend side).

Structs are the uapi layouts (offsets on x86_64 in comments); ioctl numbers
come from the kernel's own ``_IOC`` so they are right on every architecture.
Variable-length structs keep the header's ``[1]`` arrays: callers allocate a
larger buffer and index through ``ffi.addressof(s, "refs")``.  The mmap(2)
calls gntdev users need (MAP_FIXED stitching of pages into one region) are
declared here too, since mapping grants is this header's whole purpose.
"""

_STRUCTS = """
struct ioctl_gntdev_grant_ref {
    uint32_t domid;                       /* 0 */
    uint32_t ref;                         /* 4 */
};
struct ioctl_gntdev_map_grant_ref {
    uint32_t count;                       /* 0 */
    uint32_t pad;                         /* 4 */
    uint64_t index;                       /* 8: OUT, the mmap offset */
    struct ioctl_gntdev_grant_ref refs[1];/* 16: count entries */
};
struct ioctl_gntdev_unmap_grant_ref {
    uint64_t index;                       /* 0 */
    uint32_t count;                       /* 8 */
    uint32_t pad;                         /* 12 */
};
struct ioctl_gntdev_get_offset_for_vaddr {
    uint64_t vaddr;
    uint64_t offset;
    uint32_t count;
    uint32_t pad;
};
struct ioctl_gntdev_set_max_grants {
    uint32_t count;
};
struct ioctl_gntdev_unmap_notify {
    uint64_t index;                       /* 0: byte offset in the mmap space */
    uint32_t action;                      /* 8: UNMAP_NOTIFY_* */
    uint32_t event_channel_port;          /* 12 */
};
/* The header's two unions are anonymous; naming them keeps the layout. */
struct gntdev_grant_copy_foreign {
    uint32_t ref;                         /* grant_ref_t */
    uint16_t offset;
    uint16_t domid;                       /* domid_t */
};
union gntdev_grant_copy_ptr {
    void *virt;
    struct gntdev_grant_copy_foreign foreign;
};
struct gntdev_grant_copy_segment {
    union gntdev_grant_copy_ptr source;   /* 0 */
    union gntdev_grant_copy_ptr dest;     /* 8 */
    uint16_t len;                         /* 16 */
    uint16_t flags;                       /* 18: GNTCOPY_* */
    int16_t status;                       /* 20: OUT, GNTST_* */
};
struct ioctl_gntdev_grant_copy {
    unsigned int count;                   /* 0 */
    struct gntdev_grant_copy_segment *segments; /* 8 */
};
"""

_IOCTLS = {
    # name: (nr, struct)
    "IOCTL_GNTDEV_MAP_GRANT_REF": (0, "struct ioctl_gntdev_map_grant_ref"),
    "IOCTL_GNTDEV_UNMAP_GRANT_REF": (1, "struct ioctl_gntdev_unmap_grant_ref"),
    "IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR": (2, "struct ioctl_gntdev_get_offset_for_vaddr"),
    "IOCTL_GNTDEV_SET_MAX_GRANTS": (3, "struct ioctl_gntdev_set_max_grants"),
    "IOCTL_GNTDEV_SET_UNMAP_NOTIFY": (7, "struct ioctl_gntdev_unmap_notify"),
    "IOCTL_GNTDEV_GRANT_COPY": (8, "struct ioctl_gntdev_grant_copy"),
}

_CONSTANTS = {
    "UNMAP_NOTIFY_CLEAR_BYTE": "0x1",
    "UNMAP_NOTIFY_SEND_EVENT": "0x2",
    # xen/grant_table.h, for gntdev_grant_copy_segment.flags
    "GNTCOPY_source_gref": "(1 << 0)",
    "GNTCOPY_dest_gref": "(1 << 1)",
}

_MMAN = """
void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);
#define PROT_NONE ...
#define PROT_READ ...
#define PROT_WRITE ...
#define MAP_SHARED ...
#define MAP_PRIVATE ...
#define MAP_FIXED ...
#define MAP_ANONYMOUS ...
"""


def _ioctl_source(ioctls, letter):
    """C #defines of ``ioctls`` ({name: (nr, struct)}) with the kernel's _IOC."""
    return "".join(
        "#define %s _IOC(_IOC_NONE, '%s', %d, sizeof(%s))\n" % (name, letter, nr, struct)
        for name, (nr, struct) in ioctls.items()
    )


def _names_cdef(names):
    """cdef lines exposing integer macros ``names`` to Python."""
    return "".join("#define %s ...\n" % name for name in names)


CDEF = _STRUCTS + _names_cdef(_IOCTLS) + _names_cdef(_CONSTANTS) + _MMAN

SOURCE = (
    "#include <linux/ioctl.h>\n#include <sys/mman.h>\n"
    + _STRUCTS
    + _ioctl_source(_IOCTLS, "G")
    + "".join("#define %s %s\n" % item for item in _CONSTANTS.items())
)
