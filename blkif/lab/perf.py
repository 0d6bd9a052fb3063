"""``blkif lab --perf``: kernel blkback, QEMU qdisk and ``blkif serve`` in one boot.

Each backend in turn serves the same preallocated image, on a buffered loop
device in dom0's tmpfs, to a PV guest that runs fio (Debian's, with every
library ``ldd`` names, in its initramfs) on /dev/xvda and prints each job's
JSON between ``LAB FIO <job> BEGIN`` and ``END`` lines on its console.  Two
guest configurations (:data:`CONFIGS`): A is 1 vCPU with blkfront's
defaults; B is 2 vCPUs with ``max_indirect_segments=512
max_ring_page_order=4`` and 1536 MiB (blkfront preallocates a page per
persistent grant).  Our backend's B guest also runs a crc32c-verified fio
job.  Within a configuration each backend runs twice, in the mirrored order
of :func:`turns` (blkback, qdisk, ours, ours, qdisk, blkback): a guest may
run slower the later it comes in a boot, whatever serves it (docs/lab.md), so
each backend gets the same average place, and its figure is the mean of its
two turns.  Kernel blkback is loaded for its turns and unloaded for ours; only
ratios between backends of this one boot mean anything under TCG.

The result is a table per configuration (:func:`ratio_table`) and
``perf.json`` in the work directory.  Everything but :class:`PerfRun` is pure.
"""
import json
import os
import re

from blkif.errors import UsageError
from blkif.lab import initramfs, phases

# (job, fio options); 4 KiB jobs are judged on IOPS (QD1 on latency), 1 MiB on MB/s.
JOBS = (
    ("randread-4k-qd32", "--rw=randread --bs=4k --iodepth=32"),
    ("randwrite-4k-qd32", "--rw=randwrite --bs=4k --iodepth=32"),
    ("randread-4k-qd1", "--rw=randread --bs=4k --iodepth=1"),
    ("read-1m-qd8", "--rw=read --bs=1m --iodepth=8"),
    ("write-1m-qd8", "--rw=write --bs=1m --iodepth=8"),
)
FIO_COMMON = ("--filename=/dev/xvda --direct=1 --ioengine=libaio --time_based "
              "--runtime={runtime} --ramp_time=2 --norandommap --randrepeat=0 "
              "--lat_percentiles=1 --output-format=json")
# Mixed 4 KiB..1 MiB random writes, each block checked with crc32c on read back.
FIO_VERIFY = ("--name=verify --filename=/dev/xvda --direct=1 --ioengine=libaio "
              "--rw=randwrite --bssplit=4k/40:64k/30:1m/30 --iodepth=8 --size=48m "
              "--verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=json")
CONFIGS = {
    "A": {"vcpus": 1, "memory": 512, "blkfront": ""},
    "B": {"vcpus": 2, "memory": 1536, "blkfront": "max_indirect_segments=512,"
                                                 "max_ring_page_order=4"},
}
BACKENDS = ("blkback", "qdisk", "blkif")
IMAGE = "/run/lab/perf.img"
RAMDISK = "/run/lab/guest-perf.cpio.gz"  # in dom0's tmpfs: libxl reads it at each create
IMAGE_BYTES = 256 << 20

PERF_INIT = r"""#!/bin/sh
# blkif lab --perf: guest init (generated).  Loads xen-blkfront (labblk=
# parameters), runs each fio job of /etc/lab/jobs on /dev/xvda with its JSON
# between LAB FIO markers, the crc32c job with labverify=1; then idles.
export PATH=/sbin:/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
BLK= VERIFY=0 FAILED=0
for a in $(cat /proc/cmdline); do
  case "$a" in
    labblk=*) BLK=$(echo "${a#labblk=}" | tr , ' ') ;;
    labverify=*) VERIFY=${a#labverify=} ;;
  esac
done
say() { echo "LAB $*"; }
for m in $(cat /etc/lab/modules); do
  case "$m" in
    */xen-blkfront.ko) insmod "$m" $BLK ;;
    *) insmod "$m" ;;
  esac || say "WARN insmod $m failed"
done
i=0
while [ ! -b /dev/xvda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
if [ ! -b /dev/xvda ]; then say "CHECK attach fail no /dev/xvda"; say "DONE rc=1"; exec sleep 100000; fi
q=/sys/block/xvda/queue
say "VALUE max_segments=$(cat $q/max_segments) max_hw_sectors_kb=$(cat $q/max_hw_sectors_kb)" \
    "nr_queues=$(set -- /sys/block/xvda/mq/*; echo $#)"
while read -r name args; do
  say "FIO $name BEGIN"
  /usr/bin/fio --name=$name $args $(cat /etc/lab/fio-common)
  say "FIO $name END rc=$?"
done < /etc/lab/jobs
if [ "$VERIFY" = 1 ]; then
  say "FIO verify BEGIN"
  /usr/bin/fio $(cat /etc/lab/fio-verify); r=$?
  say "FIO verify END rc=$r"
  if [ $r = 0 ]; then say "CHECK fio-crc32c pass mixed 4k-1m random writes verified"
  else say "CHECK fio-crc32c fail fio exit $r"; FAILED=1; fi
fi
if dmesg | grep -qiE 'I/O error|blk_update_request|Oops|BUG:'; then
  say "CHECK kernel-log fail $(dmesg | grep -iE 'I/O error|Oops|BUG:' | head -1)"; FAILED=1
else
  say "CHECK kernel-log pass no I/O error or oops"
fi
say "DONE rc=$FAILED"
exec sleep 100000
"""

_FIO = re.compile(r"LAB FIO (\S+) (BEGIN|END)(?: rc=(\d+))?")


def turns(backends):
    """The order guests run in, per configuration: each of ``backends``
    twice, mirrored, so each takes the same average place in the boot."""
    return tuple(backends) + tuple(backends)[::-1]


def select(names, known, what, name=lambda k: k):
    """The entries of ``known`` whose ``name`` a comma list ``names`` picks,
    in ``known``'s order; all of them for None.  UsageError names what is
    unknown."""
    if names is None:
        return tuple(known)
    wanted = set(names.split(","))
    unknown = wanted - {name(k) for k in known}
    if unknown:
        raise UsageError("unknown %s %s (choose from %s)" % (
            what, ",".join(sorted(unknown)) or "''", ",".join(name(k) for k in known)))
    return tuple(k for k in known if name(k) in wanted)


def selection(configs=None, jobs=None, backends=None):
    """(configurations, jobs, backends) that comma lists of names choose
    (None: all); UsageError for a name that is none of them."""
    return ({c: CONFIGS[c] for c in select(configs, tuple(CONFIGS), "configuration")},
            select(jobs, JOBS, "job", name=lambda job: job[0]),
            select(backends, BACKENDS, "backend"))


def jobs_text(jobs=JOBS):
    return "".join("%s %s\n" % job for job in jobs)


def parse_fio_console(text):
    """{job: fio's JSON, or {"error": ...}} from a perf guest's console log."""
    out, name, lines = {}, None, []
    for raw in text.splitlines():
        m = _FIO.search(raw)
        if m and m.group(2) == "BEGIN":
            name, lines = m.group(1), []
        elif m and name == m.group(1):
            body = "\n".join(lines)
            try:
                out[name] = json.loads(body[body.index("{"):body.rindex("}") + 1])
            except ValueError:
                out[name] = {"error": "fio rc=%s, no JSON" % m.group(3)}
            name = None
        elif name is not None:
            lines.append(raw.rstrip("\r"))
    return out


def job_figures(fio_json):
    """IOPS, MB/s and p50/mean completion latency (ms) of one fio job's JSON."""
    job = fio_json["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] else job["write"]
    lat = side["lat_ns"]
    return {"iops": round(side["iops"], 1), "mb_per_s": round(side["bw_bytes"] / 1e6, 2),
            "p50_ms": round(lat["percentile"]["50.000000"] / 1e6, 3),
            "mean_ms": round(lat["mean"] / 1e6, 3)}


def mean_figures(runs):
    """One backend's figures: each job's figures averaged over its ``runs``
    (a list of {job: figures}, one per turn); a job missing from any is left out."""
    jobs = set.intersection(*(set(r) for r in runs)) if runs else set()
    return {job: {k: round(sum(r[job][k] for r in runs) / len(runs), 3)
                  for k in runs[0][job]} for job in sorted(jobs)}


def metric(job):
    """What a job is judged on: (figure, higher is better)."""
    if job.endswith("-qd1"):
        return "mean_ms", False
    if "-1m-" in job:
        return "mb_per_s", True
    return "iops", True


def ratio_table(results, jobs=JOBS):
    """{config: {job: {backend: figure, "ours/blkback": r, "ours/qdisk": r}}}.

    For latency (QD1) the ratio is ours over theirs too: lower is better there.
    """
    table = {}
    for config, by_backend in results.items():
        rows = {}
        for job, _ in jobs:
            figure, _ = metric(job)
            row = {b: by_backend.get(b, {}).get(job, {}).get(figure) for b in BACKENDS}
            for other in ("blkback", "qdisk"):
                ours, theirs = row["blkif"], row[other]
                row["ours/%s" % other] = round(ours / theirs, 3) if ours and theirs else None
            row["figure"] = figure
            rows[job] = row
        table[config] = rows
    return table


def format_ratio_table(table):
    lines = []
    for config, rows in table.items():
        lines.append("config %s (%s)" % (config, CONFIGS[config]["blkfront"] or
                                         "blkfront defaults, 1 vCPU"))
        lines.append("%-20s %-9s %10s %10s %10s %14s %12s" % (
            "job", "figure", "blkback", "qdisk", "blkif", "ours/blkback", "ours/qdisk"))
        for job, row in rows.items():
            cells = ["%10s" % ("-" if row[b] is None else row[b]) for b in BACKENDS]
            ratios = ["%14s" % (row["ours/blkback"] or "-"), "%12s" % (row["ours/qdisk"] or "-")]
            lines.append("%-20s %-9s %s %s" % (job, row["figure"], " ".join(cells),
                                              " ".join(ratios)))
    return "\n".join(lines)


def disk_spec(backend, loop, script):
    if backend == "blkback":
        return "phy:%s,%s,w" % (loop, phases.VDEV)
    if backend == "qdisk":
        return "format=raw,vdev=%s,access=rw,backendtype=qdisk,target=%s" % (phases.VDEV, loop)
    return phases.backend_disk_spec(loop, script)


class PerfRun:
    """The perf phase on a booted lab (``phases.Lab``): ``configs``, ``jobs``
    and ``backends`` are comma lists choosing among :data:`CONFIGS`,
    :data:`JOBS` and :data:`BACKENDS` (None: all)."""

    def __init__(self, lab, runtime=10, serve_options="", configs=None, jobs=None,
                 backends=None):
        self.lab, self.runtime, self.serve_options = lab, runtime, serve_options
        self.configs, self.jobs, self.backends = selection(configs, jobs, backends)
        self.table = None
        self.ramdisk = os.path.join(lab.workdir, "guest-perf.cpio.gz")
        self.pidfile = os.path.join(lab.workdir, "ctl", "serve.pid")
        self.serving, self.starts = False, 0  # our service up; how often started

    def build(self):
        version = initramfs.find_kernel()[0]
        size = initramfs.build_perf_guest(
            self.ramdisk, version, PERF_INIT,
            {"/etc/lab/jobs": jobs_text(self.jobs),
             "/etc/lab/fio-common": FIO_COMMON.format(runtime=self.runtime),
             "/etc/lab/fio-verify": FIO_VERIFY})
        return "perf guest initramfs %d MiB (fio and its libraries)" % (size >> 20)

    def run(self):
        lab = self.lab
        done = {config: {backend: [] for backend in self.backends} for config in self.configs}
        loop = lab.sh("perf: loop device", (
            "modprobe -a xen-blkback loop\nmkdir -p /run/lab\ncp %s %s\n"
            "dd if=/dev/urandom of=%s bs=1M count=%d 2>/dev/null\n"
            "losetup -f --show %s") % (self.ramdisk, RAMDISK, IMAGE, IMAGE_BYTES >> 20, IMAGE),
            timeout=300).out.strip().splitlines()[-1]
        script = os.path.join(lab.workdir, "hotplug-connected.sh")
        with open(script, "w") as f:
            f.write(phases.HOTPLUG_SCRIPT)
        os.chmod(script, 0o755)
        try:
            for config, params in self.configs.items():
                for backend in turns(self.backends):
                    self.switch_to(backend)
                    turn = len(done[config][backend]) + 1
                    verify = backend == "blkif" and config == "B" and turn == 1
                    done[config][backend].append(self.guest(
                        backend, config, turn, params, disk_spec(backend, loop, script), verify))
        finally:
            lab.cleanup_sh(phases.SERVE_STOP.format(pidfile=self.pidfile))
            lab.cleanup_sh("losetup -d %s; rm -f %s %s" % (loop, IMAGE, RAMDISK))
        results = {config: {backend: mean_figures(t) for backend, t in by_backend.items()}
                   for config, by_backend in done.items()}
        self.table = ratio_table(results, self.jobs)
        path = os.path.join(lab.workdir, "perf.json")
        with open(path, "w") as f:
            json.dump({"runtime": self.runtime, "serve_options": self.serve_options,
                       "dom0": lab.dom0_kind,
                       "turns": done, "results": results, "ratios": self.table},
                      f, indent=1, sort_keys=True)
        return "%d guests; ratios in %s" % (2 * len(self.backends) * len(self.configs), path)

    def switch_to(self, backend):
        """dom0 ready for ``backend``: our service running only for ours (it
        would take qdisk VBDs too), kernel blkback loaded only for its own."""
        lab = self.lab
        if backend == "blkif" and not self.serving:
            self.starts += 1
            lab.sh("perf: start blkif serve", phases.SERVE_ALONE.format(
                argv=phases.serve_argv(lab.python, options=self.serve_options),
                log=os.path.join(lab.logs, "serve-perf-%d.log" % self.starts),
                pidfile=self.pidfile))
            self.serving = True
        elif backend != "blkif" and self.serving:
            lab.sh("perf: stop blkif serve", phases.SERVE_STOP.format(pidfile=self.pidfile))
            self.serving = False
        if backend == "blkback":
            lab.sh("perf: load xen-blkback", "modprobe xen-blkback")

    def guest(self, backend, config, turn, params, disk, verify):
        lab = self.lab
        name = "perf-%s-%s-%d" % (backend, config, turn)  # its own console log
        extra = "console=hvc0 quiet labblk=%s labverify=%d" % (params["blkfront"], verify)
        # Under TCG a guest of config B takes minutes to load blkfront (it
        # grants ~1 GiB), and each job's start and JSON add to its runtime.
        timeout = 300 + len(self.jobs) * (self.runtime + 40) + (300 if verify else 0)
        domid, _ = lab.run_guest("perf", name, disk, None, memory=params["memory"],
                                      vcpus=params["vcpus"], ramdisk=RAMDISK,
                                      extra=extra, timeout=timeout)
        with open(lab.console_log(name), errors="replace") as f:
            fio = parse_fio_console(f.read())
        figures = {}
        for job, _ in self.jobs:
            if job in fio and "jobs" in fio[job]:
                figures[job] = job_figures(fio[job])
        lab.report.add("perf", "%s %s #%d" % (backend, config, turn),
                       "pass" if len(figures) == len(self.jobs) else "fail",
                       " ".join("%s=%s" % (j, f[metric(j)[0]]) for j, f in figures.items()))
        lab.destroy("perf", name, domid, backend_domid=0,
                    kind="qdisk" if backend == "qdisk" else "vbd")
        return figures
