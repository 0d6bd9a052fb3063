"""cffi builder for ``blkif.abi._ffi`` (out-of-line, API mode).

Run by setuptools through ``cffi_modules``; ``pip install -e .`` builds the
extension in place.  Nothing else imports this file.
"""
import importlib.util
import os

import cffi

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name):
    path = os.path.join(_HERE, "_cdefs", name + ".py")
    spec = importlib.util.spec_from_file_location("_cdefs_" + name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_modules = [_load(name) for name in _load("__init__").MODULES]

ffibuilder = cffi.FFI()
for _m in _modules:
    ffibuilder.cdef(_m.CDEF)
ffibuilder.set_source(
    "blkif.abi._ffi",
    "#include <stdint.h>\n" + "\n".join(m.SOURCE for m in _modules),
    include_dirs=[d for m in _modules for d in getattr(m, "INCLUDE_DIRS", [])],
    libraries=[lib for m in _modules for lib in getattr(m, "LIBRARIES", [])],
    depends=[os.path.join(_HERE, "csrc", name) for name in ("engine.c", "nbd_link.c", "front.c", "sring.h")],
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
