"""``python -m blkif.soak``: many VBDs under verified I/O for minutes, with
VBDs coming and going and one guest flooding, on the sim.

The sandbox (our xenstored, the sim hypervisor, ``blkif serve``) serves:

1. *solo*: one VBD, its guest doing the workload alone: the reference p99,
   for ``--solo-seconds`` (by default half of ``--duration``: as long as each
   judged half, so that its p99 comes from about as many transfers as each
   VBD's p99 in a half; a p99 of a few hundred transfers swings by 1.5x);
2. *soak*: ``--vbds`` VBDs, a guest process each, all doing the same
   workload for ``--duration`` s.  Meanwhile a churn thread keeps one more
   VBD coming and going (created, a guest attached doing I/O for a few
   seconds, detached, destroyed), and from half-time one more guest floods:
   notifies on its event channels in a loop (XSA-332) and writes its own
   xenstore nodes, ``state`` (which the worker watches) and fresh ones
   (XSA-349).  The churned and the flooding guests' processes run SCHED_IDLE:
   on Xen a guest boots and spins on vCPUs of its own, not on dom0's, so here
   they take only CPU time no process of dom0 (nor a steady guest) wants.

The workload (:func:`guest_soak`, in each guest): reads and writes at random
times (``--iops`` a second on average) of 4-64 KiB at random 4 KiB offsets,
every read checked against the guest's copy of what it wrote, a flush every 16
transfers; at the end the whole disk is read and compared.  Its latencies are
reported as p99 per time window, to compare with the solo p99: the warm-up
(the first tenth of the run, at most 30 s: every guest starts at once, and
every ring maps its first grants), reported but not judged; then the calm half
and the flood half, less the last ``COOLDOWN`` s (the guests' final whole-disk
reads start together).  Each guest also reports its slowest transfers, and the
churn the times it created VBDs, to see what the slow ones coincided with.

While it runs, the soak holds ``/dev/cpu_dma_latency`` at 0, as cyclictest
does: no CPU idles deeper than polling, so that a p99 measures the service,
not how long an idle CPU (a halted vCPU, on a VM) takes to wake
(``--allow-idle``: without).

Every ``--sample`` s the service's memory (RSS of the supervisor, its spare
worker and workers), open file descriptors and CPU time are read from /proc.
Flat means: from a quarter into the run (at most 60 s: every ring has mapped
its frontend's pool of persistent grants by then) to the end of the run,
the supervisor's and the steady workers' RSS within 10%; and their
descriptors the same once the churn and the flood are over.
"""
import argparse
import contextlib
import json
import os
import random
import struct
import sys
import threading
import time

from blkif import toolstack
from blkif.errors import BlkifError
from blkif.sandbox import Sandbox, percentile

VDEV = "xvda"
IMAGE_SIZE = 4 << 20
FLOOD_DOMID = 900
CHURN_DOMIDS = 1000  # churned guests are 1000, 1001, ...
RSS_GROWTH = 0.10
MAX_P99_RATIO = 3.0
WARMUP_MAX = 30.0
COOLDOWN = 2.0
MIN_SECONDS = 5.0  # of a run (solo or soak): what the windows leave is measured
PHASES = ("warmup", "calm", "flood")  # the latency windows; the last two are judged
SLOWEST = 20  # transfers each guest reports, with when they started
CPU_LATENCY = "/dev/cpu_dma_latency"
# lost: a guest read other data or failed; fds, memory: the service's grew;
# latency: a p99 past the bound; process: a process of the sandbox did not stop cleanly
FAILURE_KINDS = ("lost", "fds", "memory", "latency", "process")


class VerifyError(BlkifError):
    """A guest read back something other than what it wrote."""


# -- in the guests -------------------------------------------------------------

def guest_soak(guest, params, emit):
    """Verified I/O until ``params["until"]`` (monotonic, shared by
    processes), transfers starting at random (Poisson arrivals, ``iops`` a
    second on average: guests started together and paced by a clock would
    stay in step for the whole run, the same ones colliding every period);
    p99 latency per ``params["windows"]`` ([[start, end], ...]), and the
    slowest transfers in them as [s after the first window's start, ms]."""
    dev, rng = guest.dev, random.Random(params["seed"])
    model = bytearray(dev.size)  # the image starts blank
    period, until = 1.0 / params["iops"], params["until"]
    samples, transfers, next_at = [], 0, time.monotonic()
    while True:
        guest.checkpoint()
        now = time.monotonic()
        if now >= until:
            break
        if now < next_at:
            time.sleep(next_at - now)
        next_at = max(next_at + rng.expovariate(params["iops"]), time.monotonic() - period)
        length = 4096 * rng.randint(1, 16)
        offset = 4096 * rng.randrange((dev.size - length) // 4096 + 1)
        start = time.monotonic()
        if rng.random() < 0.5:
            data = rng.randbytes(length)
            dev.write(offset, data)
            model[offset:offset + length] = data
        elif dev.read(offset, length) != model[offset:offset + length]:
            raise VerifyError("read of %d bytes at %d differs from what was written"
                              % (length, offset))
        samples.append((start, time.monotonic() - start))
        transfers += 1
        if transfers % 16 == 0:
            dev.flush()
    dev.flush()
    if dev.read(0, dev.size) != model:
        raise VerifyError("the disk read back at the end differs from what was written")
    windows, measured = [], []
    for low, high in params["windows"]:
        inside = [(t, s) for t, s in samples if low <= t < high]
        lat = sorted(s for _, s in inside)
        windows.append({"transfers": len(lat), "p99_ms": round(percentile(lat, 99) * 1e3, 3)})
        measured += inside
    origin = params["windows"][0][0] if params["windows"] else 0.0
    slowest = [[round(t - origin, 3), round(s * 1e3, 2)]
               for t, s in sorted(measured, key=lambda ts: -ts[1])[:SLOWEST]]
    return {"transfers": transfers, "verified_bytes": dev.size, "windows": windows,
            "slowest": slowest}


def guest_flood(guest, params, emit):
    """Until ``params["until"]``: notify every event channel in a loop, and
    every 64 rounds write our ``state`` (same value) and a fresh node."""
    dev, xs = guest.dev, guest.xs
    ports = [q.port for q in dev.queues]
    notifies = writes = 0
    while time.monotonic() < params["until"]:
        guest.checkpoint()
        for _ in range(64):
            for port in ports:
                port.notify()
            notifies += len(ports)
        xs.write(dev.path + "/state", str(int(dev.state)))
        xs.write("%s/flood-%d" % (dev.path, writes % 512), "x" * (writes % 1024))
        writes += 2
    return {"notifies": notifies, "xenstore_writes": writes}


# -- the controller ------------------------------------------------------------

def _proc_tree(pid):
    """``pid`` and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open("/proc/%d/task/%d/children" % (p, p)) as f:
                todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _rss_and_fds(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return rss * 1024, len(os.listdir("/proc/%d/fd" % pid))
    except (OSError, StopIteration):
        return None


def _cpu_seconds(pids):
    """User plus system CPU time of ``pids`` (those still alive)."""
    ticks = 0
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def _steal_seconds():
    """CPU time the hypervisor under this machine took from its CPUs so far
    (``steal`` in /proc/stat): a VM's noisy neighbours, which a p99 feels."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8]) / os.sysconf("SC_CLK_TCK")


def sample(sandbox, steady):
    """The service's memory and descriptors now: supervisor, the workers of
    the ``steady`` VBDs (domids), everything of the service together; and
    the CPU time used so far by the service's live processes and by every
    process of the sandbox (guests included), the CPU time stolen from this
    machine, and the load average."""
    serve = sandbox.procs["serve"].pid
    by_vbd = {pid: domid for (domid, _), pid in sandbox.workers().items()}
    service = _proc_tree(serve)
    with open("/proc/loadavg") as f:
        load = float(f.read().split()[0])
    out = {"t": time.monotonic(), "rss_total": 0, "fds_total": 0, "processes": 0,
           "rss_steady": 0, "fds_steady": 0, "steady_workers": 0, "loadavg": load,
           "cpu_service": _cpu_seconds(service),
           "cpu_sandbox": _cpu_seconds(_proc_tree(os.getpid())[1:]),
           "cpu_xenstored": _cpu_seconds([sandbox.procs["xenstored"].pid]),
           "cpu_flooded_worker": _cpu_seconds([pid for pid, domid in by_vbd.items()
                                               if domid == FLOOD_DOMID]),
           "cpu_stolen": _steal_seconds()}
    for pid in service:
        got = _rss_and_fds(pid)
        if got is None:
            continue
        rss, fds = got
        out["rss_total"] += rss
        out["fds_total"] += fds
        out["processes"] += 1
        if pid == serve:
            out["rss_supervisor"], out["fds_supervisor"] = rss, fds
        elif by_vbd.get(pid) in steady:
            out["rss_steady"] += rss
            out["fds_steady"] += fds
            out["steady_workers"] += 1
    return out


def _guest(sandbox, domid, results, key, params, function="blkif.soak:guest_soak", go=None,
           idle=False):
    """A new guest domain with a VBD, attached, then running ``function``
    with ``params`` (a dict, or a callable giving it once ``go`` is set): in a
    thread, which puts the result or ``{"error": ...}`` in ``results[key]``.
    ``idle``: its process runs SCHED_IDLE from its start.
    Returns (guest, thread, attached event)."""
    image = sandbox.make_image("disk-%d.img" % domid, IMAGE_SIZE, None)
    sandbox.add_vbd(domid, VDEV, image)
    guest = sandbox.start_guest(domid)
    if idle:
        os.sched_setscheduler(guest.proc.pid, os.SCHED_IDLE, os.sched_param(0))
    attached = threading.Event()

    def job():
        try:
            guest.call("attach", {"vdev": VDEV, "options": {"max_queues": 1}}, timeout=300)
            attached.set()
            if go is not None:
                go.wait()
            job_params = params() if callable(params) else params
            results[key] = guest.call("call", {"function": function, "params": job_params},
                                      timeout=job_params["until"] - time.monotonic() + 300)
        except BlkifError as exc:
            results[key] = {"error": str(exc)}
            attached.set()
    thread = threading.Thread(target=job, name="guest-%d" % domid, daemon=True)
    thread.start()
    return guest, thread, attached


def _churn(sandbox, stop, params, log):
    """Create a VBD, run a guest on it for ``params["life"]`` s, destroy it;
    again.  Returns (cycles, failures, monotonic times of the creations)."""
    cycles, failures, created = 0, [], []
    while not stop.is_set():
        domid = CHURN_DOMIDS + cycles
        results = {}
        created.append(time.monotonic())
        until = time.monotonic() + params["life"]
        guest, thread, _ = _guest(sandbox, domid, results, "r",
                                  dict(params, until=until, seed=domid, windows=[]), idle=True)
        thread.join()
        guest.quit()
        toolstack.destroy(sandbox.dom0, domid, VDEV)
        os.unlink(sandbox.path("disk-%d.img" % domid))
        if "error" in results["r"]:
            failures.append("churned VBD %d: %s" % (domid, results["r"]["error"]))
        cycles += 1
    log("churn: %d VBDs created, served and destroyed" % cycles)
    return cycles, failures, created


def warmup(seconds):
    """The first tenth of a run of ``seconds``, at most WARMUP_MAX: left out of its p99."""
    return min(WARMUP_MAX, seconds / 10)


@contextlib.contextmanager
def cpus_awake(log):
    """Hold ``/dev/cpu_dma_latency`` at 0 (the kernel's CPU latency QoS
    request, kept while the file is open); yields whether it is held."""
    try:
        fd = os.open(CPU_LATENCY, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        log("CPU idle states left as they are: %s: %s" % (CPU_LATENCY, exc.strerror))
        yield False
        return
    try:
        os.write(fd, struct.pack("i", 0))
        log("CPU idle states: polling only (%s held at 0)" % CPU_LATENCY)
        yield True
    finally:
        os.close(fd)


def solo_length(duration):
    """The solo run's default length: as long as each judged half."""
    return max(MIN_SECONDS, duration / 2)


def run(vbds=64, duration=300.0, iops=10.0, solo_seconds=None, sample_every=5.0, flood=True,
        churn_life=5.0, serve_options=(), awake=True, log=print):
    """The whole soak; a report dict.  ``failures`` maps each kind of
    failure (FAILURE_KINDS) to its messages; ``ok`` if there are none.
    ``solo_seconds``: None for :func:`solo_length`.
    ``awake``: hold the CPUs out of idle states (:func:`cpus_awake`)."""
    solo_seconds = solo_length(duration) if solo_seconds is None else solo_seconds
    report = {"vbds": vbds, "duration": duration, "iops_per_vbd": iops,
              "solo_seconds": solo_seconds,
              "failures": {kind: [] for kind in FAILURE_KINDS}}
    log = log or (lambda text: None)
    with contextlib.ExitStack() as stack:
        report["cpus_awake"] = stack.enter_context(cpus_awake(log)) if awake else False
        sandbox = stack.enter_context(Sandbox(serve_options=serve_options))
        # 1. solo
        results = {}
        t0 = time.monotonic() + 1.0
        until = t0 + solo_seconds
        warm = t0 + warmup(solo_seconds)  # judged alike: its warm-up left out
        guest, thread, _ = _guest(sandbox, 1, results, 1, {
            "iops": iops, "until": until, "seed": 1,
            "windows": [[t0, warm], [warm, until - COOLDOWN]]})
        thread.join()
        solo = results[1]
        if "error" in solo:
            raise BlkifError("solo run failed: %s" % solo["error"])
        guest.quit()
        toolstack.destroy(sandbox.dom0, 1, VDEV)
        report["solo_p99_ms"] = solo["windows"][1]["p99_ms"]
        log("solo: p99 %.2f ms over %d transfers" % (report["solo_p99_ms"],
                                                     solo["windows"][1]["transfers"]))
        # 2. the soak: every guest attached, then the clock starts for all
        results, go, timing = {}, threading.Event(), {}
        steady = set(range(2, vbds + 2))

        def params(domid):
            return lambda: {"iops": iops, "until": timing["end"], "seed": domid,
                            "windows": [[timing["start"], timing["warm"]],
                                        [timing["warm"], timing["half"]],
                                        [timing["half"], timing["end"] - COOLDOWN]]}
        guests = [_guest(sandbox, domid, results, domid, params(domid), go=go)
                  for domid in sorted(steady)]
        threads = [thread for _, thread, _ in guests]
        for _, _, attached in guests:
            attached.wait()
        start = time.monotonic() + 1.0
        end = start + duration
        half = start + duration / 2
        warm = start + warmup(duration)
        timing.update(start=start, warm=warm, half=half, end=end)
        report.update(warmup=warm - start, cooldown=COOLDOWN)
        go.set()
        log("soak: %d guests attached" % vbds)
        time.sleep(1.0)
        samples = [sample(sandbox, steady)]
        stop = threading.Event()
        churned = {}
        churner = threading.Thread(target=lambda: churned.update(r=_churn(
            sandbox, stop, {"iops": iops, "life": churn_life}, log)), daemon=True)
        churner.start()
        flood_result = {}
        flooder = None
        while time.monotonic() < end:
            time.sleep(min(sample_every, max(0.0, end - time.monotonic())))
            if flood and flooder is None and time.monotonic() >= half:
                flooder = _guest(sandbox, FLOOD_DOMID, flood_result, "r", {"until": end},
                                 "blkif.soak:guest_flood", idle=True)
                log("flood: guest %d floods its channel and xenstore nodes" % FLOOD_DOMID)
            samples.append(sample(sandbox, steady))
            log("%.0f s: %d processes, RSS %.0f MiB, %d fds" % (
                samples[-1]["t"] - start, samples[-1]["processes"],
                samples[-1]["rss_total"] / 2**20, samples[-1]["fds_total"]))
        stop.set()
        churner.join()
        for thread in threads:
            thread.join()
        if flooder is not None:
            flooder[1].join()
            flooder[0].quit()
            toolstack.destroy(sandbox.dom0, FLOOD_DOMID, VDEV)
        time.sleep(2 * sample_every)  # the churned and flooding VBDs' workers gone
        samples.append(sample(sandbox, steady))
        sandbox.stop()
        report["failures"]["process"] += sandbox.failures()
    report["churn_cycles"], churn_failures, created = churned.get(
        "r", (0, ["churn never ran"], []))
    report["failures"]["lost"] += churn_failures
    report["churn_created_s"] = [round(t - start, 3) for t in created]
    report["flood"] = flood_result.get("r")
    report["stolen"] = {phase: _stolen(samples, low, high) for phase, (low, high) in zip(
        PHASES, ((start, warm), (warm, half), (half, end - COOLDOWN)))}
    report.update(_judge(report, results, samples, steady, end))
    report["ok"] = not any(report["failures"].values())
    return report


def _stolen(samples, low, high):
    """The share of this machine's CPU time the host took between monotonic
    times ``low`` and ``high``, from the samples inside; None if under two."""
    inside = [s for s in samples if low <= s["t"] <= high]
    if len(inside) < 2:
        return None
    seconds = inside[-1]["t"] - inside[0]["t"]
    return round((inside[-1]["cpu_stolen"] - inside[0]["cpu_stolen"])
                 / (seconds * os.cpu_count()), 3)


def _judge(report, results, samples, steady, end):
    failures = report["failures"]
    solo = max(report["solo_p99_ms"], 1e-3)
    ratios, slowest = {}, {}
    for domid in sorted(steady):
        r = results.get(domid, {"error": "no result"})
        if "error" in r:
            failures["lost"].append("VBD of guest %d: %s" % (domid, r["error"]))
            continue
        ratios[domid] = [round(w["p99_ms"] / solo, 2) for w in r["windows"]]
        slowest[domid] = r["slowest"]
    worst = {phase: max((v[i] for v in ratios.values()), default=None)
             for i, phase in enumerate(PHASES)}
    for phase, ratio in worst.items():
        if phase != "warmup" and ratio is not None and ratio > MAX_P99_RATIO:
            failures["latency"].append("%s: a VBD's p99 is %.1fx the solo figure (bound %.0fx)"
                            % (phase, ratio, MAX_P99_RATIO))
    # The baseline: once a quarter of the run (at most 60 s) is over, when
    # every ring has mapped its frontend's pool of persistent grants.  RSS is
    # compared with the last sample of the run (the final read of every disk
    # maps more grants), descriptors with the one after the churn and flood.
    warm = samples[0]["t"] + min(60.0, report["duration"] / 4)
    first, last = next(s for s in samples if s["t"] >= warm), samples[-1]
    in_run = [s for s in samples if s["t"] <= end][-1]
    for key in ("fds_supervisor", "fds_steady"):
        if last[key] != first[key]:
            failures["fds"].append("%s went from %d to %d" % (key, first[key], last[key]))
    for key in ("rss_supervisor", "rss_steady"):
        if in_run[key] > first[key] * (1 + RSS_GROWTH):
            failures["memory"].append("%s grew from %.1f to %.1f MiB" % (
                key, first[key] / 2**20, in_run[key] / 2**20))
    return {"p99_ratio_worst": worst, "p99_ratios": ratios, "slowest": slowest,
            "transfers": sum(r.get("transfers", 0) for r in results.values()),
            "first_sample": first, "last_in_run": in_run, "last_sample": last,
            "samples": samples}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m blkif.soak",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--vbds", type=int, default=64)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds (default 300)")
    parser.add_argument("--iops", type=float, default=10.0, help="per VBD (default 10)")
    parser.add_argument("--solo-seconds", type=float,
                        help="seconds of the solo run (default: half of --duration)")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--no-flood", action="store_true")
    parser.add_argument("--engine", choices=("c", "python"), default="c")
    parser.add_argument("--allow-idle", action="store_true",
                        help="leave CPU idle states alone (default: hold %s at 0)"
                        % CPU_LATENCY)
    parser.add_argument("--json", metavar="FILE", help="write the report here")
    args = parser.parse_args(argv)
    if args.vbds < 1 or args.iops <= 0 or args.sample <= 0:
        parser.error("--vbds, --iops and --sample must be positive")
    for option, seconds in (("--duration", args.duration), ("--solo-seconds", args.solo_seconds)):
        if seconds is not None and seconds < MIN_SECONDS:
            parser.error("%s must be at least %.0f s: its first tenth and last %.0f s are "
                         "not measured" % (option, MIN_SECONDS, COOLDOWN))
    try:
        report = run(args.vbds, args.duration, args.iops, args.solo_seconds, args.sample,
                     not args.no_flood, serve_options=["--engine", args.engine],
                     awake=not args.allow_idle,
                     log=lambda text: print(text, file=sys.stderr, flush=True))
    except BlkifError as exc:
        print("%s: error: %s" % (parser.prog, exc), file=sys.stderr)
        return 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    first, last = report["first_sample"], report["last_sample"]
    print("%d VBDs x %.0f s at %.0f IOPS each, %d transfers verified, %d churned VBDs; "
          "solo p99 %.2f ms, worst p99 ratio calm %s flood %s (warm-up %s, not judged); "
          "service RSS %.0f -> %.0f MiB, "
          "fds %d -> %d (steady workers' %d -> %d); CPU %.0f s service, %.0f s sandbox, "
          "%.1f s stolen by the host (calm %s, flood %s of the CPUs)" % (
              report["vbds"], report["duration"], report["iops_per_vbd"], report["transfers"],
              report["churn_cycles"], report["solo_p99_ms"], report["p99_ratio_worst"]["calm"],
              report["p99_ratio_worst"]["flood"], report["p99_ratio_worst"]["warmup"],
              first["rss_total"] / 2**20,
              report["last_in_run"]["rss_total"] / 2**20, first["fds_total"], last["fds_total"],
              first["fds_steady"], last["fds_steady"],
              report["last_in_run"]["cpu_service"] - first["cpu_service"],
              report["last_in_run"]["cpu_sandbox"] - first["cpu_sandbox"],
              report["last_in_run"]["cpu_stolen"] - first["cpu_stolen"],
              report["stolen"]["calm"], report["stolen"]["flood"]))
    for kind, texts in report["failures"].items():
        for text in texts:
            print("FAILED (%s): %s" % (kind, text))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
