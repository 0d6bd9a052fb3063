"""linux/include/uapi/xen/gntalloc.h: grant our own pages (frontend side).

``UNMAP_NOTIFY_*`` are shared with gntdev.h and declared in ``gntdev``.
"""

_STRUCTS = """
struct ioctl_gntalloc_alloc_gref {
    uint16_t domid;                       /* 0: the domain given access */
    uint16_t flags;                       /* 2: GNTALLOC_FLAG_WRITABLE */
    uint32_t count;                       /* 4 */
    uint64_t index;                       /* 8: OUT, the mmap offset */
    uint32_t gref_ids[1];                 /* 16: OUT, count entries */
};
struct ioctl_gntalloc_dealloc_gref {
    uint64_t index;                       /* 0 */
    uint32_t count;                       /* 8 */
};
struct ioctl_gntalloc_unmap_notify {
    uint64_t index;                       /* 0 */
    uint32_t action;                      /* 8 */
    uint32_t event_channel_port;          /* 12 */
};
"""

_IOCTLS = {
    "IOCTL_GNTALLOC_ALLOC_GREF": (5, "struct ioctl_gntalloc_alloc_gref"),
    "IOCTL_GNTALLOC_DEALLOC_GREF": (6, "struct ioctl_gntalloc_dealloc_gref"),
    "IOCTL_GNTALLOC_SET_UNMAP_NOTIFY": (7, "struct ioctl_gntalloc_unmap_notify"),
}

CDEF = (
    _STRUCTS
    + "".join("#define %s ...\n" % n for n in _IOCTLS)
    + "#define GNTALLOC_FLAG_WRITABLE ...\n"
)

SOURCE = (
    "#include <linux/ioctl.h>\n"
    + _STRUCTS + "".join(
        "#define %s _IOC(_IOC_NONE, 'G', %d, sizeof(%s))\n" % (n, nr, st)
        for n, (nr, st) in _IOCTLS.items()
    ) + "#define GNTALLOC_FLAG_WRITABLE 1\n"
)
