"""Where the frontend suite's frontends come from: our own
(:class:`blkif.frontend.BlockDevice`) in a guest process of the embedded
sandbox (:class:`SandboxFrontends`), or in a process of dom0 on real Xen
(:class:`XenFrontends`); one fresh process and VBD per case.

The suite is the VBD's backend, as a driver domain of its own
(:data:`BACKEND_DOMID`), so the sandbox's ``blkif serve`` (which serves
dom0's backend directory) leaves these VBDs alone.
"""
import contextlib
import itertools
import os
import tempfile

from blkif.conformance.catalogue import Failed
from blkif.conformance.frontend.backend_peer import BackendPeer
from blkif.negotiate import BackendOffer
from blkif.platform import open_platform
from xenstore import XenbusState

BACKEND_DOMID = 0x7F00
XEN_KIND = "blkif-conformance"  # the suite's xenbus backend type on real Xen
GUEST_IO = "blkif.conformance.frontend.guest:"


class FrontendUnderTest:
    """One case's frontend (a sandbox guest) and the suite's backend for it."""

    def __init__(self, backend, guest, vdev="xvda"):
        self.backend, self.guest, self.vdev = backend, guest, vdev

    def attach(self, offer=BackendOffer(max_queues=1, discard=True), disk=None, omit=(),
               options=None, connect=True):
        """Offer, then have the guest attach while we map and connect; the
        negotiated values the guest reports.  Failed if either side fails."""
        self.backend.offer(offer, disk, omit)
        options = dict({"timeout": 5.0, "reconnect": False}, **(options or {}))
        with self.backend.connecting(connect):
            try:
                return self.guest.call("attach", {"vdev": self.vdev, "options": options},
                                       timeout=15)
            except Exception as exc:
                raise Failed("the frontend did not attach: %s" % exc) from None

    def reattach(self, offer, disk=None):
        """The backend closes; the guest detaches and attaches to a new ``offer``."""
        self.backend.stop()
        self.backend.switch(XenbusState.Closed)
        self.guest.call("detach")
        self.backend.disconnect()
        return self.attach(offer, disk)

    def io(self, *ops, timeout=20):
        """Run ops in the guest (see :func:`~.guest.guest_io`); their results."""
        return self.guest.call("call", {"function": GUEST_IO + "guest_io",
                                        "params": {"ops": list(ops)}}, timeout=timeout)

    def state(self):
        return self.guest.call("call", {"function": GUEST_IO + "guest_state"})

    def alive(self):
        """Failed if the guest's process died (the frontend crashed)."""
        code = self.guest.proc.poll()
        if code is not None:
            raise Failed("the frontend's process died (exit status %d)" % code)


class SandboxFrontends:
    """Our frontend in guests of the embedded sandbox.  A context manager."""

    target = "blkif.frontend.BlockDevice (sandbox guest, sim platform)"
    debug = False

    def __init__(self, workdir=None):
        from blkif.sandbox import Sandbox
        self.sandbox = Sandbox(workdir)
        self._domids = itertools.count(1)

    def __enter__(self):
        from blkif import toolstack
        from xenstore import Xenstore, domain_socket_path
        self.sandbox.__enter__()
        box = self.sandbox
        toolstack.introduce(box.dom0, BACKEND_DOMID)
        self.xs = Xenstore.open(domain_socket_path(box.xenstore, BACKEND_DOMID))
        self.platform = open_platform("sim", domid=BACKEND_DOMID, path=box.sim_path)
        return self

    def __exit__(self, *exc):
        self.platform.close()
        self.xs.close()
        self.sandbox.__exit__(*exc)

    @contextlib.contextmanager
    def peer_for(self, case):
        from blkif import toolstack
        box = self.sandbox
        domid = next(self._domids)
        toolstack.introduce(box.dom0, domid)
        devid = toolstack.create(box.dom0, domid, "xvda", "ram-disk-%d" % domid, "w",
                                 backend_domid=BACKEND_DOMID)
        backend = BackendPeer(self.xs, self.platform, BACKEND_DOMID, domid, devid)
        guest = box.start_guest(domid)
        try:
            yield FrontendUnderTest(backend, guest)
        finally:
            backend.stop()
            with contextlib.suppress(Exception):
                backend.switch(XenbusState.Closed)  # the guest detaches at once
            guest.quit(timeout=5)
            box.guests.remove(guest)
            box.procs.pop("guest-%d" % domid, None)
            backend.close()
            with contextlib.suppress(Exception):
                toolstack.destroy(box.dom0, domid, "xvda", BACKEND_DOMID)


def xen_disk(xs, platform, domid, vdev):
    """On real Xen: a new VBD ``vdev`` of domain ``domid`` (any left of it
    removed first: a run that died before its cleanup, or a remake), of type
    :data:`XEN_KIND`, and the suite in dom0 as its backend."""
    from blkif import toolstack
    devid = toolstack.vdev_to_devid(vdev)
    for path in (toolstack.frontend_path(domid, devid),
                 toolstack.backend_path(0, domid, devid, XEN_KIND)):
        if xs.exists(path):
            xs.rm(path)
    toolstack.create(xs, domid, vdev, "ram-disk-%s" % vdev, "w", kind=XEN_KIND)
    return BackendPeer(xs, platform, 0, domid, devid, kind=XEN_KIND)


class XenFrontends:
    """Our frontend in a process of dom0 on real Xen, the suite being its
    backend in dom0 too (dom0 maps its own grants, as a driver domain would
    a guest's).  The suite's VBDs are of xenbus type :data:`XEN_KIND`, which
    neither Linux xen-blkback nor ``blkif serve`` serves, so both may run.
    A context manager."""

    target = "blkif.frontend.BlockDevice (dom0 process, xen platform)"
    debug = False

    def __init__(self, workdir=None):
        self.workdir = workdir
        self._devids = itertools.count(0)

    def __enter__(self):
        from xenstore import Xenstore
        self.platform = open_platform("xen", domid=0)
        self.xs = Xenstore.open()
        self._tmp = None
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="blkif-conformance-")
            self.workdir = self._tmp.name
        os.makedirs(self.workdir, exist_ok=True)
        return self

    def __exit__(self, *exc):
        self.xs.close()
        self.platform.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    @contextlib.contextmanager
    def peer_for(self, case):
        from blkif import toolstack
        from blkif.sandbox import spawn_guest
        vdev = "xvd" + "abcdefghijklmnopqrstuvwxyz"[next(self._devids) % 26]
        backend = xen_disk(self.xs, self.platform, 0, vdev)
        guest = spawn_guest(0, os.path.join(self.workdir, "frontend-%s.log" % case.id),
                            "--platform", "xen")
        try:
            yield FrontendUnderTest(backend, guest, vdev)
        finally:
            backend.stop()
            with contextlib.suppress(Exception):
                backend.switch(XenbusState.Closed)  # the frontend detaches at once
            guest.quit(timeout=5)
            backend.close()
            with contextlib.suppress(Exception):
                toolstack.destroy(self.xs, 0, vdev)


class GuestFrontends:
    """The frontend of guest ``domid`` on real Xen (Linux blkfront, or any
    other), which runs :data:`~.console_agent.AGENT` on its console: the
    suite, in dom0, is its backend (xenbus type :data:`XEN_KIND`) and adds a
    disk per case (xvdb, xvdc, ...), and the agent does the case's I/O in
    the guest.  ``console`` is the console's tty (default: the guest's
    ``console/tty`` node, the pty of xenconsoled).  A disk whose I/O hung
    (Linux blkfront leaves a request of a disk it disabled in flight for
    good) is removed only at the end: removing it blocks the guest's xenbus
    thread, and with it every later disk.  A context manager."""

    debug = False
    VDEVS = ["xvd" + c for c in "bcdefghijklmnopqrstuvwxyz"]

    def __init__(self, domid, console=None, workdir=None, timeout=20.0):
        self.domid, self.console, self.workdir, self.timeout = domid, console, workdir, timeout
        self.target = "the frontend of domain %d (console agent)" % domid
        self._vdevs = iter(self.VDEVS)
        self.left = []  # disks of cases whose I/O hung: removed only at the end

    def __enter__(self):
        from blkif.conformance.frontend.console_agent import AgentError, ConsoleAgent
        from xenstore import Xenstore
        self.xs = Xenstore.open()
        if self.console is None:
            self.console = self.xs.read_str("/local/domain/%d/console/tty" % self.domid, None)
            if self.console is None:
                self.xs.close()
                raise AgentError("domain %d has no console/tty node: is it running?"
                                 % self.domid)
        self.log = None
        if self.workdir is not None:
            os.makedirs(self.workdir, exist_ok=True)
            self.log = open(os.path.join(self.workdir, "guest-%d-console.log" % self.domid),
                            "a")
        self.agent = ConsoleAgent(self.console, self.log)
        try:
            self.agent.call("ping", timeout=self.timeout)
        except AgentError:
            self.__exit__(None, None, None)
            raise AgentError("domain %d does not answer on %s: is the agent running on its "
                             "console (docs/conformance.md)?" % (self.domid, self.console))
        self.agent.klog()  # what it printed before the first case is not the first case's
        self.platform = open_platform("xen", domid=0)
        return self

    def __exit__(self, *exc):
        from blkif import toolstack
        for vdev in self.left:
            with contextlib.suppress(Exception):
                toolstack.destroy(self.xs, self.domid, vdev)
        self.agent.close()
        if getattr(self, "platform", None) is not None:
            self.platform.close()
        if self.log is not None:
            self.log.close()
        self.xs.close()

    def _remove(self, fut):
        """Remove the case's disk; the guest lets go of it."""
        from blkif import toolstack
        toolstack.destroy(self.xs, self.domid, fut.vdev)
        ok, text = fut.wait_disk("gone")
        if not ok:
            raise Failed("the guest kept its disk after the toolstack removed it: %s" % text)

    @contextlib.contextmanager
    def peer_for(self, case):
        from blkif.conformance.frontend.console_agent import ConsoleFrontendUnderTest
        vdev = next(self._vdevs, None)
        if vdev is None:
            raise RuntimeError("more than %d cases: no disk name left" % len(self.VDEVS))

        def disk():
            return xen_disk(self.xs, self.platform, self.domid, vdev)

        def remake():
            self._remove(fut)
            return disk()
        fut = ConsoleFrontendUnderTest(disk(), self.agent, vdev, self.timeout, remake)
        if self.log is not None:
            self.log.write("=== case %s on %s\n" % (case.id, vdev))
        try:
            yield fut
            fut.alive()  # after every case: no oops, and the guest still answers
        finally:
            fut.backend.stop()
            with contextlib.suppress(Exception):
                fut.backend.switch(XenbusState.Closed)
            fut.backend.close()
            if fut.hung:  # removing it now would block the guest's xenbus on the hung I/O
                self.left.append(vdev)
            else:
                with contextlib.suppress(Exception):
                    self._remove(fut)
            with contextlib.suppress(Exception):
                fut.collect()
                if self.log is not None:
                    self.log.write("".join("kernel: %s\n" % line for line in fut.kernel))
