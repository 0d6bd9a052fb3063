"""Breaks ``blkif serve`` (and its workers) in one way, chosen by
$BLKIF_BROKEN, so the conformance tests can show the suite catches it.

Python imports this module at start-up when its directory is on PYTHONPATH;
without $BLKIF_BROKEN it does nothing.  Each breakage patches a public name
outside the backend's own modules, so it survives rewrites of the datapath.
"""
import os

BROKEN = os.environ.get("BLKIF_BROKEN", "")


def _no_error_nodes():
    """xenbus_dev_fatal without its error node."""
    from xenstore import client
    write = client.Xenstore.write

    def write_except_errors(self, path, value):
        if "/error/" not in path:
            write(self, path, value)
    client.Xenstore.write = write_except_errors


def _no_events():
    """A backend that never notifies the frontend."""
    from blkif.platform.sim import client
    client.SimPort.notify = lambda self: None


def _too_many_sectors():
    """A backend that publishes 8 sectors more than its disk has."""
    from blkif import negotiate
    nodes = negotiate.DiskInfo.nodes

    def overstate(self):
        out = nodes(self)
        out["sectors"] = str(self.sectors + 8)
        return out
    negotiate.DiskInfo.nodes = overstate


BREAKAGES = {
    "no-error-node": _no_error_nodes,
    "no-events": _no_events,
    "too-many-sectors": _too_many_sectors,
}

if BROKEN:
    BREAKAGES[BROKEN]()
