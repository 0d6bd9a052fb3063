"""In the lab's dom0: the backend conformance suite against one backend.

``python -m blkif.lab.conformance_run --backend blkback|serve|qdisk`` makes
three VBDs whose frontend is dom0 itself (xvda and xvdb writable, xvdc
read-only), runs ``blkif conformance backend --platform xen`` against them
and prints its JSON report, then removes the VBDs.  ``blkback``: Linux
xen-blkback on loop devices (``physical-device`` written as the block
hotplug script does); ``serve``: a ``blkif serve`` already running in dom0,
on image files; ``qdisk``: QEMU's xen-block, started here as dom0's own
device model (``-xen-domid 0``: it serves ``backend/qdisk/0``), on image
files named ``aio:`` as libxl names them.
"""
import argparse
import contextlib
import os
import subprocess
import sys
import time

from blkif import toolstack
from blkif.conformance import catalogue, report
from blkif.conformance.backend.session import TargetBackends
from blkif.lab.frontend_check import device_number, raise_gntalloc_limit
from xenstore import Xenstore, XenbusState

VBDS = (("xvda", "w"), ("xvdb", "w"), ("xvdc", "r"))
IMAGE_BYTES = 16 << 20
WORK = "/run/lab/conformance"
# Debian's qemu-system-xen; the argv libxl gives a PV guest's model, minus QMP.
QEMU_XEN = "/usr/libexec/xen-qemu-system-i386"
QEMU_ARGV = (QEMU_XEN, "-xen-domid", "0", "-xen-attach", "-name", "dom0-conformance",
             "-nodefaults", "-no-user-config", "-nographic", "-display", "none",
             "-machine", "xenpv", "-m", "64")


def prepare(xs, backend):
    """Create the VBDs; {vdev: its target} (loop devices for blkback, which
    are detached afterwards)."""
    os.makedirs(WORK, exist_ok=True)
    targets = {}
    for vdev, mode in VBDS:
        image = os.path.join(WORK, vdev + ".img")
        with open(image, "wb") as f:
            f.truncate(IMAGE_BYTES)
        target = "aio:" + image if backend == "qdisk" else image
        if backend == "blkback":
            target = subprocess.run(["losetup", "-f", "--show", image], check=True,
                                    capture_output=True, text=True).stdout.strip()
        targets[vdev] = target
        make_vbd(xs, backend, vdev, mode, target)
    return targets


def make_vbd(xs, backend, vdev, mode, target):
    """The VBD's nodes, as its toolstack writes them (any left are removed first)."""
    devid = toolstack.vdev_to_devid(vdev)
    for path in (toolstack.frontend_path(0, devid),
                 toolstack.backend_path(0, 0, devid, "vbd"),
                 toolstack.backend_path(0, 0, devid, "qdisk")):
        if xs.exists(path):  # a run that died before its cleanup, or a VBD made afresh
            xs.rm(path)
    devid = toolstack.create(xs, 0, vdev, target, mode,
                             kind="qdisk" if backend == "qdisk" else "vbd")
    if backend == "blkback":
        xs.write(toolstack.backend_path(0, 0, devid) + "/physical-device",
                 device_number(target))


def remake(xs, backend, targets, qemu=None):
    """The suite's ``recreate``: a VBD an earlier case left unable to start
    over is removed (its backend given a second to let go) and made afresh;
    QEMU, which a bad ring can leave wedged, is started again around it."""
    def recreate(vdev):
        devid = toolstack.vdev_to_devid(vdev)
        if qemu is not None:
            qemu.stop()
        with contextlib.suppress(Exception):
            toolstack.destroy(xs, 0, vdev)
        for _ in range(50):
            if qemu is not None or not xs.exists(toolstack.find_backend(xs, 0, 0, devid)):
                break
            time.sleep(0.1)
        time.sleep(1)
        make_vbd(xs, backend, vdev, dict(VBDS)[vdev], targets[vdev])
        if qemu is not None:
            qemu.start()
    return recreate


def cleanup(xs, targets):
    for vdev, _ in VBDS:
        try:
            toolstack.destroy(xs, 0, vdev)
        except Exception as exc:  # noqa: BLE001 - best effort, reported
            print("cleanup: %s: %s" % (vdev, exc), file=sys.stderr)
    time.sleep(1)  # let the backend close before its devices go
    for target in targets.values():
        if target.startswith("/dev/loop"):
            subprocess.run(["losetup", "-d", target], check=False)


def all_afresh(xs, targets, qemu):
    """Before each case on QEMU: QEMU stopped, every VBD made afresh, QEMU
    started and every VBD InitWait again.  A case can leave QEMU wedged (a
    ring overrun) or a device half torn down; the next case must not pay."""
    def fresh():
        qemu.stop()
        for vdev, mode in VBDS:
            make_vbd(xs, "qdisk", vdev, mode, targets[vdev])  # removes the old nodes first
        qemu.start()
        deadline = time.monotonic() + 20
        for vdev, _ in VBDS:
            back = toolstack.backend_path(0, 0, toolstack.vdev_to_devid(vdev), "qdisk")
            # QEMU 7.2 removes a VBD it fails to create: the read-only one
            # ("Block node is read-only"), so waiting for it is in vain.
            while xs.exists(back) and xs.read_state(back + "/state") != XenbusState.InitWait:
                if time.monotonic() > deadline:
                    return  # the case will say what it finds
                time.sleep(0.1)
    return fresh


class Qemu:
    """QEMU serving dom0's qdisk VBDs (``start``/``stop``; a context manager)."""

    def __init__(self):
        self.proc = None
        self.log = os.path.join(WORK, "qemu-qdisk.log")

    def start(self):
        os.makedirs(WORK, exist_ok=True)
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(QEMU_ARGV, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        time.sleep(2)
        if self.proc.poll() is not None:
            with open(self.log) as f:
                raise SystemExit("QEMU exited (%d): %s" % (self.proc.returncode,
                                                         f.read()[-500:]))

    def stop(self):
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m blkif.lab.conformance_run",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("blkback", "serve", "qdisk"), required=True)
    parser.add_argument("--timeout", type=float, default=20.0,
                        help="seconds a correct backend may take (dom0 under TCG is slow)")
    args = parser.parse_args(argv)
    raise_gntalloc_limit()
    if args.backend == "blkback":
        subprocess.run(["modprobe", "-a", "xen-blkback", "loop"], check=True)
    elif args.backend == "serve" and os.path.exists("/sys/module/xen_blkback"):
        parser.error("xen-blkback is loaded: it would claim blkif serve's VBDs too")
    qemu = Qemu() if args.backend == "qdisk" else contextlib.nullcontext()
    with Xenstore.open() as xs, qemu:
        targets = prepare(xs, args.backend)
        try:
            with TargetBackends("xen", None, 0, "xvda", "xvdb", "xvdc",
                                recreate=remake(xs, args.backend, targets,
                                                qemu if args.backend == "qdisk" else None),
                                fresh=all_afresh(xs, targets, qemu)
                                if args.backend == "qdisk" else None) as session:
                session.timeout = args.timeout
                results = report.run_cases(catalogue.load("backend"), session, sys.stderr)
        finally:
            cleanup(xs, targets)
    print(report.as_json(results, "backend", args.backend))
    return 0


if __name__ == "__main__":
    sys.exit(main())
