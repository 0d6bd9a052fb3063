"""``blkif lab``: boot a real Xen host in QEMU and prove blkif against Linux.

Order of work: prerequisites (Debian packages, installed when missing and
root), build, boot, then the phases ``--only`` selects (boot and dom0 are
implied by any later one).  A failing step ends the run; QEMU is stopped in
every case.  Exit status 0 only when no check failed.
"""
import fcntl
import os
import signal
import subprocess
import sys
import time

from blkif.errors import BlkifError, UsageError
from blkif.lab import perf, phases, qdisk, qemu, restart
from blkif.lab.report import Report, format_failure, format_table

# Debian package -> a file that proves it is installed (dom0 uses the host's).
PACKAGES = {
    "qemu-system-x86": "/usr/bin/qemu-system-x86_64",
    "xen-hypervisor-4.17-amd64": "/boot/xen-4.17-amd64.gz",
    "xen-utils-4.17": "/usr/lib/xen-4.17/bin/xenstored",
    "xenstore-utils": "/usr/bin/xenstore-ls",
    "linux-image-amd64": None,  # checked by initramfs.find_kernel
    "busybox-static": "/bin/busybox",
    "e2fsprogs": "/sbin/mke2fs",
    "qemu-utils": "/usr/bin/qemu-img",  # the qdisk phase's image, made and checked
    "qemu-system-common": "/usr/bin/qemu-storage-daemon",  # serves that image
    "python3-libnbd": "/usr/lib/python3/dist-packages/nbd.py",  # the worker's NBD client
}
# What --perf, restart and conformance need besides: QEMU's Xen device model (qdisk)
# and fio for the guest.
PERF_PACKAGES = {
    "qemu-system-xen": "/usr/libexec/xen-qemu-system-i386",
    "fio": "/usr/bin/fio",
}


def missing_packages(exists=os.path.exists, installed=None, packages=PACKAGES):
    """Packages whose proof file is missing (or dpkg says absent)."""
    missing = []
    for package, proof in packages.items():
        if proof is not None:
            ok = exists(proof)
        else:
            ok = installed(package) if installed else _dpkg_installed(package)
        if not ok:
            missing.append(package)
    return missing


def _dpkg_installed(package):
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package],
                         capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.endswith("installed")


def ensure_packages(packages=PACKAGES):
    """Install missing packages as root; BlkifError naming them otherwise."""
    missing = missing_packages(packages=packages)
    if not missing:
        return "all present"
    if os.geteuid() != 0:
        raise BlkifError("missing packages (run as root, or apt-get install "
                         "--no-install-recommends %s)" % " ".join(missing))
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends"] + missing
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if out.returncode != 0:
        raise BlkifError("apt-get install %s failed: %s" % (
            " ".join(missing), (out.stderr.strip().splitlines() or ["?"])[-1]))
    return "installed " + " ".join(missing)


def parse_only(text):
    """``--only`` text -> the set of phases to run (boot/dom0 implied);
    without it every phase but the optional ones.

    Raises UsageError for an unknown phase.
    """
    if not text:
        return set(phases.PHASES)
    known = phases.PHASES + phases.OPTIONAL_PHASES
    chosen = {p.strip() for p in text.split(",") if p.strip()}
    unknown = chosen - set(known)
    if unknown:
        raise UsageError("unknown phase %s (choose from %s)" % (
            ", ".join(sorted(unknown)), ",".join(known)))
    if chosen - {"boot"}:
        chosen.add("dom0")
    chosen.add("boot")
    return chosen


def add_arguments(parser):
    parser.add_argument("--workdir", default=None,
                        help="artifacts and logs (default: lab-work/ in the project)")
    parser.add_argument("--timeout", type=int, default=None,
                        help="seconds for the whole run (default 600; 3600 with --perf)")
    parser.add_argument("--only", metavar="PHASES",
                        help="comma list of %s (default: all but %s, which take "
                             "minutes each)" % (",".join(phases.PHASES + phases.OPTIONAL_PHASES),
                                           ",".join(phases.OPTIONAL_PHASES)))
    parser.add_argument("--seed", type=int, default=None,
                        help="workload plan seed (default: from the clock; printed)")
    parser.add_argument("--keep", action="store_true",
                        help="leave Xen running after the phases until Ctrl-C "
                             "(drive dom0 through WORKDIR/ctl, see docs/lab.md)")
    parser.add_argument("--dom0", choices=qemu.DOM0_KINDS, default="pv",
                        help="dom0's kind: pv (default), or pvh (a q35 machine with QEMU's "
                             "AMD IOMMU, which Xen requires for one; experimental in Xen 4.17 "
                             "and, under this TCG, slow and crashing under load: docs/lab.md)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--conformance-runs", metavar="NAMES",
                        help="with the conformance phase: only these of %s (default all)"
                             % ",".join(name for name, _ in phases.CONFORMANCE_RUNS))
    parser.add_argument("--perf", action="store_true",
                        help="instead of the phases: fio in a guest against kernel blkback, "
                             "QEMU qdisk and blkif serve, configurations A and B, one boot; "
                             "prints the ratio table, writes WORKDIR/perf.json (docs/lab.md)")
    parser.add_argument("--perf-runtime", type=int, default=10, metavar="SECONDS",
                        help="seconds per fio job with --perf (default 10)")
    parser.add_argument("--perf-serve-options", default="", metavar="OPTIONS",
                        help="with --perf: more options for blkif serve, one string "
                             "given with = (--perf-serve-options='--direct --io threads')")
    parser.add_argument("--perf-configs", metavar="NAMES",
                        help="with --perf: only these of %s (default all)"
                             % ",".join(perf.CONFIGS))
    parser.add_argument("--perf-jobs", metavar="NAMES",
                        help="with --perf: only these of %s (default all)"
                             % ",".join(name for name, _ in perf.JOBS))
    parser.add_argument("--perf-backends", metavar="NAMES",
                        help="with --perf: only these of %s (default all)"
                             % ",".join(perf.BACKENDS))


class Terminated(BlkifError):
    """SIGTERM arrived: end the run through the normal failure path (QEMU stopped)."""


def _on_sigterm(signum, frame):
    raise Terminated("terminated by SIGTERM")


def run(args):
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, old)


def _run(args):
    if args.timeout is None:
        args.timeout = 3600 if args.perf else 600
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    chosen = parse_only(args.only)
    if args.conformance_runs:
        known = [name for name, _ in phases.CONFORMANCE_RUNS]
        unknown = set(args.conformance_runs.split(",")) - set(known)
        if unknown:
            raise UsageError("unknown conformance run %s (choose from %s)" % (
                ",".join(sorted(unknown)), ",".join(known)))
        if "conformance" not in chosen:
            raise UsageError("--conformance-runs goes with --only conformance")
    picked = [f for f in ("configs", "jobs", "backends") if getattr(args, "perf_" + f)]
    if picked and not args.perf:
        raise UsageError("--perf-%s goes with --perf" % picked[0])
    if args.perf:
        perf.selection(args.perf_configs, args.perf_jobs, args.perf_backends)  # fail early
    workdir = os.path.abspath(args.workdir or os.path.join(phases._project_root(), "lab-work"))
    os.makedirs(workdir, exist_ok=True)
    lock = open(os.path.join(workdir, "lab.lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BlkifError("another blkif lab is running in %s (use --workdir)" % workdir)
    with lock:
        return _run_locked(args, chosen, workdir)


def _run_locked(args, chosen, workdir):
    seed = args.seed if args.seed is not None else int(time.time()) % 100000
    report = Report()
    lab = phases.Lab(workdir, report, timeout=args.timeout, dom0=args.dom0)
    if args.conformance_runs:
        lab.conformance_only = set(args.conformance_runs.split(","))
    started = time.monotonic()
    progress = sys.stderr

    def step(phase, check, fn, *fn_args):
        print("lab: %s: %s ..." % (phase, check), file=progress, flush=True)
        return lab.timed(phase, check, fn, *fn_args)

    perf_run = None
    restart_runs = []
    try:
        step("setup", "packages", ensure_packages,
             dict(PACKAGES, **PERF_PACKAGES)
             if args.perf or chosen & {"restart", "restart-qcow2", "conformance"}
             else PACKAGES)
        step("setup", "build", lab.build, seed)
        if args.perf:
            perf_run = perf.PerfRun(lab, args.perf_runtime, args.perf_serve_options,
                                    args.perf_configs, args.perf_jobs, args.perf_backends)
            step("setup", "perf guest", perf_run.build)
            chosen = {"boot", "dom0", "perf"}
        restart_runs = [restart.RestartRun(lab, phase) for phase in restart.FORMATS
                        if phase in chosen]
        if restart_runs:  # one guest initramfs for both
            step("setup", "restart guest", restart_runs[0].build)
        step("boot", "xen+dom0 to agent", lab.boot)
        if "dom0" in chosen:
            step("dom0", "xen tools up", lab.setup_dom0)
        if "perf" in chosen:
            step("perf", "blkback, qdisk and blkif serve under fio", perf_run.run)
        for run in restart_runs:
            step(run.phase, "blkif serve restarted under fio", run.run)
        if "baseline" in chosen:
            step("baseline", "linux blkback vs linux blkfront", lab.baseline)
        if "qdisk" in chosen:
            step("qdisk", "xen-blkback and blkif serve in one guest",
                 qdisk.QdiskRun(lab).run)
        for name, why in (("backend", phases.available_backend()),
                          ("frontend", phases.available_frontend()),
                          ("conformance", None)):
            if name in chosen:
                if why:
                    report.add(name, "our %s" % name, "skip", why)
                else:
                    step(name, "our %s" % name, getattr(lab, name))
        if args.keep:
            keep_running(lab, progress)
    except phases.StepFailed as exc:
        phase, _, check = exc.step.partition(": ")
        report.add(phase, check or phase, "fail", exc.detail)
        report.failure = failure_context(lab, exc)
    except BlkifError as exc:
        report.add("lab", "error", "fail", str(exc))
        report.failure = failure_context(lab, phases.StepFailed("lab", str(exc)))
    finally:
        report.add("cleanup", "qemu stopped", *lab.close())
        report.seconds = time.monotonic() - started
    print(report.as_json() if args.json else format_table(report))
    if perf_run is not None and perf_run.table and not args.json:
        print(perf.format_ratio_table(perf_run.table))
    if report.failure:
        print(format_failure(report.failure), file=sys.stderr)
    return 0 if report.ok else 1


def failure_context(lab, exc):
    guest_tail = ""
    if os.path.isdir(lab.console):
        logs = sorted((os.path.getmtime(p), p) for p in
                      (os.path.join(lab.console, n) for n in os.listdir(lab.console))
                      if p.endswith(".log") and "guest-" in p)
        if logs:
            with open(logs[-1][1], errors="replace") as f:
                guest_tail = f.read()[-8000:]
    return {
        "step": exc.step,
        "detail": exc.detail,
        "dom0_output": exc.output[-4000:],
        "serial_tail": lab.serial_tail(),
        "guest_tail": guest_tail,
    }


def keep_running(lab, out):
    print("lab: --keep: Xen is running (QEMU pid %d); run dom0 commands by writing "
          "%s/ctl/cmd/NNNN.sh; Ctrl-C stops it" % (lab.qemu.pid, lab.workdir), file=out, flush=True)
    try:
        while lab.qemu.alive():
            time.sleep(1)
    except KeyboardInterrupt:
        pass
