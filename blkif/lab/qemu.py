"""Xen + dom0 under QEMU's software emulation.

``/dev/kvm`` on these machines cannot run Xen, so QEMU runs TCG with
``-cpu max,xsave=off`` (see CPU).  QEMU loads Xen as a multiboot kernel (it must be gunzipped) and
dom0's kernel and initramfs as multiboot modules: ``-initrd "KERNEL ARGS,INITRD"``
(a comma list, hence no commas allowed in those paths or args).  Xen needs
``smap=0 smep=0`` under TCG or dom0 faults in create_bounce_frame.  The host's
``/`` goes to dom0 read-only over 9p (``hostroot``) and the work directory
read-write (``labshare``).  Xen's and dom0's console is COM1, a file.

A PVH dom0 (``dom0="pvh"``) needs what Xen 4.17 insists on for one, an
IOMMU: a q35 machine with QEMU's AMD IOMMU (TCG's CPU is AMD's, with SVM),
and the 9p devices behind it (``iommu_platform``: a PVH dom0's guest frames
are not machine frames, so a device that bypassed the IOMMU would DMA to the
wrong memory).  The CPU hides RDTSCP, which Xen's SVM cannot emulate on TCG.
"""
import ctypes
import gzip
import os
import shutil
import signal
import subprocess
import time

from blkif.errors import BlkifError, UsageError

QEMU = "qemu-system-x86_64"
XEN_GZ = "/boot/xen-4.17-amd64.gz"
XEN_ARGS = (
    "dom0_mem=1G,max:1G dom0_max_vcpus=2 console=com1 com1=115200,8n1 "
    "loglvl=all guest_loglvl=all bootscrub=0 noreboot smap=0 smep=0"
)
DOM0_ARGS = "console=hvc0 earlyprintk=xen"


# No XSAVE (so no AVX either): with QEMU 7.2's TCG, processes in dom0 saw
# their vector/FPU state corrupted under load (sha256 of the same bytes
# differing, math.log giving NaN, glibc "corrupted double-linked list" in xl,
# a worker's malloc crashing).  FXSAVE and SSE only are old, solid TCG paths.
CPU = "max,xsave=off"

DOM0_KINDS = ("pv", "pvh")


def qemu_argv(xen, vmlinuz, initrd, workdir, serial_log, memory_mb=3072, smp=2,
              xen_args=XEN_ARGS, dom0_args=DOM0_ARGS, dom0="pv"):
    """QEMU's argument list for Xen + dom0 (``dom0`` one of DOM0_KINDS)
    with the host root and lab shares.

    Raises UsageError for a path or argument QEMU's comma lists cannot carry.
    """
    module = "%s %s" % (vmlinuz, dom0_args)
    for what, text in (("path", xen), ("dom0 kernel", module), ("initrd", initrd),
                       ("workdir", workdir), ("serial log", serial_log)):
        if "," in text:
            raise UsageError("the %s must not contain a comma: %r" % (what, text))
    pvh = dom0 == "pvh"
    shares = []
    for tag, path, extra in (("hostroot", "/", ",readonly=on"), ("labshare", workdir, "")):
        shares += ["-fsdev", "local,id=%s,path=%s,security_model=none,multidevs=remap%s"
                   % (tag, path, extra),
                   "-device", "virtio-9p-pci,fsdev=%s,mount_tag=%s%s"
                   % (tag, tag, ",iommu_platform=on,disable-legacy=on" if pvh else "")]
    machine = ["-machine", "q35", "-device", "amd-iommu"] if pvh else []
    return [
        QEMU,
        "-accel", "tcg,thread=multi",
        "-cpu", CPU + (",rdtscp=off" if pvh else ""),
        *machine,
        "-smp", str(smp),
        "-m", str(memory_mb),
        "-display", "none",
        "-monitor", "none",
        "-nic", "none",
        "-no-reboot",
        "-serial", "file:" + serial_log,
        "-kernel", xen,
        "-append", xen_args + (" dom0=pvh" if pvh else ""),
        "-initrd", "%s,%s" % (module, initrd),
        *shares,
    ]


def unpack_xen(dest, source=XEN_GZ):
    """Gunzip Xen to ``dest`` unless an up-to-date copy is there; returns dest."""
    if not os.path.exists(source):
        raise BlkifError("%s missing (apt-get install xen-hypervisor-4.17-amd64)" % source)
    if os.path.exists(dest) and os.path.getmtime(dest) >= os.path.getmtime(source):
        return dest
    with gzip.open(source, "rb") as src, open(dest + ".tmp", "wb") as out:
        shutil.copyfileobj(src, out)
    os.rename(dest + ".tmp", dest)
    return dest


PR_SET_PDEATHSIG = 1


def _die_with_parent():
    """In the child before exec: the kernel SIGKILLs QEMU if the lab dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Qemu:
    """One QEMU process; ``stop`` always leaves none behind, and a lab killed
    outright takes QEMU with it (PR_SET_PDEATHSIG)."""

    def __init__(self, argv, log_path):
        self.argv = argv
        self.log_path = log_path
        self.proc = None
        self.started = None

    def start(self):
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        self.started = time.monotonic()

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def stop(self, grace=10):
        """SIGTERM, ``grace`` seconds, then SIGKILL; returns QEMU's exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(grace)
        return self.proc.returncode

    def output(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""
