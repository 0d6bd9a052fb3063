"""The gntdev, gntalloc and evtchn cffi declarations against the uapi headers.

A C program built with gcc against /usr/include/xen/{gntdev,gntalloc,evtchn}.h
prints every ioctl number, constant, sizeof and offsetof the layer declares;
the field lists come from cffi itself, so nothing is typed in twice.  The host
is x86_64, the only ABI the compiled layer serves.
"""

from blkif.abi import ffi, lib
from helpers import compile_and_run, require_header

HEADERS = ["gntdev.h", "gntalloc.h", "evtchn.h"]

# Structs whose C name is ours too.
STRUCTS = [
    "struct ioctl_gntdev_grant_ref",
    "struct ioctl_gntdev_map_grant_ref",
    "struct ioctl_gntdev_unmap_grant_ref",
    "struct ioctl_gntdev_get_offset_for_vaddr",
    "struct ioctl_gntdev_set_max_grants",
    "struct ioctl_gntdev_unmap_notify",
    "struct gntdev_grant_copy_segment",
    "struct ioctl_gntdev_grant_copy",
    "struct ioctl_gntalloc_alloc_gref",
    "struct ioctl_gntalloc_dealloc_gref",
    "struct ioctl_gntalloc_unmap_notify",
    "struct ioctl_evtchn_bind_virq",
    "struct ioctl_evtchn_bind_interdomain",
    "struct ioctl_evtchn_bind_unbound_port",
    "struct ioctl_evtchn_unbind",
    "struct ioctl_evtchn_notify",
    "struct ioctl_evtchn_restrict_domid",
]
# Our names for the header's anonymous unions: (outer struct, member path).
ANONYMOUS = {
    "union gntdev_grant_copy_ptr": ("struct gntdev_grant_copy_segment", "source"),
    "struct gntdev_grant_copy_foreign": ("struct gntdev_grant_copy_segment", "source.foreign"),
}
CONSTANTS = sorted(
    n for n in dir(lib)
    if n.startswith(("IOCTL_GNTDEV_", "IOCTL_GNTALLOC_", "IOCTL_EVTCHN_",
                     "UNMAP_NOTIFY_", "GNTCOPY_", "GNTALLOC_FLAG_"))
)


def _fields(ctype):
    return [name for name, _ in ffi.typeof(ctype).fields]


def _c_program():
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <stdint.h>",
             "#include <sys/ioctl.h>", "#include <xen/xen.h>",
             "#include <xen/grant_table.h>"]
    lines += ["#include <xen/%s>" % h for h in HEADERS]
    lines += ['#define P(k, v) printf("%s %llu\\n", k, (unsigned long long)(v))',
              "int main(void) {"]
    for ctype in STRUCTS:
        lines.append('P("sizeof %s", sizeof(%s));' % (ctype, ctype))
        for field in _fields(ctype):
            lines.append('P("offsetof %s.%s", offsetof(%s, %s));' % (ctype, field, ctype, field))
    for ours, (outer, path) in ANONYMOUS.items():
        lines.append('P("sizeof %s", sizeof(((%s *)0)->%s));' % (ours, outer, path))
        for field in _fields(ours):
            lines.append(
                'P("offsetof %s.%s", offsetof(%s, %s.%s) - offsetof(%s, %s));'
                % (ours, field, outer, path, field, outer, path)
            )
    for name in CONSTANTS:
        lines.append('P("const %s", %s);' % (name, name))
    lines += ["return 0;", "}"]
    return "\n".join(lines)


def _compiled(tmp_path):
    for header in HEADERS:
        require_header("/usr/include/xen/" + header)
    return {key: int(value) for key, value in
            compile_and_run(tmp_path, "devices", _c_program()).items()}


def test_every_size_and_offset_matches_the_headers(tmp_path):
    c = _compiled(tmp_path)
    checked = 0
    for (kind, name), value in c.items():
        if kind == "sizeof":
            assert ffi.sizeof(name) == value, name
        elif kind == "offsetof":
            ctype, field = name.rsplit(".", 1)
            assert ffi.offsetof(ctype, field) == value, name
        else:
            continue
        checked += 1
    types = STRUCTS + list(ANONYMOUS)
    assert checked == sum(1 + len(_fields(t)) for t in types)


def test_every_ioctl_number_and_constant_matches_the_headers(tmp_path):
    c = _compiled(tmp_path)
    assert len(CONSTANTS) >= 18
    for name in CONSTANTS:
        assert getattr(lib, name) == c[("const", name)], name


def test_known_values():
    # Worked by hand from _IOC (size << 16 | type << 8 | nr), independent of gcc.
    assert lib.IOCTL_GNTDEV_MAP_GRANT_REF == 0x184700
    assert lib.IOCTL_EVTCHN_BIND_INTERDOMAIN == 0x84501
    assert ffi.sizeof("struct gntdev_grant_copy_segment") == 24
    assert ffi.offsetof("struct ioctl_gntalloc_alloc_gref", "gref_ids") == 16
