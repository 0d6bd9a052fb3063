"""xen/io/blkif.h and the shared-ring header of xen/io/ring.h, per ring ABI.

Two layouts exist.  ``x86_64`` is also the layout of ``arm-abi`` (both align
uint64_t to 8).  ``x86_32`` aligns uint64_t to 4, so ``id`` moves from offset 8
to 4, as Linux's xen-blkback/common.h notes.  x86_32 structs are declared with
``...;`` so cffi takes their layout from the compiler under ``pack(4)``; the
tests pin every offset against the real headers built with -m64 and -m32.
"""

_BODIES = {
    # name: C body; {abi} is replaced with the ABI tag.
    "request": """
    uint8_t operation;        /* x86_64: 0   x86_32: 0 */
    uint8_t nr_segments;      /*         1           1 */
    uint16_t handle;          /*         2           2 */
    uint64_t id;              /*         8           4 */
    uint64_t sector_number;   /*        16          12 */
    struct blkif_request_segment seg[11]; /* 24     20 */
""",
    "request_discard": """
    uint8_t operation;
    uint8_t flag;
    uint16_t handle;
    uint64_t id;
    uint64_t sector_number;
    uint64_t nr_sectors;
""",
    "request_indirect": """
    uint8_t operation;
    uint8_t indirect_op;
    uint16_t nr_segments;
    uint64_t id;
    uint64_t sector_number;
    uint16_t handle;
    uint32_t indirect_grefs[8];
""",
    "response": """
    uint64_t id;
    uint8_t operation;
    int16_t status;
""",
}

_COMMON = """
struct blkif_request_segment {
    uint32_t gref;
    uint8_t first_sect, last_sect;
};
struct blkif_sring_header {
    uint32_t req_prod, req_event;
    uint32_t rsp_prod, rsp_event;
    uint8_t pvt[4];
    uint8_t pad[44];
};
"""


def _structs(abi, partial):
    out = []
    for name, body in _BODIES.items():
        extra = "    ...;\n" if partial else ""
        if name == "request_indirect" and abi == "x86_32" and not partial:
            body += "    uint64_t pad;\n"
        out.append("struct blkif_%s_%s {%s%s};" % (abi, name, body, extra))
    out.append(
        "union blkif_%s_sring_entry {\n"
        "    struct blkif_%s_request req;\n"
        "    struct blkif_%s_response rsp;\n%s};"
        % (abi, abi, abi, "    ...;\n" if partial else "")
    )
    return "\n".join(out)


CDEF = _COMMON + _structs("x86_64", False) + _structs("x86_32", True)

SOURCE = (
    _COMMON
    + _structs("x86_64", False)
    + "\n#pragma pack(push, 4)\n"
    + _structs("x86_32", False)
    + "\n#pragma pack(pop)\n"
)
