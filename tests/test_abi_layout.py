"""The cffi layer against Xen's own headers, compiled with gcc for each ABI.

A C program built against /usr/include/xen prints every sizeof, offsetof and
constant the layer declares; -m64 checks the x86_64 structs, -m32 the x86_32
ones.  Nothing here is typed in twice: the field lists come from cffi itself.
"""
import re

import pytest

from blkif import abi
from blkif.abi import constants, ffi
from helpers import compile_and_run, require_header

# Our struct suffix -> the C type in blkif.h / ring.h.
STRUCTS = {
    "request": "struct blkif_request",
    "request_discard": "struct blkif_request_discard",
    "request_indirect": "struct blkif_request_indirect",
    "response": "struct blkif_response",
    "sring_entry": "union blkif_sring_entry",
}
COMMON = {
    "struct blkif_request_segment": "struct blkif_request_segment",
    "struct grant_entry_v1": "struct grant_entry_v1",
}
# Constants that are ours, not Xen's (derived figures and Python-only tables).
OURS = {
    "PAGE_SIZE", "SECTOR_SIZE", "SECTORS_PER_PAGE", "OP_NAMES",
    "SEGMENT_DESCRIPTOR_SIZE", "BLKIF_SEGS_PER_INDIRECT_FRAME",
    "BLKIF_MAX_INDIRECT_SEGMENTS", "SRING_HEADER_SIZE", "XENBUS_MAX_RING_GRANT_ORDER",
}
C_CONSTANTS = sorted(n for n in dir(constants) if n[0].isupper() and n not in OURS)


def _fields(ctype):
    return [name for name, _ in ffi.typeof(ctype).fields]


def _c_program(tag):
    lines = [
        "#include <stdio.h>", "#include <stddef.h>", "#include <stdint.h>",
        "#include <xen/xen.h>", "#include <xen/grant_table.h>",
        "#include <xen/io/protocols.h>", "#include <xen/io/blkif.h>",
        "#define P(k, v) printf(\"%s %lld\\n\", k, (long long)(v))",
        "int main(void) {",
    ]

    def struct(ours, theirs):
        lines.append('P("sizeof %s", sizeof(%s));' % (ours, theirs))
        for field in _fields(ours):
            lines.append(
                'P("offsetof %s.%s", offsetof(%s, %s));' % (ours, field, theirs, field)
            )

    for suffix, theirs in STRUCTS.items():
        kind = "union" if suffix == "sring_entry" else "struct"
        struct("%s blkif_%s_%s" % (kind, tag, suffix), theirs)
    for ours, theirs in COMMON.items():
        struct(ours, theirs)
    lines.append('P("sizeof sring_header", offsetof(struct blkif_sring, ring));')
    for field in ("req_prod", "req_event", "rsp_prod", "rsp_event"):
        lines.append('P("offsetof sring.%s", offsetof(struct blkif_sring, %s));' % (field, field))
    for name in C_CONSTANTS:
        value = getattr(constants, name)
        if isinstance(value, str):
            lines.append('printf("str %s %%s\\n", %s);' % (name, name))
        else:
            lines.append('P("const %s", %s);' % (name, name))
    lines += ["return 0;", "}"]
    return "\n".join(lines)


def _compiled(tmp_path, tag, bits):
    require_header("/usr/include/xen/io/blkif.h")
    return compile_and_run(tmp_path, "layout_" + tag, _c_program(tag), bits)


@pytest.mark.parametrize("tag,bits", [("x86_64", 64), ("x86_32", 32)])
def test_every_size_and_offset_matches_the_headers(tmp_path, tag, bits):
    c = _compiled(tmp_path, tag, bits)
    checked = 0
    for (kind, name), value in c.items():
        if kind == "sizeof" and name != "sring_header":
            assert ffi.sizeof(name) == int(value), name
        elif kind == "offsetof" and not name.startswith("sring."):
            ctype, field = name.rsplit(".", 1)
            assert ffi.offsetof(ctype, field) == int(value), name
        else:
            continue
        checked += 1
    ours = ["%s blkif_%s_%s" % ("union" if s == "sring_entry" else "struct", tag, s)
            for s in STRUCTS] + list(COMMON)
    assert checked == sum(1 + len(_fields(t)) for t in ours)
    assert ffi.sizeof("struct blkif_sring_header") == int(c[("sizeof", "sring_header")])
    for field in ("req_prod", "req_event", "rsp_prod", "rsp_event"):
        assert ffi.offsetof("struct blkif_sring_header", field) == int(
            c[("offsetof", "sring." + field)]
        )


def test_every_constant_matches_the_headers(tmp_path):
    c = _compiled(tmp_path, "x86_64", 64)
    for name in C_CONSTANTS:
        value = getattr(constants, name)
        if isinstance(value, str):
            assert c[("str", name)] == value, name
        else:
            assert c[("const", name)] == str(value), name


@pytest.mark.parametrize(
    "layout,request_size,request_id,response,discard,indirect",
    [(abi.X86_64, 112, 8, 16, 32, 64), (abi.X86_32, 108, 4, 12, 28, 64)],
)
def test_known_sizes(layout, request_size, request_id, response, discard, indirect):
    assert layout.request_size == request_size
    assert ffi.offsetof(layout.ctype("request"), "id") == request_id
    assert layout.response_size == response
    assert ffi.sizeof(layout.ctype("request_discard")) == discard
    assert ffi.sizeof(layout.ctype("request_indirect")) == indirect
    assert ffi.sizeof("struct blkif_sring_header") == 64
    assert layout.slot_size == request_size


def test_arm_shares_the_x86_64_layout():
    assert abi.ARM.tag == "x86_64"
    assert abi.abi_for_protocol("arm-abi") is abi.ARM


@pytest.mark.parametrize("protocol", [None, ""])
def test_missing_protocol_means_native(protocol):
    assert abi.abi_for_protocol(protocol) is abi.NATIVE


def test_unknown_protocol_is_a_remote_error():
    with pytest.raises(abi.RemoteProtocolError, match="x86_16-abi"):
        abi.abi_for_protocol("x86_16-abi")


def test_constant_names_are_c_names():
    # Every checked constant is spelt as in C, so grep finds it in Xen too.
    for name in C_CONSTANTS:
        assert re.fullmatch(r"(BLKIF|VDISK|GTF|GNTST|XEN_IO_PROTO)_\w+", name), name
