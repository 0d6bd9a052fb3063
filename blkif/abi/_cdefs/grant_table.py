"""xen/grant_table.h: the v1 grant entry a granting domain fills in."""

CDEF = """
struct grant_entry_v1 {
    uint16_t flags;
    uint16_t domid;
    uint32_t frame;
};
"""

SOURCE = CDEF
