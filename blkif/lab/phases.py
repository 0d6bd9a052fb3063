"""The lab's phases, run in order against one Xen host.

    build     unpack Xen, write both initramfs images and dom0's init
    boot      QEMU up to dom0's command agent (blkif.lab.control)
    dom0      xen modules, xenfs, xenstored, xen-init-dom0, xenconsoled
    baseline  Linux xen-blkback on a loop device serving a PV guest's
              xen-blkfront: verified workload, negotiated values from
              both sides of xenstore, the calculator's memory and grant
              figures against Xen's (blkif.lab.capacity), xl destroy
    backend   our ``blkif serve`` vs Linux blkfront: the same guest cycle,
              plus the service's own counters and the image's bytes
    frontend  our ``blkif.frontend`` in dom0 vs Linux blkback
              (``blkif.lab.frontend_check``)
    qdisk     xen-blkback and ``blkif serve`` side by side in one guest, the
              second through xl's qdisk backend (``blkif.lab.qdisk``)
    conformance  ``blkif conformance backend`` in dom0 against Linux
              xen-blkback, QEMU's qdisk, then our ``blkif serve``
              (``blkif.lab.conformance_run``); then ``blkif conformance
              frontend --platform xen`` against our frontend in dom0 and
              against Linux xen-blkfront in a guest (its console agent);
              the results go to WORKDIR/conformance.json (docs/conformance.md's
              comparison table), differences are findings, not failures

Every step has a deadline (its own timeout, capped by the run's); a step that
fails raises StepFailed, which ends the run after recording the step and the
console tails.  ``Lab.close`` always stops QEMU.  Guests are driven by
``run_guest``: xl create, wait for ``LAB DONE`` on the console log that
xenconsoled writes into the share, then one report row per guest check.
"""
import importlib.util
import json
import os
import shlex
import time

from blkif.errors import BlkifError
from blkif.lab import capacity, control, initramfs, qemu, workload

PHASES = ("boot", "dom0", "baseline", "backend", "frontend", "qdisk")
# Only with --only: each outlasts make lab's budget.
OPTIONAL_PHASES = ("conformance", "restart", "restart-qcow2")
XEN_BIN = "/usr/lib/xen-4.17/bin"
DISK_BYTES = 64 << 20
RESIZE_GROWTH = 4 << 20  # the backend phase grows its image by this under the guest
GUEST_MEMORY_MB = 256
GUEST_VCPUS = 2
# xen-blkfront parameters for the guest (its init passes them to insmod).
BLKFRONT_PARAMS = "max_queues=2,max_ring_page_order=2,max_indirect_segments=32"
# Against our backend blkfront takes all 256 indirect segments it offers; with
# persistent grants it then preallocates 128 slots x 257 pages per queue
# (257 MiB for two), so that guest gets more memory.
BACKEND_BLKFRONT_PARAMS = "max_queues=2,max_ring_page_order=2,max_indirect_segments=256"
BACKEND_GUEST_MEMORY_MB = 512
# Below the ~390 grants the workload's requests touch, so both of the engine's
# ways of mapping meet the real gntdev: grants kept in its LRU, and the rest
# mapped and unmapped with their request.
BACKEND_MAX_PERSISTENT_GRANTS = 128
# Our backend's image and state live in dom0's tmpfs (9p cannot punch holes,
# so an image in the share could not be discarded); the image is copied into
# the share afterwards for the host to check.
BACKEND_IMAGE = "/run/lab/backend.img"
STATE_DIR = "/run/blkif"
VDEV = "xvda"
DEVID = 51712  # xvda: (202 << 8) | (0 << 4), docs/misc/vbd-interface.txt

# Steps' own timeouts in seconds (measured times are in docs/lab.md).
TIMEOUTS = {
    "boot": 180,
    "dom0": 90,
    "create": 120,
    "guest": 300,
    "destroy": 60,
    "command": 60,
    "conformance": 2400,  # one implementation's suite under TCG (QEMU, a fresh one per case: >1200 s)
}
CONFORMANCE_RUN = "{python} -m blkif.lab.conformance_run --backend {name} 2> {log}"
# The frontend suite: our frontend and the suite's backend both in dom0 (exit
# status 1 is a MUST case failed: a finding, in the report's row).
CONFORMANCE_FRONTEND_RUN = ("{python} -c 'from blkif.lab.frontend_check import "
                            "raise_gntalloc_limit as r; r()'\n"
                            "{python} -m blkif conformance frontend --platform xen --json "
                            "--workdir {workdir} 2> {log}; rc=$?; [ $rc -le 1 ] || exit $rc")
CONFORMANCE_FRONTEND = ("frontend", "blkif frontend (dom0)")
# The frontend suite against Linux xen-blkfront in a guest running the
# suite's console agent (labmode=agent), the suite being its backend in dom0.
CONFORMANCE_BLKFRONT_RUN = ("{python} -m blkif conformance frontend --platform xen "
                            "--guest {domid} --timeout 30 --json --workdir {workdir} "
                            "2> {log}; rc=$?; [ $rc -le 1 ] || exit $rc")
CONFORMANCE_BLKFRONT = ("blkfront", "Linux xen-blkfront (6.1)")
CONFORMANCE_GUEST = "lab-conf-blkfront"
# The column each run fills in docs/conformance.md's comparison table.
CONFORMANCE_BACKENDS = (("blkback", "Linux xen-blkback (6.1)"), ("qdisk", "QEMU qdisk (7.2)"),
                        ("serve", "blkif serve"))
CONFORMANCE_RUNS = CONFORMANCE_BACKENDS + (CONFORMANCE_FRONTEND, CONFORMANCE_BLKFRONT)

DOM0_SETUP = """modprobe -a xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd
mountpoint -q /proc/xen || mount -t xenfs xenfs /proc/xen
{bin}/xenstored --pid-file /run/xenstored.pid
{bin}/xen-init-dom0
mkdir -p {console}
{bin}/xenconsoled --log=all --log-dir={console} --pid-file=/run/xenconsoled.pid
for d in evtchn gntdev gntalloc privcmd xenbus xenbus_backend; do
  [ -e /dev/xen/$d ] || {{ echo "missing /dev/xen/$d"; exit 1; }}
done
xl info | grep -E '^(xen_version|nr_cpus|total_memory|free_memory)'
"""


# The backend phase (see Lab.backend and docs/lab.md).  libxl runs the hotplug
# script with "add" or "remove" and XENBUS_PATH set to the backend directory.
HOTPLUG_SCRIPT = """#!/bin/sh
# blkif lab: a userspace backend needs no device set up; just say so to libxl.
[ "$1" = add ] && xenstore-write "$XENBUS_PATH/hotplug-status" connected
exit 0
"""
SERVE_LAUNCH = """PYTHONFAULTHANDLER=1 setsid {argv} > {log} 2>&1 < /dev/null &
echo $! > {pidfile}
sleep 3
kill -0 $(cat {pidfile}) || {{ echo "blkif serve exited:"; tail -5 {log}; exit 1; }}
"""
# Alone on the host: kernel blkback unloaded (it would claim our VBDs too).
SERVE_ALONE = "rmmod xen-blkback 2>/dev/null || true\n" + SERVE_LAUNCH
# The same on a fresh image.
SERVE_START = SERVE_ALONE.replace(
    "\n", "\nmkdir -p /run/lab && rm -f {image} && truncate -s {size} {image}\n", 1)
SERVE_STOP = """pid=$(cat {pidfile})
kill -TERM $pid
for i in $(seq 50); do kill -0 $pid 2>/dev/null || exit 0; sleep 0.2; done
echo "blkif serve still running after SIGTERM"; kill -KILL $pid; exit 1
"""
# The frontend phase runs this in dom0 (blkif/lab/frontend_check.py).
FRONTEND_CHECK = ("{python} -m blkif.lab.frontend_check --backend-domid 0 --target {loop} "
                  "--seed {seed}")
# The VBD frontend_check creates: dom0 is both ends, vdev xvda.
FRONTEND_BACKEND = "/local/domain/0/backend/vbd/0/%d" % DEVID
FRONTEND_FRONTEND = "/local/domain/0/device/vbd/%d" % DEVID


def serve_argv(python, state_dir=STATE_DIR, options=""):
    """How dom0 starts our backend: the project's venv Python, xen platform,
    info logging (every state switch and connection goes to serve.log)."""
    return ("%s -m blkif -v serve --platform xen --state-dir %s %s"
            % (python, state_dir, options)).rstrip()


def stats_argv(python, state_dir=STATE_DIR):
    return "%s -m blkif stats --state-dir %s --json" % (python, state_dir)


def backend_disk_spec(image, script):
    """xl disk spec for a VBD our backend serves (libxl writes the nodes)."""
    return "format=raw,vdev=%s,access=rw,backendtype=phy,script=%s,target=%s" % (
        VDEV, script, image)


def image_matches(path, md5s, zeroed=None):
    """(status, detail): does the image hold each chunk's md5 the guest
    reported, and zeros in the ``zeroed`` (offset, length) range it discarded?"""
    import hashlib

    bad = []
    with open(path, "rb") as f:
        for index, (offset, size, digest) in sorted(md5s.items()):
            f.seek(offset)
            if hashlib.md5(f.read(size)).hexdigest() != digest:
                bad.append(index)
        if zeroed is not None:
            f.seek(zeroed[0])
            if f.read(zeroed[1]) != bytes(zeroed[1]):
                return "fail", "the discarded range at %d of %s is not zeros" % (zeroed[0], path)
    if not md5s:
        return "fail", "the guest reported no chunks"
    if bad:
        return "fail", "%d of %d chunks differ in %s (first: %d)" % (len(bad), len(md5s), path, bad[0])
    return "pass", "%d chunks in %s equal what the guest wrote%s" % (
        len(md5s), path, ", discarded MiB zeros" if zeroed is not None else "")


def resize_seen(console, sectors, vdev=VDEV):
    """(status, detail): did the guest's console (its init reports each new
    size of each disk) show blkfront taking ``sectors`` for ``vdev``?"""
    seen = workload.parse_console(console).values.get("resized_" + vdev)
    if seen == str(sectors):
        return "pass", "/sys/block/%s/size in the guest is %d after the resize" % (vdev, sectors)
    return "fail", "the guest's /sys/block/%s/size %s, want %d" % (
        vdev, "never changed" if seen is None else "became " + seen, sectors)


def stats_vbds(stats, domid):
    """(status entries, finished entries) of ``domid`` in ``blkif stats --json``."""
    service = stats.get("service") or {}
    return ([v for v in stats.get("vbds", []) if v.get("domid") == domid],
            [f for f in service.get("finished", []) if f.get("domid") == domid])


def backend_in_use(stats, domid, queues):
    """(status, detail): the service's view of a connected guest that ran the
    workload: Connected, one mapped ring and bound channel per queue, and
    counters showing indirect requests, persistent grants, grants mapped with
    their request (the cache being smaller than the workload), flushes and
    discards."""
    vbds, _ = stats_vbds(stats, domid)
    if len(vbds) != 1:
        return "fail", "blkif stats lists %d VBDs of domain %d" % (len(vbds), domid)
    vbd = vbds[0]
    c, neg = vbd["counters"], vbd.get("negotiated", {})
    ops = c.get("ops", {})
    detail = ("rings %d, channels %d, persistent grants %d, %d mapped per request; "
              "%d requests: %d indirect, %d flush, %d discard, %d errors" % (
                  vbd["rings_mapped"], vbd["channels_bound"], c.get("persistent_grants", 0),
                  c.get("mapped_grants", 0), c.get("requests", 0), c.get("indirect", 0), ops.get("flush_diskcache", 0),
                  ops.get("discard", 0), c.get("errors", 0)))
    ok = (vbd["state"] == "Connected" and vbd["rings_mapped"] == queues
          and vbd["channels_bound"] == queues and neg.get("queues") == queues
          and neg.get("persistent") and c.get("persistent_grants", 0) > 0
          and c.get("mapped_grants", 0) > 0
          and c.get("indirect", 0) > 0 and ops.get("flush_diskcache", 0) > 0
          and ops.get("discard", 0) > 0 and not c.get("errors"))
    return ("pass" if ok else "fail"), detail


def stats_summary(stats, domid):
    """The service's own view of ``domid``'s VBD, flat, for the report."""
    out = {}
    for vbd in stats_vbds(stats, domid)[0]:
        c = vbd["counters"]
        out.update(state=vbd["state"], rings_mapped=vbd["rings_mapped"],
                   channels_bound=vbd["channels_bound"])
        out.update(sorted(vbd.get("negotiated", {}).items()))
        out.update((k, c.get(k)) for k in ("requests", "indirect", "persistent_grants",
                                           "read_bytes", "write_bytes", "errors"))
        out.update(("op_" + k, v) for k, v in sorted(c.get("ops", {}).items()))
    return out


def backend_released(stats, domid):
    """(status, detail, settled): after ``xl destroy`` the service holds
    nothing of ``domid``: its worker exited and its final counters show no
    mapped ring, bound channel or persistent grant.  ``settled`` is False
    while the worker is still running (ask again)."""
    service = stats.get("service") or {}
    running = [w for w in service.get("workers", []) if w.get("domid") == domid]
    vbds, finished = stats_vbds(stats, domid)
    if running:
        return "fail", "worker of domain %d still %s" % (domid, running[0].get("status")), False
    held = [(e.get("rings_mapped"), e.get("channels_bound"),
             e.get("persistent_grants", (e.get("counters") or {}).get("persistent_grants")))
            for e in vbds + finished]
    leaks = [h for h in held if any(h)]
    if not finished:
        return "fail", "no final counters for domain %d's worker" % domid, True
    if leaks:
        return "fail", "rings/channels/persistent grants still held: %s" % (leaks,), True
    return "pass", "worker exited (%s); rings_mapped 0, channels_bound 0, persistent grants 0" % (
        finished[-1].get("exit")), True


class StepFailed(BlkifError):
    def __init__(self, step, detail, output=""):
        BlkifError.__init__(self, "%s: %s" % (step, detail))
        self.step = step
        self.detail = detail
        self.output = output


def xl_config(name, kernel, ramdisk, disk, extra, memory=GUEST_MEMORY_MB, vcpus=GUEST_VCPUS,
              options=None):
    """Text of an ``xl create`` config for a PV guest with a disk spec (or a
    list of them) and any other ``options`` (name -> string value)."""
    disks = [disk] if isinstance(disk, str) else list(disk)
    lines = [
        ("name", repr(name)),
        ("type", '"pv"'),
        ("kernel", repr(kernel)),
        ("ramdisk", repr(ramdisk)),
        ("extra", repr(extra)),
        ("memory", str(memory)),
        ("vcpus", str(vcpus)),
        ("disk", "[%s]" % ", ".join(map(repr, disks))),
        ("on_crash", '"preserve"'),
    ] + [(key, repr(value)) for key, value in (options or {}).items()]
    return "".join("%s = %s\n" % line for line in lines).replace("'", '"')


def guest_extra(mode, blkfront=BLKFRONT_PARAMS):
    return "console=hvc0 quiet labmode=%s labblk=%s" % (mode, blkfront)


def available_backend():
    """Why ``blkif serve`` cannot run yet, or None when it can."""
    from blkif.cli import COMMANDS

    return None if "serve" in COMMANDS else "not yet available: no `blkif serve` command"


def available_frontend():
    """Why our frontend phase cannot run yet, or None when it can."""
    if importlib.util.find_spec("blkif.frontend") is None:
        return "not yet available: no blkif.frontend module"
    if importlib.util.find_spec("blkif.lab.frontend_check") is None:
        return "not yet available: blkif.frontend exists, blkif/lab/frontend_check.py does not"
    return None


class Lab:
    """One run: the work directory, QEMU, dom0's agent and the report."""

    def __init__(self, workdir, report, timeout=600, python=None, dom0="pv"):
        self.workdir = os.path.abspath(workdir)
        self.dom0_kind = dom0  # qemu.DOM0_KINDS
        self.report = report
        self.deadline = time.monotonic() + timeout
        self.python = python or os.path.join(_project_root(), ".venv", "bin", "python")
        self.logs = os.path.join(self.workdir, "logs")
        self.console = os.path.join(self.workdir, "console")
        self.qemu = None
        self.dom0 = control.Dom0(self.workdir, alive=self._alive)
        self.kernel = None
        self.plan = None
        self.seed = 1
        self.guests = {}  # name -> ConsoleReport
        self.conformance_only = None  # names of CONFORMANCE_RUNS to run, or None: all

    # -- plumbing ---------------------------------------------------------

    def _alive(self):
        return self.qemu is not None and self.qemu.alive()

    def budget(self, step_timeout, step):
        """``step_timeout`` capped by what is left of the run's; StepFailed if none."""
        left = self.deadline - time.monotonic()
        if left <= 1:
            raise StepFailed(step, "the run's --timeout is used up")
        return max(1, min(step_timeout, int(left)))

    def sh(self, step, body, timeout=TIMEOUTS["command"], check=True):
        """Run ``body`` in dom0; StepFailed on a non-zero status when ``check``."""
        try:
            result = self.dom0.run(body, self.budget(timeout, step))
        except control.Dom0Error as exc:
            raise StepFailed(step, str(exc))
        if check and not result.ok:
            reason = "timed out" if result.rc == 124 else "exit status %d" % result.rc
            last = result.out.strip().splitlines()[-1:] or [""]
            raise StepFailed(step, "%s: %s" % (reason, last[0]), result.out)
        return result

    def cleanup_sh(self, body, timeout=30):
        """Best-effort dom0 command in a ``finally``: outside the run's budget,
        errors ignored, so it never hides the failure being handled."""
        if self._alive():
            try:
                self.dom0.run(body, timeout)
            except control.Dom0Error:
                pass

    def timed(self, phase, check, fn, *args):
        """Run ``fn``, add a pass row with its detail (a string) and wall time."""
        start = time.monotonic()
        detail = fn(*args)
        self.report.add(phase, check, "pass", detail or "", time.monotonic() - start)
        return detail

    def console_log(self, name):
        return os.path.join(self.console, "guest-%s.log" % name)

    def serial_tail(self):
        try:
            with open(os.path.join(self.logs, "serial.log"), errors="replace") as f:
                return f.read()[-20000:]
        except OSError:
            return ""

    # -- build and boot ---------------------------------------------------

    def build(self, seed):
        for d in (self.workdir, self.logs, self.console, os.path.join(self.workdir, "guests")):
            os.makedirs(d, exist_ok=True)
        version, vmlinuz = initramfs.find_kernel()
        self.kernel = vmlinuz
        xen = qemu.unpack_xen(os.path.join(self.workdir, "xen"))
        dom0_cpio = os.path.join(self.workdir, "dom0.cpio")
        size0 = initramfs.build_dom0(dom0_cpio, version, self.workdir)
        with open(os.path.join(self.workdir, "dom0-init.sh"), "w") as f:
            f.write(control.dom0_init(self.workdir))
        self.seed = seed
        self.plan = workload.make_plan(seed, DISK_BYTES)
        discard = "%d %d\n" % workload.discard_range(DISK_BYTES)
        guest_cpio = os.path.join(self.workdir, "guest.cpio")
        size1 = initramfs.build_guest(guest_cpio, version, workload.plan_text(self.plan), discard)
        self.argv = qemu.qemu_argv(xen, vmlinuz, dom0_cpio, self.workdir,
                                   os.path.join(self.logs, "serial.log"), dom0=self.dom0_kind)
        return "kernel %s, %s dom0 initramfs %d KiB, guest %d KiB, plan seed %d (%d chunks)" % (
            version, self.dom0_kind.upper(), size0 >> 10, size1 >> 10, seed, len(self.plan))

    def boot(self):
        self.dom0.reset()
        for name in os.listdir(self.console):
            os.unlink(os.path.join(self.console, name))
        self.qemu = qemu.Qemu(self.argv, os.path.join(self.logs, "qemu.log"))
        self.qemu.start()
        try:
            kernel, uptime = self.dom0.wait_ready(self.budget(TIMEOUTS["boot"], "boot"))[:2]
        except control.Dom0Error as exc:
            raise StepFailed("boot", str(exc), self.qemu.output())
        return "QEMU pid %d, dom0 %s, agent at dom0 uptime %ss" % (self.qemu.pid, kernel, uptime)

    def setup_dom0(self):
        body = DOM0_SETUP.format(bin=XEN_BIN, console=self.console)
        out = self.sh("dom0 setup", body, TIMEOUTS["dom0"]).out
        info = dict(
            (k.strip(), v.strip()) for k, _, v in
            (line.partition(":") for line in out.splitlines() if ":" in line)
        )
        return "Xen %s, %s CPUs, %s MiB free; xenstored, xenconsoled up" % (
            info.get("xen_version", "?"), info.get("nr_cpus", "?"), info.get("free_memory", "?"))

    # -- guests -----------------------------------------------------------

    def run_guest(self, phase, name, disk, mode, blkfront=BLKFRONT_PARAMS,
                  memory=GUEST_MEMORY_MB, vcpus=GUEST_VCPUS, ramdisk=None, extra=None,
                  timeout=TIMEOUTS["guest"], options=None):
        """xl create a guest, wait for its ``LAB DONE``, add a row per check.

        The workload guest by default; ``ramdisk`` and ``extra`` (its kernel
        command line) make another.  Returns (domid, ConsoleReport).
        StepFailed if it never finishes within ``timeout`` seconds.
        """
        cfg = os.path.join(self.workdir, "guests", name + ".cfg")
        with open(cfg, "w") as f:
            f.write(xl_config(name, self.kernel,
                              ramdisk or os.path.join(self.workdir, "guest.cpio"), disk,
                              extra or guest_extra(mode, blkfront), memory=memory,
                              vcpus=vcpus, options=options))
        start = time.monotonic()
        self.sh("%s: xl create %s" % (phase, name), "xl create %s" % shlex.quote(cfg),
                TIMEOUTS["create"])
        domid = self.sh("%s: xl domid" % phase, "xl domid %s" % name).out.strip()
        self.report.add(phase, "xl create " + name, "pass", "domid %s" % domid,
                        time.monotonic() - start)
        log = self.console_log(name)
        deadline = time.monotonic() + self.budget(timeout, "%s: guest %s" % (phase, name))
        guest = workload.ConsoleReport()
        while guest.done is None:
            if not self._alive():
                raise StepFailed("%s: guest %s" % (phase, name), "QEMU exited")
            if time.monotonic() > deadline:
                raise StepFailed("%s: guest %s" % (phase, name),
                                 "no LAB DONE on its console within %ds" % timeout)
            time.sleep(0.5)
            if os.path.exists(log):
                with open(log, errors="replace") as f:
                    guest = workload.parse_console(f.read())
        self.guests[name] = guest
        for check, passed, detail in guest.checks:
            self.report.add(phase, "guest %s" % check, "pass" if passed else "fail", detail)
        self.report.add(phase, "guest %s done" % name, "pass" if guest.done == 0 else "fail",
                        "rc=%d" % guest.done, time.monotonic() - start)
        if guest.done != 0:
            raise StepFailed("%s: guest %s" % (phase, name), "guest checks failed")
        return int(domid), guest

    def read_negotiated(self, phase, domid, backend_domid=0):
        """Both sides' xenstore nodes of the VBD; adds them to the report."""
        back = "/local/domain/%d/backend/vbd/%d/%d" % (backend_domid, domid, DEVID)
        front = "/local/domain/%d/device/vbd/%d" % (domid, DEVID)
        out = self.sh("%s: xenstore-ls" % phase,
                      "xenstore-ls -f %s\necho ====\nxenstore-ls -f %s" % (back, front)).out
        back_text, _, front_text = out.partition("====")
        backend = workload.summarize_backend(workload.parse_xenstore_ls(back_text, back))
        frontend = workload.summarize_frontend(workload.parse_xenstore_ls(front_text, front))
        self.report.negotiated["%s backend (%s)" % (phase, back)] = backend
        self.report.negotiated["%s frontend (%s)" % (phase, front)] = frontend
        if backend.get("state") != "4" or frontend.get("state") != "4":
            raise StepFailed("%s: xenstore" % phase, "states backend=%s frontend=%s, want 4/4" % (
                backend.get("state"), frontend.get("state")))
        return backend, frontend

    def destroy(self, phase, name, domid, backend_domid=0, kind="vbd"):
        """xl destroy, then wait for libxl to remove the backend directory."""
        back = "/local/domain/%d/backend/%s/%d" % (backend_domid, kind, domid)
        body = ("xl destroy %s\n"
                "for i in $(seq 150); do xenstore-exists %s || exit 0; sleep 0.2; done\n"
                "echo backend nodes still there: ; xenstore-ls -f %s; exit 1") % (name, back, back)
        start = time.monotonic()
        self.sh("%s: xl destroy %s" % (phase, name), body, TIMEOUTS["destroy"])
        self.report.add(phase, "xl destroy " + name, "pass", "backend nodes removed",
                        time.monotonic() - start)

    # -- phases -----------------------------------------------------------

    def guest_cycle(self, phase, disk, blkfront=BLKFRONT_PARAMS, memory=GUEST_MEMORY_MB,
                    connected=None, destroyed=None, recreate=True):
        """The guest half of a phase against one disk spec.

        Guest 1 (labmode=full) runs the workload; both sides' xenstore nodes
        are read; xl destroy; with ``recreate``, guest 2 (labmode=verify)
        re-reads every chunk through the same backend and must see guest 1's
        data; xl destroy.  ``connected(domid)`` runs while guest 1 is still
        up after its workload, ``destroyed(domid)`` after each xl destroy.
        Returns guest 1's ConsoleReport.
        """
        domid, first = self.run_guest(phase, "lab-%s-1" % phase, disk, "full", blkfront, memory)
        backend, frontend = self.read_negotiated(phase, domid)
        self.report.negotiated["%s guest (/sys/block/xvda)" % phase] = dict(first.values)
        self.report.add(phase, "negotiated", "pass", negotiated_summary(backend, frontend, first))
        if connected:
            connected(domid)
        self.destroy(phase, "lab-%s-1" % phase, domid)
        if destroyed:
            destroyed(domid)
        if not recreate:
            return first
        domid2, second = self.run_guest(phase, "lab-%s-2" % phase, disk, "verify", blkfront,
                                        memory)
        self.report.add(phase, "re-create reads data", *compare_md5(first, second))
        self.destroy(phase, "lab-%s-2" % phase, domid2)
        if destroyed:
            destroyed(domid2)
        return first

    def baseline(self):
        """Linux blkback (loop device in dom0 tmpfs) serving Linux blkfront."""
        phase = "baseline"
        start = time.monotonic()
        loop = self.sh("%s: loop device" % phase, (
            "modprobe -a xen-blkback loop\n"
            "mkdir -p /run/lab && truncate -s %d /run/lab/baseline.img\n"
            "losetup -f --show /run/lab/baseline.img") % DISK_BYTES).out.strip().splitlines()[-1]
        self.report.add(phase, "blkback on loop", "pass",
                        "%s <- /run/lab/baseline.img (%d MiB, dom0 tmpfs)" % (loop, DISK_BYTES >> 20),
                        time.monotonic() - start)
        try:
            # One guest: the re-create is proven against our backend; this
            # control keeps the run well inside its 10 minutes on a busy host.
            host = capacity.host_for(BLKFRONT_PARAMS, GUEST_MEMORY_MB, GUEST_VCPUS, "blkback")
            first = self.guest_cycle(phase, "phy:%s,%s,w" % (loop, VDEV), recreate=False,
                                     connected=lambda domid: self.capacity_rows(phase, domid, host))
            self.report.add(phase, "calc: blkfront memory",
                            *capacity.memory_check(first.values, host))
        finally:
            self.cleanup_sh("losetup -d %s; rm -f /run/lab/baseline.img" % loop)

    def backend(self):
        """Our ``blkif serve`` (xen platform, in dom0) serving Linux blkfront.

        Kernel blkback is unloaded so it cannot claim the VBD; libxl still
        writes the usual nodes (backendtype=phy) and runs HOTPLUG_SCRIPT, which
        only reports connected; our backend takes the VBD from Initialising.
        While guest 1 is up, ``blkif stats`` must show its rings, channels and
        counters of indirect requests, persistent grants, flushes and
        discards; then ``blkif vbd resize`` grows the image and the guest's
        blkfront must see the new size; after each xl destroy, nothing held.  Finally the image is
        copied into the share and the host checks its bytes.
        """
        phase = "backend"
        disks = os.path.join(self.workdir, "disks")
        os.makedirs(disks, exist_ok=True)
        copy = os.path.join(disks, "backend.img")
        if os.path.exists(copy):
            os.unlink(copy)
        script = os.path.join(self.workdir, "hotplug-connected.sh")
        with open(script, "w") as f:
            f.write(HOTPLUG_SCRIPT)
        os.chmod(script, 0o755)
        serve_log = os.path.join(self.logs, "serve.log")
        pidfile = os.path.join(self.workdir, "ctl", "serve.pid")
        start = time.monotonic()
        self.sh("%s: start blkif serve" % phase, SERVE_START.format(
            argv=serve_argv(self.python, options="--max-persistent-grants %d"
                            % BACKEND_MAX_PERSISTENT_GRANTS),
            log=serve_log, pidfile=pidfile,
            image=BACKEND_IMAGE, size=DISK_BYTES))
        self.report.add(phase, "blkif serve", "pass", "%s (%d MiB, dom0 tmpfs); log %s" % (
            BACKEND_IMAGE, DISK_BYTES >> 20, serve_log), time.monotonic() - start)
        queues = int(dict(p.split("=") for p in BACKEND_BLKFRONT_PARAMS.split(","))["max_queues"])
        host = capacity.host_for(BACKEND_BLKFRONT_PARAMS, BACKEND_GUEST_MEMORY_MB,
                                 GUEST_VCPUS, "blkif",
                                 max_persistent_grants=BACKEND_MAX_PERSISTENT_GRANTS)
        try:
            first = self.guest_cycle(
                phase, backend_disk_spec(BACKEND_IMAGE, script), BACKEND_BLKFRONT_PARAMS,
                BACKEND_GUEST_MEMORY_MB,
                connected=lambda domid: self.backend_connected(phase, domid, queues, host),
                destroyed=lambda domid: self.backend_released_row(phase, domid))
            self.report.add(phase, "calc: blkfront memory",
                            *capacity.memory_check(first.values, host))
            start = time.monotonic()
            self.sh("%s: stop blkif serve" % phase, SERVE_STOP.format(pidfile=pidfile))
            self.report.add(phase, "blkif serve stops on SIGTERM", "pass", "",
                            time.monotonic() - start)
        except BaseException:
            self.cleanup_sh(SERVE_STOP.format(pidfile=pidfile))
            self.cleanup_sh("rm -f %s" % BACKEND_IMAGE)
            raise
        start = time.monotonic()
        self.sh("%s: copy image" % phase, "cp %s %s && rm -f %s" % (BACKEND_IMAGE, copy,
                                                                     BACKEND_IMAGE))
        self.report.add(phase, "host image", *image_matches(
            copy, first.md5, workload.discard_range(DISK_BYTES)),
            seconds=time.monotonic() - start)
        os.unlink(copy)

    def stats(self, phase):
        """``blkif stats --json`` in dom0, parsed."""
        out = self.sh("%s: blkif stats" % phase, stats_argv(self.python)).out
        try:
            return json.loads(out[out.index("{"):])
        except ValueError:
            raise StepFailed("%s: blkif stats" % phase, "not JSON: %s" % out[-200:], out)

    def backend_stats_row(self, phase, domid, queues, host):
        start = time.monotonic()
        stats = self.stats(phase)
        summary = stats_summary(stats, domid)
        self.report.negotiated["%s service (blkif stats, domain %d)" % (phase, domid)] = summary
        status, detail = backend_in_use(stats, domid, queues)
        self.report.add(phase, "blkif stats: in use", status, detail, time.monotonic() - start)
        self.report.add(phase, "calc: grants our backend maps",
                        *capacity.backend_maps_check(summary, host))

    def backend_connected(self, phase, domid, queues, host):
        self.backend_stats_row(phase, domid, queues, host)
        self.resize_row(phase, domid)

    def resize_row(self, phase, domid, vdev=VDEV, guest=None):
        """Online resize: ``blkif vbd resize`` grows ``vdev``'s image under
        the running guest (``guest``, default lab-PHASE-1); Linux blkfront
        must take the new size."""
        start = time.monotonic()
        size = DISK_BYTES + RESIZE_GROWTH
        self.sh("%s: blkif vbd resize %s" % (phase, vdev), "%s -m blkif vbd resize --domid %d "
                "--vdev %s --size %d" % (self.python, domid, vdev, size))
        log = self.console_log(guest or "lab-%s-1" % phase)
        deadline = time.monotonic() + 20
        while True:
            with open(log, errors="replace") as f:
                status, detail = resize_seen(f.read(), size // 512, vdev)
            if status == "pass" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        self.report.add(phase, "online resize" + ("" if vdev == VDEV else " " + vdev), status,
                        detail, time.monotonic() - start)

    def backend_released_row(self, phase, domid):
        start = time.monotonic()
        for _ in range(15):
            status, detail, settled = backend_released(self.stats(phase), domid)
            if settled:
                break
            time.sleep(1)
        self.report.add(phase, "blkif stats: released d%d" % domid, status, detail,
                        time.monotonic() - start)

    def capacity_rows(self, phase, domid, host):
        """Xen's grant tables against the calculator (blkif.lab.capacity)."""
        dump = capacity.grant_dump(self, phase)
        filled = self.guests["lab-%s-1" % phase].values.get("fill_kb", "0") != "0"
        for check, status, detail in capacity.grant_checks(dump, domid, host, filled):
            self.report.add(phase, "calc: " + check, status, detail)

    def frontend(self):
        """Our frontend in dom0 vs Linux blkback on a loop device in dom0.

        ``blkif.lab.frontend_check`` prints ``LAB CHECK`` lines (one row
        each here), both VBD directories as ``xenstore-ls -f`` prints them
        (the negotiated values), and a summary as its last line.
        """
        phase = "frontend"
        start = time.monotonic()
        loop = self.sh("%s: loop device" % phase, (
            "modprobe -a xen-blkback loop\n"
            "mkdir -p /run/lab && truncate -s %d /run/lab/frontend.img\n"
            "losetup -f --show /run/lab/frontend.img") % DISK_BYTES).out.strip().splitlines()[-1]
        self.report.add(phase, "blkback on loop", "pass",
                        "%s <- /run/lab/frontend.img (%d MiB, dom0 tmpfs)" % (loop, DISK_BYTES >> 20),
                        time.monotonic() - start)
        try:
            start = time.monotonic()
            result = self.sh("%s: frontend_check" % phase, FRONTEND_CHECK.format(
                python=self.python, loop=loop, seed=self.seed), TIMEOUTS["guest"], check=False)
            seconds = time.monotonic() - start
        finally:
            self.cleanup_sh("losetup -d %s; rm -f /run/lab/frontend.img" % loop)
        report = workload.parse_console(result.out)
        for check, passed, detail in report.checks:
            self.report.add(phase, check, "pass" if passed else "fail", detail)
        back, front = frontend_check_nodes(result.out)
        self.report.negotiated["%s backend (%s)" % (phase, FRONTEND_BACKEND)] = back
        self.report.negotiated["%s frontend (%s)" % (phase, FRONTEND_FRONTEND)] = front
        ours = {k: v for k, v in report.values.items() if not k.startswith("blkback_")}
        self.report.negotiated["%s our device (dev.negotiated)" % phase] = ours
        self.report.negotiated["%s blkback statistics (sysfs)" % phase] = {
            k[len("blkback_"):]: v for k, v in report.values.items() if k.startswith("blkback_")}
        last = result.out.strip().splitlines()[-1:] or ["no output"]
        if not result.ok or not report.checks:
            reason = "timed out" if result.rc == 124 else "exit status %d" % result.rc
            raise StepFailed("%s: frontend_check" % phase, "%s: %s" % (reason, last[0]), result.out)
        self.report.add(phase, "negotiated", "pass", last[0], seconds)

    def conformance(self):
        """The backend conformance suite in dom0 against Linux xen-blkback,
        QEMU's qdisk, then our ``blkif serve``, and the frontend suite against
        our frontend in dom0; one row each (a MUST case an implementation
        fails is a finding, reported in the detail, not a failure of the lab).  Writes
        WORKDIR/conformance.json: {implementation: {case id: status}}."""
        phase = "conformance"
        pidfile = os.path.join(self.workdir, "ctl", "serve.pid")
        table = {}
        for name, label in [run for run in CONFORMANCE_RUNS if self.conformance_only is None
                            or run[0] in self.conformance_only]:
            start = time.monotonic()
            if name == "serve":
                self.sh("%s: start blkif serve" % phase, SERVE_START.format(
                    argv=serve_argv(self.python), log=os.path.join(self.logs, "serve-conf.log"),
                    pidfile=pidfile, image="/run/lab/unused.img", size=1 << 20))
            if name == "blkfront":
                domid = self.agent_guest(phase)
            log = os.path.join(self.logs, "conformance-%s.log" % name)
            if name == "frontend":
                command = CONFORMANCE_FRONTEND_RUN.format(
                    python=self.python, log=log, workdir=os.path.join(self.logs, "frontends"))
            elif name == "blkfront":
                command = CONFORMANCE_BLKFRONT_RUN.format(
                    python=self.python, log=log, domid=domid,
                    workdir=os.path.join(self.logs, "blkfront"))
            else:
                command = CONFORMANCE_RUN.format(python=self.python, name=name, log=log)
            try:
                out = self.sh("%s: %s" % (phase, name), command, TIMEOUTS["conformance"]).out
            finally:
                if name == "serve":
                    self.cleanup_sh(SERVE_STOP.format(pidfile=pidfile))
                if name == "qdisk":
                    self.cleanup_sh("cp /run/lab/conformance/qemu-qdisk.log %s/" % self.logs)
                if name == "blkfront":
                    self.cleanup_sh("xl destroy %s" % CONFORMANCE_GUEST)
            try:
                doc = json.loads(out[out.index("{"):])
            except ValueError:
                raise StepFailed("%s: %s" % (phase, name), "not JSON: %s" % out[-200:], out)
            table[label] = conformance_column(doc)
            with open(os.path.join(self.workdir, "conformance-%s.json" % name), "w") as f:
                f.write(out[out.index("{"):])
            counts = {s: list(table[label].values()).count(s)
                      for s in ("PASS", "FAIL", "SKIP", "ERROR")}
            self.report.add(phase, "suite vs %s" % label, "pass", "%s; MUST failed: %s" % (
                " ".join("%s %d" % kv for kv in counts.items()),
                ", ".join(doc["must_failures"]) or "none"), time.monotonic() - start)
        with open(os.path.join(self.workdir, "conformance.json"), "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)

    def agent_guest(self, phase):
        """Start the guest whose blkfront the frontend suite tests (no disk
        of its own; its init runs the console agent); its domid once the
        agent says it is ready."""
        name = CONFORMANCE_GUEST
        cfg = os.path.join(self.workdir, "guests", name + ".cfg")
        with open(cfg, "w") as f:
            f.write(xl_config(name, self.kernel, os.path.join(self.workdir, "guest.cpio"), [],
                              guest_extra("agent")))
        self.sh("%s: xl create %s" % (phase, name), "xl create %s" % shlex.quote(cfg),
                TIMEOUTS["create"])
        domid = int(self.sh("%s: xl domid" % phase, "xl domid %s" % name).out.strip())
        log = self.console_log(name)
        deadline = time.monotonic() + self.budget(TIMEOUTS["guest"], "%s: agent" % phase)
        while True:
            if os.path.exists(log):
                with open(log, errors="replace") as f:
                    if "AGENT 0 ok ready" in f.read():
                        return domid
            if not self._alive() or time.monotonic() > deadline:
                raise StepFailed("%s: guest %s" % (phase, name),
                                 "its console agent never said it was ready")
            time.sleep(0.5)

    def close(self):
        """Stop QEMU and check nothing is left: (status, detail) for the cleanup row."""
        if self.qemu is None:
            return "pass", "QEMU never started"
        status = self.qemu.stop()
        if self.qemu.alive():
            return "fail", "QEMU pid %d still running" % self.qemu.pid
        loops = host_loops(self.workdir)
        if loops:
            return "fail", "host loop devices on the work dir: " + ", ".join(loops)
        children = host_children()
        if children:
            return "fail", "processes of the lab still running: " + ", ".join(children)
        return "pass", "QEMU pid %d exited (status %s); no host loop devices or child processes" % (
            self.qemu.pid, status)


def host_loops(workdir, sysfs="/sys/block"):
    """Host loop devices whose backing file is under ``workdir``."""
    found = []
    for name in sorted(os.listdir(sysfs)) if os.path.isdir(sysfs) else ():
        try:
            with open(os.path.join(sysfs, name, "loop", "backing_file")) as f:
                backing = f.read().strip()
        except OSError:
            continue
        if backing == workdir or backing.startswith(workdir.rstrip("/") + "/"):
            found.append("/dev/%s (%s)" % (name, backing))
    return found


def host_children(pid=None, proc="/proc"):
    """``pid name`` of each live child of ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    found = []
    for task in os.listdir(os.path.join(proc, str(pid), "task")):
        try:
            with open(os.path.join(proc, str(pid), "task", task, "children")) as f:
                kids = f.read().split()
        except OSError:
            continue
        for kid in kids:
            try:
                with open(os.path.join(proc, kid, "stat")) as f:
                    stat = f.read()
            except OSError:
                continue  # gone meanwhile
            if stat.rsplit(")", 1)[-1].split()[0] != "Z":  # a zombie is not running
                found.append("%s %s" % (kid, stat[stat.index("(") + 1:stat.rindex(")")]))
    return found


def negotiated_summary(backend, frontend, guest):
    return ("indirect %s/max_segments %s, queues %s/%s, ring order %s/%s, persistent %s/%s, "
            "discard %s, flush %s") % (
        backend.get("feature-max-indirect-segments"), guest.values.get("max_segments"),
        backend.get("multi-queue-max-queues"), frontend.get("multi-queue-num-queues", "1"),
        backend.get("max-ring-page-order"), frontend.get("ring-page-order", "0"),
        backend.get("feature-persistent"), frontend.get("feature-persistent"),
        backend.get("feature-discard"), backend.get("feature-flush-cache"))


def conformance_column(doc):
    """A column of docs/conformance.md's comparison from one run's JSON report:
    {case id: status}, an INFO case's observed value in place of PASS."""
    return {r["id"]: r["observed"] if r["level"] == "INFO" and r["status"] == "PASS"
            else r["status"] for r in doc["results"]}


def frontend_check_nodes(out):
    """(backend, frontend) summaries of the xenstore dump frontend_check prints."""
    text = out.partition("LAB XENSTORE-BEGIN")[2].partition("LAB XENSTORE-END")[0]
    back = workload.parse_xenstore_ls(
        "\n".join(l for l in text.splitlines() if FRONTEND_BACKEND + "/" in l), FRONTEND_BACKEND)
    front = workload.parse_xenstore_ls(
        "\n".join(l for l in text.splitlines() if FRONTEND_FRONTEND + "/" in l), FRONTEND_FRONTEND)
    return workload.summarize_backend(back), workload.summarize_frontend(front)


def compare_md5(first, second):
    """(status, detail) of the second guest's reads against the first's writes."""
    if not first.md5:
        return "fail", "first guest reported no chunk checksums"
    differ = [i for i in first.md5 if second.md5.get(i) != first.md5[i]]
    if differ:
        return "fail", "%d of %d chunks differ (first: %s)" % (len(differ), len(first.md5), differ[0])
    return "pass", "%d chunks read back identical after destroy/create" % len(first.md5)


def _project_root():
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
