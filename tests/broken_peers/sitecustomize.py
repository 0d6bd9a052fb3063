"""Breaks ``blkif serve`` (and its workers) or our frontend (in a sandbox
guest) in one way, chosen by $BLKIF_BROKEN, so the conformance tests can
show the suite catches it.

Python imports this module at start-up when its directory is on PYTHONPATH;
without $BLKIF_BROKEN it does nothing.  Each backend breakage patches a public
name outside the backend's own modules, so it survives rewrites of the datapath.
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
    """A backend that never notifies the frontend: its rings served by the
    Python datapath (the C engine notifies from C), whose notify is a no-op."""
    import dataclasses

    from blkif.backend import vbd
    from blkif.platform.sim import client
    client.SimPort.notify = lambda self: None
    init = vbd.Vbd.__init__

    def with_python_rings(self, xs, platform, path, options=vbd.BackendOptions()):
        init(self, xs, platform, path, dataclasses.replace(options, engine="python"))
    vbd.Vbd.__init__ = with_python_rings


def _too_many_sectors():
    """A backend that publishes 8 sectors more than its disk has."""
    from blkif import negotiate
    nodes = negotiate.DiskInfo.nodes

    def overstate(self):
        out = nodes(self)
        out["sectors"] = str(self.sectors + 8)
        return out
    negotiate.DiskInfo.nodes = overstate


def _any_operation():
    """A frontend that takes any operation in a response as its request's."""
    from blkif import request

    class Anything(int):
        def __ne__(self, other):
            return False
    take = request.RequestEncoder.take_response

    def take_response(self, ring):
        rid, _, status = take(self, ring)
        return rid, Anything(0), status
    request.RequestEncoder.take_response = take_response


def _flush_whatever_offered():
    """A frontend that reads every offer as having feature-flush-cache."""
    import dataclasses

    from blkif import negotiate
    read = negotiate.BackendOffer.read.__func__

    def read_with_flush(cls, reader):
        return dataclasses.replace(read(cls, reader), flush=True)
    negotiate.BackendOffer.read = classmethod(read_with_flush)


def _indirect_beyond_the_offer():
    """A frontend that uses all the indirect segments it wants, whatever the offer."""
    from blkif import negotiate
    choose = negotiate.FrontendWants.choose

    def choose_greedily(self, offer):
        order, queues, _, persistent = choose(self, offer)
        return order, queues, self.max_indirect_segments, persistent
    negotiate.FrontendWants.choose = choose_greedily


BREAKAGES = {
    "any-operation": _any_operation,
    "flush-whatever-offered": _flush_whatever_offered,
    "indirect-beyond-the-offer": _indirect_beyond_the_offer,
    "no-error-node": _no_error_nodes,
    "no-events": _no_events,
    "too-many-sectors": _too_many_sectors,
}

if BROKEN:
    BREAKAGES[BROKEN]()
