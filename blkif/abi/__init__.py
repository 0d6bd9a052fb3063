"""The C-compatible layer: blkif structures per ring ABI, and their constants.

Every C declaration lives in ``_cdefs`` and is compiled into ``_ffi``; the rest
of the package reaches C memory only through this module.  An :class:`Abi`
names the structs of one ring layout, chosen from the frontend's ``protocol``
node with :func:`abi_for_protocol`.
"""
import platform as _platform
from dataclasses import dataclass

from blkif.abi._ffi import ffi, lib
from blkif.abi.constants import *  # noqa: F401,F403 - re-exported C constants
from blkif.abi.constants import (
    XEN_IO_PROTO_ABI_ARM,
    XEN_IO_PROTO_ABI_X86_32,
    XEN_IO_PROTO_ABI_X86_64,
)
from blkif.errors import RemoteProtocolError


@dataclass(frozen=True)
class Abi:
    """One ring layout: the ``protocol`` string and its struct type names."""

    protocol: str
    tag: str  # "x86_64" or "x86_32": the C layout used

    def ctype(self, name):
        """The cffi type name of ``struct blkif_<tag>_<name>``."""
        return "struct blkif_%s_%s" % (self.tag, name)

    @property
    def request_size(self):
        return ffi.sizeof(self.ctype("request"))

    @property
    def response_size(self):
        return ffi.sizeof(self.ctype("response"))

    @property
    def slot_size(self):
        """Size of one ring entry: the union of request and response."""
        return ffi.sizeof("union blkif_%s_sring_entry" % self.tag)


X86_64 = Abi(XEN_IO_PROTO_ABI_X86_64, "x86_64")
X86_32 = Abi(XEN_IO_PROTO_ABI_X86_32, "x86_32")
ARM = Abi(XEN_IO_PROTO_ABI_ARM, "x86_64")  # same layout: uint64_t aligned to 8

ABIS = {abi.protocol: abi for abi in (X86_64, X86_32, ARM)}
# Short names for command lines: --abi x86_64.
ABI_NAMES = {"x86_64": X86_64, "x86_32": X86_32, "arm": ARM}

_MACHINE_ABI = {"x86_64": X86_64, "amd64": X86_64, "i386": X86_32, "i686": X86_32}
NATIVE = _MACHINE_ABI.get(_platform.machine().lower(), ARM)


def abi_for_protocol(protocol):
    """The ABI a frontend asked for; a missing or empty ``protocol`` means native.

    Raises RemoteProtocolError for a value we do not know: the caller should
    fail the device (Linux blkback does the same with "unknown fe protocol").
    """
    if not protocol:
        return NATIVE
    try:
        return ABIS[protocol]
    except KeyError:
        raise RemoteProtocolError("unknown frontend protocol %r" % protocol) from None
