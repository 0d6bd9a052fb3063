"""Where the backend suite's VBDs come from.

:class:`SandboxBackends` starts the embedded sandbox (our xenstored, the sim
hypervisor, ``blkif serve``) and gives every case a fresh VBD of a fresh
guest domain, destroyed after the case, so no case sees another's damage.
:class:`TargetBackends` tests one VBD a toolstack prepared (``--domid N
--vdev xvda``): the suite writes that guest's frontend nodes itself, and
brings the VBD back to a fresh start (Closed, Initialising, InitWait) before
each case.  Cases that need a second or a read-only VBD skip unless the
target names one.
"""
import contextlib
import itertools
import logging
import os

from blkif.conformance.backend.peer import TIMEOUT, FrontendPeer
from blkif.conformance.catalogue import Failed, Skipped
from blkif.platform import open_platform
from blkif.toolstack import vdev_to_devid
from xenstore import NoEntry, XenbusState

log = logging.getLogger(__name__)

IMAGE_SIZE = 4 << 20


class _Session:
    debug = False
    timeout = TIMEOUT  # seconds for anything a correct backend does at once

    def __init__(self):
        self._extras = []

    @contextlib.contextmanager
    def peer_for(self, case):
        self._fresh_start()
        peer = self._peer("main")
        try:
            yield peer
        finally:
            for extra in [peer] + self._extras:
                self._done(extra)
            self._extras = []

    def _fresh_start(self):
        """Before each case: nothing, unless a target says otherwise."""

    def extra_peer(self, kind):
        peer = self._peer(kind)
        self._extras.append(peer)
        return peer


class SandboxBackends(_Session):
    """Our own backend on the sim, VBD by VBD.  Use as a context manager."""

    target = "blkif serve (sandbox, sim platform)"

    def __init__(self, serve_options=(), workdir=None):
        super().__init__()
        from blkif.sandbox import Sandbox
        self.sandbox = Sandbox(workdir, serve_options)
        self._domids = itertools.count(1)

    def __enter__(self):
        self.sandbox.__enter__()
        return self

    def __exit__(self, *exc):
        self.sandbox.__exit__(*exc)

    def _peer(self, kind):
        from xenstore import Xenstore, domain_socket_path
        box = self.sandbox
        domid = next(self._domids)
        image = box.make_image("disk-%d.img" % domid, IMAGE_SIZE, None)
        devid = box.add_vbd(domid, "xvda", image, "r" if kind == "readonly" else "w")
        xs = Xenstore.open(domain_socket_path(box.xenstore, domid))
        platform = open_platform("sim", domid=domid, path=box.sim_path)
        backend = xs.read_str("/local/domain/%d/device/vbd/%d/backend" % (domid, devid))
        peer = FrontendPeer(self, xs, platform, domid, devid, backend, box.dom0)
        peer.image = image
        return peer

    def _done(self, peer):
        from blkif import toolstack
        peer.release()
        peer.platform.close()
        peer.xs.close()
        with contextlib.suppress(Exception):
            toolstack.destroy(self.sandbox.dom0, peer.domid, "xvda")
        with contextlib.suppress(OSError):
            os.unlink(peer.image)


class TargetBackends(_Session):
    """VBDs a toolstack prepared for guest ``domid`` (``vdev``, and
    optionally ``other`` and ``readonly`` vdevs), on ``platform`` "xen" (the
    suite runs in that domain, usually dom0) or "sim" (``sim_path``)."""

    def __init__(self, platform, xenstore, domid, vdev, other=None, readonly=None,
                 sim_path=None, recreate=None, fresh=None):
        super().__init__()
        self.platform_name, self.xenstore, self.domid = platform, xenstore, domid
        self.sim_path = sim_path
        self.recreate = recreate  # recreate(vdev): the toolstack makes that VBD afresh
        self.fresh = fresh  # fresh(): every VBD afresh before each case
        self.vdevs = {"main": vdev, "other": other, "readonly": readonly}
        self.target = "VBD %s of domain %d (%s platform)" % (vdev, domid, platform)

    def __enter__(self):
        from xenstore import Xenstore
        self.dom0 = Xenstore.open(self.xenstore)
        return self

    def __exit__(self, *exc):
        self.dom0.close()

    def _fresh_start(self):
        if self.fresh is not None:
            self.fresh()

    def _peer(self, kind):
        from xenstore import Xenstore, domain_socket_path
        vdev = self.vdevs[kind]
        if vdev is None:
            raise Skipped("needs a %s VBD (give --%s-vdev)" % (kind, kind))
        devid = vdev_to_devid(vdev)
        if self.platform_name == "sim":
            xs = Xenstore.open(domain_socket_path(self.xenstore, self.domid))
            platform = open_platform("sim", domid=self.domid, path=self.sim_path)
        else:
            xs = Xenstore.open(self.xenstore)
            platform = open_platform("xen", domid=self.domid)
        node = "/local/domain/%d/device/vbd/%d/backend" % (self.domid, devid)
        try:
            backend = xs.read_str(node)
        except NoEntry:
            if self.recreate is None:
                raise
            log.warning("%s: gone (an earlier case's backend removed it); made afresh", vdev)
            self.recreate(vdev)
            try:
                backend = xs.read_str(node)
            except NoEntry:
                xs.close()
                platform.close()
                raise Failed("the backend removed %s (%s VBD) again as soon as it was made: it "
                             "cannot serve it" % (vdev, kind)) from None
        peer = FrontendPeer(self, xs, platform, self.domid, devid, backend, self.dom0)
        try:
            peer.reset()
        except Failed as exc:
            if self.recreate is None:
                raise
            # An earlier case left the VBD unable to start over (its result
            # says so): a fresh one, as the toolstack would make it.
            log.warning("%s: %s; the VBD is made afresh", vdev, exc)
            peer.release()
            self.recreate(vdev)
            peer.restart()
        return peer

    def _done(self, peer):
        with contextlib.suppress(Exception):
            peer.switch(XenbusState.Closed)
        peer.release()
        peer.platform.close()
        peer.xs.close()
