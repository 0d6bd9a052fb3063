"""C declarations for the cffi layer, one module per Xen/Linux header.

Each module exports ``CDEF`` (what Python may touch) and ``SOURCE`` (the C
definitions compiled into ``blkif.abi._ffi``), and may name ``INCLUDE_DIRS``
and ``LIBRARIES`` to build with (the engine: its C file, liburing).  ``_cffi_build`` joins them in
the order of ``MODULES``.
"""

MODULES = ["barrier", "blkif", "grant_table", "gntdev", "gntalloc", "evtchn", "engine", "front"]
