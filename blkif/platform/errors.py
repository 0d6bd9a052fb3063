"""Errors of the platform layer, under the package's one root ``BlkifError``.

``GrantError`` carries the GNTST_* status Xen (or the sim) returned, so a
backend can fail just the request or device that named the bad grant.
``EventChannelClosed`` means the peer is gone: treat the device as dead.
"""
import errno as _errno

from blkif.abi import constants
from blkif.errors import BlkifError

GNTST_NAMES = {
    value: name for name, value in vars(constants).items() if name.startswith("GNTST_")
}


class PlatformError(BlkifError):
    """Something in the grant-table / event-channel layer failed."""


class PlatformUnavailable(PlatformError):
    """The platform cannot be opened here (no /dev/xen, no sim hypervisor)."""


class GrantError(PlatformError):
    """A grant operation failed with a GNTST_* ``status`` (a negative int)."""

    def __init__(self, status, what=""):
        self.status = status
        name = GNTST_NAMES.get(status, "GNTST_%d" % status)
        super().__init__("%s%s" % (name, ": " + what if what else ""))


class EventChannelError(PlatformError):
    """An event-channel operation failed; ``errno`` says why (EINVAL, ESRCH...)."""

    def __init__(self, err, what=""):
        self.errno = err
        super().__init__("%s%s" % (_errno.errorcode.get(err, str(err)),
                                   ": " + what if what else ""))


class EventChannelClosed(EventChannelError):
    """The channel is gone for good (the sim hypervisor went away; a peer that
    closes its port, or dies, leaves ours unbound instead, as on Xen)."""

    def __init__(self, what="peer closed the event channel"):
        super().__init__(_errno.EPIPE, what)
