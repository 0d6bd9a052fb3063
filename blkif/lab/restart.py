"""``blkif lab --only restart``: our backend restarted under a running Linux guest.

A PV guest (blkfront's defaults, 1 vCPU) runs rounds of a crc32c-verified fio
job on /dev/xvda, served by ``blkif serve`` from an image in dom0's tmpfs:
random writes of 4 KiB to 1 MiB with an fdatasync (a blkif flush) every
eight, each round read back and checked.  Meanwhile the host SIGKILLs the
VBD's worker :data:`KILLS` times and, half way, stops the whole service for
an upgrade (SIGUSR1) and starts it again, while dom0 watches both ends'
xenbus state nodes (``xenstore-watch``: every write is seen).  It passes when
every round's verify passes, the guest's kernel log has no I/O error, neither
state was written with anything but Connected once both were, and the
service logged a resumed connection for each worker that took over.

Phase ``restart-qcow2`` does the same on a qcow2 image, the VBD made with
``blkif vbd create --target qcow2:...`` (served through a qemu-storage-daemon
that dies with each killed worker), and then runs ``qemu-img check`` on the
image once the service has stopped.

Only :class:`RestartRun` talks to the lab; the rest is pure.
"""
import json
import os
import time

from blkif.lab import initramfs, phases, workload

KILLS = 5
GAP = 4.0  # seconds of serving between a successor's resume and the next restart
ROUNDS = 32  # fio rounds the guest runs (4-10 s each under TCG): the restarts (60-90 s) land inside
RESUME_TIMEOUT = 90  # a cold worker start in the emulated dom0 takes up to ~15 s
IMAGE = "/run/lab/restart.img"
QCOW2_IMAGE = "/run/lab/restart.qcow2"
IMAGE_BYTES = 64 << 20
FORMATS = {"restart": "raw", "restart-qcow2": "qcow2"}  # phase -> the VBD's image
RAMDISK = "/run/lab/guest-restart.cpio.gz"
STATES_LOG = "/run/lab/restart-states.log"
FIO_ROUND = ("--name=restart --filename=/dev/xvda --direct=1 --ioengine=libaio "
             "--rw=randwrite --bssplit=4k/40:64k/30:1m/30 --iodepth=8 --size=24m "
             "--fdatasync=8 --verify=crc32c --do_verify=1 --verify_fatal=1 "
             "--output-format=terse")

RESTART_INIT = r"""#!/bin/sh
# blkif lab --only restart: guest init (generated).  Loads xen-blkfront, runs
# {rounds} rounds of a crc32c-verified fio job on /dev/xvda, then checks the
# kernel log and idles.
export PATH=/sbin:/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() {{ echo "LAB $*"; }}
for m in $(cat /etc/lab/modules); do insmod "$m" || say "WARN insmod $m failed"; done
i=0
while [ ! -b /dev/xvda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
if [ ! -b /dev/xvda ]; then say "CHECK attach fail no /dev/xvda"; say "DONE rc=1"; exec sleep 100000; fi
say "RESTART BEGIN"
FAILED=0
for r in $(seq {rounds}); do
  /usr/bin/fio $(cat /etc/lab/fio-round) > /tmp/fio.out 2>&1; rc=$?
  say "RESTART ROUND $r rc=$rc"
  if [ $rc != 0 ]; then tail -3 /tmp/fio.out | while read -r l; do say "WARN fio: $l"; done; FAILED=1; fi
done
if [ $FAILED = 0 ]; then say "CHECK fio-crc32c pass {rounds} rounds verified"
else say "CHECK fio-crc32c fail a round did not verify"; fi
if dmesg | grep -qiE 'I/O error|blk_update_request|Oops|BUG:'; then
  say "CHECK kernel-log fail $(dmesg | grep -iE 'I/O error|Oops|BUG:' | head -1)"; FAILED=1
else
  say "CHECK kernel-log pass no I/O error or oops"
fi
say "RESTART END"
say "DONE rc=$FAILED"
exec sleep 100000
""".format(rounds=ROUNDS)

# dom0: each write to either end's state node, "<time> <end> <value>" a line
# (a watch fires once when set, then on every write).
STATES_WATCH = """for end in back:{back} front:{front}; do
  setsid sh -c 'xenstore-watch "$1/state" | while read -r _; do
    echo "$(date +%s.%N) $2 $(xenstore-read "$1/state" 2>/dev/null || echo -)"; done' \
    sh "${{end#*:}}" "${{end%%:*}}" >> {log} 2>&1 < /dev/null &
  echo $! >> {pidfile}
done
"""


def states_verdict(text, until):
    """(status, detail) of the watch log up to time ``until``: once both ends
    read 4 (Connected), every later write must be 4 too."""
    events = sorted((float(t), end, value) for t, end, value in
                    (line.split() for line in text.splitlines() if len(line.split()) == 3))
    last, connected_at, after = {}, None, []
    for when, end, value in events:
        if when > until:
            break
        if connected_at is None:
            last[end] = value
            if last.get("back") == last.get("front") == "4":
                connected_at = when
        else:
            after.append((when, end, value))
    if connected_at is None:
        return "fail", "the VBD never reached Connected (%d writes seen)" % len(events)
    bad = [event for event in after if event[2] != "4"]
    if bad:
        return "fail", "left Connected: %s" % ", ".join(
            "%s wrote %s at %.1f" % (end, value, when) for when, end, value in bad[:3])
    return "pass", "%d writes of a state over %.0f s after both were Connected, all 4" % (
        len(after), until - connected_at)


def rounds_done(text):
    """Fio rounds the guest has finished so far (its console text)."""
    return text.count("LAB RESTART ROUND ")


class RestartRun:
    """The restart phase on a booted lab (``phases.Lab``)."""

    def __init__(self, lab, phase="restart"):
        self.lab, self.phase = lab, phase
        self.qcow2 = FORMATS[phase] == "qcow2"
        self.image = QCOW2_IMAGE if self.qcow2 else IMAGE
        self.ramdisk = os.path.join(lab.workdir, "guest-restart.cpio.gz")
        self.pidfile = os.path.join(lab.workdir, "ctl", "serve.pid")
        self.log = os.path.join(lab.logs, "serve-%s.log" % phase)

    def build(self):
        version = initramfs.find_kernel()[0]
        size = initramfs.build_perf_guest(self.ramdisk, version, RESTART_INIT,
                                          {"/etc/lab/fio-round": FIO_ROUND})
        return "restart guest initramfs %d MiB (fio and its libraries)" % (size >> 20)

    def _start_serve(self, step):
        self.lab.sh(step, SERVE_START.format(argv=phases.serve_argv(self.lab.python),
                                             log=self.log, pidfile=self.pidfile))

    def _worker_pid(self, domid):
        out = self.lab.sh("%s: service.json" % self.phase, "cat %s/service.json"
                          % phases.STATE_DIR).out
        for worker in json.loads(out[out.index("{"):])["workers"]:
            if worker["domid"] == domid and worker["status"] == "running":
                return worker["pid"]
        return None

    def run(self):
        lab, phase = self.lab, self.phase
        name = phase
        make = ("qemu-img create -q -f qcow2 {image} {size}" if self.qcow2
                else "truncate -s {size} {image}").format(image=self.image, size=IMAGE_BYTES)
        lab.sh("%s: image" % phase, "mkdir -p /run/lab && cp %s %s && rm -f %s && %s"
               " && : > %s && rm -f %s" % (self.ramdisk, RAMDISK, self.image, make,
                                           self.log, STATES_LOG),
               timeout=300)
        script = os.path.join(lab.workdir, "hotplug-connected.sh")
        with open(script, "w") as f:
            f.write(phases.HOTPLUG_SCRIPT)
        os.chmod(script, 0o755)
        watcher = os.path.join(lab.workdir, "ctl", "states.pid")
        if os.path.exists(watcher):
            os.unlink(watcher)
        self._start_serve("%s: start blkif serve" % phase)
        try:
            cfg = os.path.join(lab.workdir, "guests", name + ".cfg")
            disks = [] if self.qcow2 else phases.backend_disk_spec(self.image, script)
            with open(cfg, "w") as f:
                f.write(phases.xl_config(name, lab.kernel, RAMDISK, disks,
                                         "console=hvc0 quiet", memory=512, vcpus=1))
            lab.sh("%s: xl create" % phase, "xl create %s" % cfg, phases.TIMEOUTS["create"])
            domid = int(lab.sh("%s: xl domid" % phase, "xl domid %s" % name).out.strip())
            if self.qcow2:  # our toolstack writes the nodes libxl would
                lab.sh("%s: blkif vbd create" % phase, "%s -m blkif vbd create --domid %d "
                       "--vdev %s --target qcow2:%s" % (lab.python, domid, phases.VDEV,
                                                        self.image))
            lab.sh("%s: state watcher" % phase, STATES_WATCH.format(
                back="/local/domain/0/backend/vbd/%d/%d" % (domid, phases.DEVID),
                front="/local/domain/%d/device/vbd/%d" % (domid, phases.DEVID),
                log=STATES_LOG, pidfile=watcher))
            console = lab.console_log(name)
            self._wait(console, lambda text: "LAB RESTART BEGIN" in text, 300, "fio to start")
            done = self._restarts(domid, console)
            guest = self._wait(console, lambda text: "LAB DONE" in text, 900, "fio to finish")
            finished = float(lab.sh("%s: clock" % phase, "date +%s.%N").out.split()[-1])
            report = workload.parse_console(guest)
            for check, passed, detail in report.checks:
                lab.report.add(phase, "guest %s" % check, "pass" if passed else "fail",
                               detail)
            lab.report.add(phase, "restarts inside fio",
                           "fail" if done is None else "pass",
                           "fio finished before the restarts did" if done is None else
                           "%d worker kills and 1 service restart, all while fio ran (%d of %d "
                           "rounds done by then)" % (KILLS, done, ROUNDS))
            states = lab.sh("%s: states" % phase, "cat %s" % STATES_LOG).out
            lab.report.add(phase, "never left Connected", *states_verdict(states, finished))
            resumed = self._resumed()
            lab.report.add(phase, "successors resumed", "pass" if resumed == KILLS + 1
                           else "fail", "%d of %d successors resumed the connection"
                           % (resumed, KILLS + 1))
            if self.qcow2:
                self._destroy_and_check(name, domid)
            else:
                lab.destroy(phase, name, domid)
        finally:
            lab.cleanup_sh("kill -- $(sed 's/^/-/' %s) 2>/dev/null; rm -f %s %s"
                           % (watcher, watcher, STATES_LOG))
            lab.cleanup_sh(phases.SERVE_STOP.format(pidfile=self.pidfile))
            lab.cleanup_sh("rm -f %s %s" % (self.image, RAMDISK))
        return "%d kills and a service restart under fio%s" % (
            KILLS, " on a qcow2 image" if self.qcow2 else "")

    def _destroy_and_check(self, name, domid):
        """The guest and the VBD our toolstack made go, the service stops (its
        worker's daemon writes out the image), and the image must be clean."""
        lab, phase, start = self.lab, self.phase, time.monotonic()
        back = "/local/domain/0/backend/vbd/%d/%d" % (domid, phases.DEVID)
        lab.sh("%s: destroy" % phase, DESTROY_UNKNOWN.format(
            name=name, python=lab.python, domid=domid, vdev=phases.VDEV, back=back),
            2 * phases.TIMEOUTS["destroy"])  # a cold Python start in dom0 comes first
        lab.sh("%s: stop blkif serve" % phase, phases.SERVE_STOP.format(pidfile=self.pidfile))
        check = lab.sh("%s: qemu-img check" % phase, DAEMON_GONE.format(image=self.image)
                       + "qemu-img check %s" % self.image, check=False)
        said = [line for line in check.out.splitlines() if "error" in line.lower()]
        lab.report.add(phase, "qemu-img check after the kills",
                       "pass" if check.rc == 0 else "fail",
                       said[0].strip() if said else "exit status %d" % check.rc,
                       time.monotonic() - start)

    def _restarts(self, domid, console):
        """The kills, and the upgrade restart half way; the fio rounds
        finished by the last one, or None if the guest was done before it."""
        lab = self.lab
        for i in range(KILLS + 1):
            time.sleep(GAP)
            resumed = self._resumed()
            if i == KILLS // 2:
                lab.sh("%s: upgrade stop" % self.phase, "pid=$(cat {p}); kill -USR1 $pid; "
                       "for i in $(seq 100); do kill -0 $pid 2>/dev/null || exit 0; sleep 0.2; "
                       "done; exit 1".format(p=self.pidfile))
                self._start_serve("%s: start blkif serve again" % self.phase)
            else:
                self._kill_worker(domid)
            self._wait_resumed(resumed)
        with open(console, errors="replace") as f:
            text = f.read()
        return None if "LAB RESTART END" in text else rounds_done(text)

    def _kill_worker(self, domid):
        pid = None
        deadline = time.monotonic() + 30
        while pid is None and time.monotonic() < deadline:
            pid = self._worker_pid(domid)
        if pid is None:
            raise phases.StepFailed("%s: kill" % self.phase, "no running worker for d%d" % domid)
        self.lab.sh("%s: kill worker %d" % (self.phase, pid), "kill -KILL %d" % pid)

    def _resumed(self):
        """Connections the service's workers have resumed so far (its log)."""
        out = self.lab.sh("%s: serve log" % self.phase, "grep -c 'resumed the connection' %s || true"
                          % self.log).out
        return int(out.strip().splitlines()[-1])

    def _wait_resumed(self, before):
        """Until a successor has resumed the connection (the next restart
        must not land on a worker still starting)."""
        deadline = time.monotonic() + RESUME_TIMEOUT
        while self._resumed() <= before:
            if time.monotonic() > deadline:
                raise phases.StepFailed("%s: successor" % self.phase,
                                        "no worker resumed within %d s" % RESUME_TIMEOUT)
            time.sleep(1)

    def _wait(self, console, ready, timeout, what):
        deadline = time.monotonic() + self.lab.budget(timeout, "%s: %s" % (self.phase, what))
        while time.monotonic() < deadline:
            if os.path.exists(console):
                with open(console, errors="replace") as f:
                    text = f.read()
                if ready(text):
                    return text
            time.sleep(0.5)
        raise phases.StepFailed("%s: %s" % (self.phase, what), "not within %d s" % timeout)


# A guest whose disk libxl does not know (our toolstack made it): first the
# VBD's nodes (the worker sees them go, unmaps the guest's grants and stops),
# then the guest (Xen cannot finish a domain whose grants are still mapped).
DESTROY_UNKNOWN = """{python} -m blkif vbd destroy --domid {domid} --vdev {vdev}
for i in $(seq 150); do xenstore-exists {back} || break; sleep 0.2; done
xenstore-exists {back} && {{ echo backend nodes still there; exit 1; }}
xl destroy {name}
"""
# The worker's daemon exits on its own once the worker has (SIGTERM from
# --pdeathsig), after writing out the image: wait for it.
DAEMON_GONE = """for i in $(seq 100); do
  pgrep -f 'qemu-storage-daemon.*{image}' > /dev/null || break; sleep 0.2
done
"""
# Appending: the upgrade starts the service a second time into the same log.
SERVE_START = phases.SERVE_ALONE.replace("> {log}", ">> {log}", 1)
