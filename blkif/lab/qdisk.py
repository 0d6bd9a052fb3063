"""``blkif lab`` phase ``qdisk``: our backend beside Linux xen-blkback, from xl.

One PV guest, two disks from an ordinary xl config: xvda ``phy:`` on a loop
device, served by the kernel's xen-blkback (loaded), and xvdb
``format=qcow2,backendtype=qdisk`` with ``device_model_override`` naming
``blkif-device-model``, served by ``blkif serve`` with its default
``--types auto`` (qdisk only, since xen-blkback is loaded).  The guest runs
the verified workload and mkfs/e2fsck on both disks.  While it runs, both
VBDs must be Connected and the device model ``running``; ``blkif vbd resize``
grows the qcow2 image under its daemon and the guest's blkfront must see the
new size of xvdb; ``xl destroy`` must
remove both VBDs (the qdisk one without a handshake), end the device model
and leave nothing held by the service.  The host then runs ``qemu-img
check`` on the image and compares both disks' bytes with what the guest read.

Only :class:`QdiskRun` talks to the lab; the rest is pure.
"""
import os
import subprocess
import tempfile
import time

from blkif.lab import phases, workload

PHASE = "qdisk"
GUEST = "lab-qdisk"
PHY_IMAGE = "/run/lab/qdisk-phy.img"
QCOW2_IMAGE = "/run/lab/qdisk.qcow2"
QDISK_VDEV, QDISK_DEVID = "xvdb", 51728  # (202 << 8) | (1 << 4)
MEMORY_MB = 384
SERVE_READY = 120  # seconds for a cold blkif serve in the emulated dom0 to watch xenstore
PREPARE = """modprobe -a xen-blkback loop
mkdir -p /run/lab && rm -f {phy} {qcow2}
truncate -s {size} {phy}
qemu-img create -q -f qcow2 {qcow2} {size}
losetup -f --show {phy}
"""
WAIT_SERVING = """for i in $(seq {tries}); do
  grep -q '"state": *"running"' {state}/service.json 2>/dev/null && exit 0
  kill -0 $(cat {pidfile}) 2>/dev/null || {{ echo "blkif serve exited:"; tail -5 {log}; exit 1; }}
  sleep 0.5
done
echo "blkif serve not serving after {seconds} s"; tail -5 {log}; exit 1
"""
NODES = """for p in /local/domain/0/backend/vbd/{domid}/{vbd} /local/domain/{domid}/device/vbd/{vbd} \\
         /local/domain/0/backend/qdisk/{domid}/{qdisk} /local/domain/{domid}/device/vbd/{qdisk}; do
  echo "$p $(xenstore-read $p/state)"
done
echo "device-model $(xenstore-read /local/domain/0/device-model/{domid}/state)"
"""
GONE = """for i in $(seq 150); do
  xenstore-exists /local/domain/0/backend/qdisk/{domid} || break; sleep 0.2
done
xenstore-exists /local/domain/0/backend/qdisk/{domid} && {{ echo "qdisk nodes still there"; exit 1; }}
for i in $(seq 150); do
  pgrep -f 'blkif-device-model -xen-domid {domid} ' > /dev/null \\
    || pgrep -f 'qemu-storage-daemon.*{qcow2}' > /dev/null || exit 0
  sleep 0.2
done
echo "still running: $(pgrep -af 'blkif-device-model|qemu-storage-daemon')"; exit 1
"""


def disks(loop, qcow2=QCOW2_IMAGE):
    """The guest's xl disk specs: kernel blkback's, then ours."""
    return ["phy:%s,%s,w" % (loop, phases.VDEV),
            "format=qcow2,vdev=%s,access=rw,backendtype=qdisk,target=%s" % (QDISK_VDEV, qcow2)]


def device_model(python):
    """``blkif-device-model`` beside the venv's Python (pip installs it there)."""
    return os.path.join(os.path.dirname(python), "blkif-device-model")


def both_connected(out, domid):
    """(status, detail) from NODES' output: all four ends Connected, model running."""
    states = dict(line.rsplit(" ", 1) for line in out.strip().splitlines() if " " in line)
    want = {p: "4" for p in states if p != "device-model"}
    want["device-model"] = "running"
    ok = len(states) == 5 and states == want
    detail = "; ".join("%s=%s" % (p.replace("/local/domain/", ""), s)
                       for p, s in sorted(states.items()))
    return ("pass" if ok else "fail"), detail


def serves_only_qdisk(log_text):
    """(status, detail): did ``--types auto`` leave backend/vbd to the kernel?"""
    for line in log_text.splitlines():
        if "serving VBDs under" in line:
            roots = line.split("serving VBDs under", 1)[1].split("(state")[0].strip()
            ok = roots.endswith("/backend/qdisk") and "/backend/vbd" not in roots
            return ("pass" if ok else "fail"), "blkif serve watches %s" % roots
    return "fail", "no 'serving VBDs under' line in serve's log"


def qemu_img_check(image):
    """(status, detail) of ``qemu-img check`` on the host."""
    proc = subprocess.run(["qemu-img", "check", "-f", "qcow2", image],
                          capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).strip().splitlines() or [""]
    said = [line for line in lines if "error" in line.lower()] or lines[-1:]
    return ("pass" if proc.returncode == 0 else "fail"), "qemu-img check: %s" % said[0]


def qcow2_matches(image, md5s, zeroed):
    """(status, detail): the image, read by qemu-img as raw, holds the guest's chunks."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "qdisk.raw")
        proc = subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, raw],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            return "fail", "qemu-img convert: %s" % proc.stderr.strip()
        status, detail = phases.image_matches(raw, md5s, zeroed)
        return status, detail.replace(raw, image)


class QdiskRun:
    def __init__(self, lab):
        self.lab = lab
        self.pidfile = os.path.join(lab.workdir, "ctl", "serve-qdisk.pid")
        self.serve_log = os.path.join(lab.logs, "serve-qdisk.log")
        self.disks_dir = os.path.join(lab.workdir, "disks")

    def run(self):
        lab, start = self.lab, time.monotonic()
        loop = lab.sh("%s: images" % PHASE, PREPARE.format(
            phy=PHY_IMAGE, qcow2=QCOW2_IMAGE, size=phases.DISK_BYTES)).out.strip().splitlines()[-1]
        lab.report.add(PHASE, "images", "pass", "xvda %s <- %s (xen-blkback); xvdb %s (qcow2)"
                       % (loop, PHY_IMAGE, QCOW2_IMAGE), time.monotonic() - start)
        try:
            self._serve()
            guest = self._guest(loop)
            lab.sh("%s: stop blkif serve" % PHASE, phases.SERVE_STOP.format(pidfile=self.pidfile))
            self._check_images(guest)
        finally:
            lab.cleanup_sh(phases.SERVE_STOP.format(pidfile=self.pidfile))
            lab.cleanup_sh("cp /var/log/xen/qemu-dm-%s.log %s/ 2>/dev/null; losetup -d %s; "
                           "rm -f %s %s" % (GUEST, lab.logs, loop, PHY_IMAGE, QCOW2_IMAGE))
        return "xvda on xen-blkback, xvdb qcow2 on blkif serve, one guest"

    def _serve(self):
        lab, start = self.lab, time.monotonic()
        lab.sh("%s: start blkif serve" % PHASE, phases.SERVE_LAUNCH.format(
            argv=phases.serve_argv(lab.python), log=self.serve_log, pidfile=self.pidfile))
        lab.sh("%s: blkif serve ready" % PHASE, WAIT_SERVING.format(
            tries=SERVE_READY * 2, seconds=SERVE_READY, state=phases.STATE_DIR,
            pidfile=self.pidfile, log=self.serve_log), SERVE_READY + 10)
        with open(self.serve_log, errors="replace") as f:
            lab.report.add(PHASE, "blkif serve beside xen-blkback", *serves_only_qdisk(f.read()),
                           seconds=time.monotonic() - start)

    def _guest(self, loop):
        lab = self.lab
        domid, guest = lab.run_guest(
            PHASE, GUEST, disks(loop), "full", memory=MEMORY_MB,
            extra=phases.guest_extra("full") + " labdisks=%s,%s" % (phases.VDEV, QDISK_VDEV),
            options={"device_model_override": device_model(lab.python)})
        out = lab.sh("%s: nodes" % PHASE, NODES.format(domid=domid, vbd=phases.DEVID,
                                                       qdisk=QDISK_DEVID)).out
        lab.report.add(PHASE, "both backends Connected", *both_connected(out, domid))
        lab.resize_row(PHASE, domid, QDISK_VDEV, GUEST)  # the qcow2 grows under its daemon
        lab.destroy(PHASE, GUEST, domid)
        start = time.monotonic()
        lab.sh("%s: qdisk cleanup" % PHASE, GONE.format(domid=domid, qcow2=QCOW2_IMAGE))
        lab.report.add(PHASE, "xl destroy: qdisk", "pass", "backend/qdisk removed, device "
                       "model and qemu-storage-daemon exited", time.monotonic() - start)
        lab.backend_released_row(PHASE, domid)
        return guest

    def _check_images(self, guest):
        lab, start = self.lab, time.monotonic()
        os.makedirs(self.disks_dir, exist_ok=True)
        phy = os.path.join(self.disks_dir, "qdisk-phy.img")
        qcow2 = os.path.join(self.disks_dir, "qdisk.qcow2")
        lab.sh("%s: copy images" % PHASE, "cp %s %s && cp %s %s" % (PHY_IMAGE, phy,
                                                                     QCOW2_IMAGE, qcow2))
        zeroed = workload.discard_range(phases.DISK_BYTES)
        try:
            lab.report.add(PHASE, "qcow2 image", *qemu_img_check(qcow2),
                           seconds=time.monotonic() - start)
            lab.report.add(PHASE, "qcow2 image holds xvdb",
                           *qcow2_matches(qcow2, guest.disk_md5.get(QDISK_VDEV, {}), zeroed))
            lab.report.add(PHASE, "phy image holds xvda",
                           *phases.image_matches(phy, guest.disk_md5.get(phases.VDEV, {}),
                                                 zeroed))
        finally:
            for path in (phy, qcow2):
                os.unlink(path)
