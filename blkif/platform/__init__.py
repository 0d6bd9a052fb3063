"""Grant tables and event channels: ``open_platform("xen")`` or ``("sim")``.

The backend and frontend code against ``base.Platform`` only; see
docs/platforms.md for the interface, the sim's design and both platforms' limits.
"""
from blkif.platform.base import (
    CopyOp,
    GrantedPages,
    GrantRef,
    Local,
    Mapping,
    Platform,
    Port,
)
from blkif.platform.errors import (
    EventChannelClosed,
    EventChannelError,
    GrantError,
    PlatformError,
    PlatformUnavailable,
)

PLATFORMS = ("xen", "sim")


def open_platform(name, **options):
    """Open platform ``name``: "xen" (options: domid=0, dev_dir="/dev/xen") or
    "sim" (options: domid, path=DIR or $BLKIF_SIM).  Raises PlatformUnavailable
    if it cannot run here."""
    if name == "sim":
        from blkif.platform.sim.client import SimPlatform
        return SimPlatform(**options)
    if name == "xen":
        from blkif.platform.xen import XenPlatform
        return XenPlatform(**options)
    raise PlatformUnavailable("unknown platform %r (choose from %s)" % (name, ", ".join(PLATFORMS)))


__all__ = [
    "open_platform", "PLATFORMS", "Platform", "GrantedPages", "Mapping", "Port",
    "CopyOp", "GrantRef", "Local", "PlatformError", "PlatformUnavailable",
    "GrantError", "EventChannelError", "EventChannelClosed",
]
