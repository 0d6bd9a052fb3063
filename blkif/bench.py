"""``blkif bench``: blkif against its own backing file, pattern by pattern.

The demo's sandbox (``blkif/sandbox.py``): xenstored, the sim hypervisor,
``blkif serve`` and guest domain 1, each a process, with VBD ``xvda`` on an
image of ``--size`` bytes.  For each pattern of :data:`PATTERNS`:

- **blkif**: the guest does the pattern through its :class:`BlockDevice`
  for ``--duration`` seconds, keeping ``queue_depth`` transfers in flight;
  a transfer's latency runs from its submission to the moment the guest
  sees its completion;
- **file**: then we (dom0) do the same pattern (same kind of offsets, same
  sizes, same time) with ``os.preadv``/``os.pwritev`` on the image file the
  backend serves, one call at a time (a call on a cached file has no queue
  to fill); a call's latency is the call.

Each side first runs the pattern unmeasured for a warm-up (caches, the
backend's persistent grants).  Besides wall-clock figures, which move with
whatever else the machine runs, blkif's side reports the CPU time per I/O of
the guest and of the backend's worker process (``cpu_us_per_io``): what the
code costs, steadier from run to run than IOPS on a busy machine.  ``ratio`` is blkif's IOPS over the file's:
the fraction of the backing file's speed that reaches the guest.  Patterns
needing other negotiation (indirect descriptors off) re-attach the guest.
Figures are for comparing runs on one machine, never assertions.
"""
import json
import os
import random
import time
from dataclasses import asdict, dataclass

from blkif import sandbox
from blkif.errors import BlkifError, UsageError
from blkif.sandbox import percentile

DOMID, VDEV = 1, "xvda"
WARMUP = 0.3  # seconds, each side, unmeasured
POOL_PAGES = 1024  # per queue: four 1 MiB transfers in flight on one queue


@dataclass(frozen=True)
class Pattern:
    op: str  # read or write
    block_size: int
    queue_depth: int
    access: str  # random or sequential
    indirect: bool = True  # False: the guest asks for no indirect descriptors


PATTERNS = {
    "randread-4k-qd1": Pattern("read", 4096, 1, "random"),
    "randread-4k-qd32": Pattern("read", 4096, 32, "random"),
    "randwrite-4k-qd1": Pattern("write", 4096, 1, "random"),
    "randwrite-4k-qd32": Pattern("write", 4096, 32, "random"),
    "seqread-1m-indirect": Pattern("read", 1 << 20, 4, "sequential"),
    "seqread-1m-direct": Pattern("read", 1 << 20, 4, "sequential", indirect=False),
    "seqwrite-1m-indirect": Pattern("write", 1 << 20, 4, "sequential"),
    "seqwrite-1m-direct": Pattern("write", 1 << 20, 4, "sequential", indirect=False),
}


def parse_patterns(values):
    """Pattern names from repeated and comma-separated ``--pattern`` values."""
    names = []
    for value in values or [",".join(PATTERNS)]:
        for name in filter(None, (v.strip() for v in value.split(","))):
            if name not in PATTERNS:
                raise UsageError("unknown pattern %r (choose from %s)"
                                 % (name, ", ".join(PATTERNS)))
            if name not in names:
                names.append(name)
    return names


def add_arguments(parser):
    parser.add_argument("--pattern", action="append", metavar="NAME[,NAME...]",
                        help="patterns to run (default: all): " + ", ".join(PATTERNS))
    parser.add_argument("--duration", type=sandbox.positive_float, default=2.0,
                        metavar="SECONDS", help="measured seconds per pattern and side "
                                                "(default 2)")
    parser.add_argument("--size", type=sandbox.parse_size, default=128 << 20,
                        metavar="BYTES", help="image size, e.g. 128M (default), 4M..1G")
    parser.add_argument("--list", action="store_true", help="list the patterns and exit")
    sandbox.add_arguments(parser)


def offsets(pattern, size, rng):
    """Endless offsets of ``pattern`` on a disk of ``size`` bytes."""
    blocks = size // pattern.block_size
    if pattern.access == "random":
        while True:
            yield rng.randrange(blocks) * pattern.block_size
    n = 0
    while True:
        yield (n % blocks) * pattern.block_size
        n += 1


def process_cpu(pid):
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_pid(box, domid):
    """The pid of the worker ``blkif serve`` runs for domain ``domid``'s VBD."""
    with open(os.path.join(box.state_dir, "service.json")) as f:
        for worker in json.load(f)["workers"]:
            if worker["domid"] == domid and worker["status"] == "running":
                return worker["pid"]
    raise BlkifError("no worker serves domain %d" % domid)


def summary(latencies, seconds, block_size):
    """IOPS, MB/s (10**6 bytes) and latency percentiles (ms) of one run."""
    ios = len(latencies)
    latencies.sort()
    return {
        "ios": ios,
        "seconds": round(seconds, 3),
        "iops": round(ios / seconds, 1),
        "mb_per_s": round(ios * block_size / seconds / 1e6, 2),
        "p50_ms": round(percentile(latencies, 50) * 1e3, 4),
        "p99_ms": round(percentile(latencies, 99) * 1e3, 4),
    }


# -- the parent -------------------------------------------------------------

def run(args):
    if args.list:
        for name, p in PATTERNS.items():
            print("%-22s %-5s %7d bytes  queue depth %2d  %-10s  indirect %s" % (
                name, p.op, p.block_size, p.queue_depth, p.access,
                "on" if p.indirect else "off"))
        return 0
    names = parse_patterns(args.pattern)
    serve_options, front = sandbox.setup(args)
    progress = sandbox.Progress(enabled=not args.quiet, steps=1)
    results = []
    with sandbox.Sandbox(args.workdir, serve_options) as box:
        progress.note("blkif bench: xenstored, sim hypervisor, blkif serve and guest "
                      "domain %d running in %s" % (DOMID, box.dir))
        chunk = random.Random(0).randbytes(1 << 20)
        image = box.make_image("disk.img", args.size, lambda offset, n: chunk[:n])
        box.add_vbd(DOMID, VDEV, image)
        guest = box.start_guest(DOMID)
        attached = None
        for name in names:
            pattern = PATTERNS[name]
            options = dict(front, pool_pages=POOL_PAGES)
            if not pattern.indirect:
                options["max_indirect_segments"] = 0
            if options != attached:
                negotiated = guest.call("attach", {"vdev": VDEV, "options": options})
                attached = options
            params = dict(asdict(pattern), duration=args.duration, seed=len(results))
            worker = worker_pid(box, DOMID)
            start_cpu = []

            def on_event(event):
                if event.get("mark") == "measure":  # the measured part begins
                    start_cpu.append(process_cpu(worker))
                progress.event(event)
            blkif = guest.call("call", {"function": "blkif.bench:guest_pattern",
                                        "params": dict(params, name=name)},
                               on_event, timeout=args.duration + 60)
            blkif["cpu_us_per_io"]["backend"] = round(
                (process_cpu(worker) - start_cpu[0]) / max(blkif["ios"], 1) * 1e6, 1)
            file = run_file(image, pattern, args.duration, len(results), progress, name)
            results.append(dict(
                name=name, **asdict(pattern), negotiated=negotiated, blkif=blkif, file=file,
                ratio=round(blkif["iops"] / file["iops"], 4) if file["iops"] else None))
        guest.call("detach")
        progress.end()
        box.stop_cleanly()
    report = {"size": args.size, "duration": args.duration, "patterns": results}
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True))
    else:
        print_report(report)
    return 0


def run_file(image, pattern, duration, seed, progress, name):
    """The pattern with preadv/pwritev on ``image``, one call at a time."""
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        where = offsets(pattern, os.fstat(fd).st_size, random.Random(seed))
        buf = bytearray(pattern.block_size)
        if pattern.op == "write":
            buf[:] = random.Random(seed).randbytes(pattern.block_size)
        call = os.pwritev if pattern.op == "write" else os.preadv
        for measured in (False, True):
            latencies = []
            clock = time.perf_counter
            start = clock()
            end = start + (duration if measured else WARMUP)
            next_report = start
            while True:
                t0 = clock()
                if t0 >= end:
                    break
                if call(fd, [buf], next(where)) != pattern.block_size:
                    raise BlkifError("short %s on %s" % (pattern.op, image))
                latencies.append(clock() - t0)
                if measured and t0 >= next_report:
                    next_report = t0 + 0.2
                    progress.update(name + " file", (t0 - start) / duration)
        return summary(latencies, clock() - start, pattern.block_size)
    finally:
        os.close(fd)


def print_report(report):
    print("%-21s %8s %8s %7s %7s %12s   %9s %8s %7s %7s   %7s" % (
        "pattern", "IOPS", "MB/s", "p50 ms", "p99 ms", "CPU us/IO", "file IOPS", "MB/s",
        "p50 ms", "p99 ms", "ratio"))
    for r in report["patterns"]:
        b, f = r["blkif"], r["file"]
        cpu = "%.0f+%.0f" % (b["cpu_us_per_io"]["guest"], b["cpu_us_per_io"]["backend"])
        print("%-21s %8.0f %8.1f %7.3f %7.3f %12s   %9.0f %8.1f %7.3f %7.3f   %7.4f" % (
            r["name"], b["iops"], b["mb_per_s"], b["p50_ms"], b["p99_ms"], cpu,
            f["iops"], f["mb_per_s"], f["p50_ms"], f["p99_ms"], r["ratio"] or 0))
    n = report["patterns"][0]["negotiated"] if report["patterns"] else None
    if n:
        print("negotiated: abi %s, %d queue(s) of %d ring page(s), persistent grants %s; "
              "indirect %d segments (the -direct patterns: none); image %d MiB, %.1f s "
              "per pattern and side; CPU us/IO: guest+backend worker" % (
                  n["abi"], n["queues"], n["ring_pages"], "on" if n["persistent"] else "off",
                  max(r["negotiated"]["indirect_segments"] for r in report["patterns"]),
                  report["size"] >> 20, report["duration"]))


# -- the guest --------------------------------------------------------------

def guest_pattern(guest, params, emit):
    """One pattern through the guest's device: warm-up, then measured."""
    dev = guest.dev
    pattern = Pattern(params["op"], params["block_size"], params["queue_depth"],
                      params["access"], params["indirect"])
    where = offsets(pattern, dev.size, random.Random(params["seed"]))
    data = random.Random(params["seed"]).randbytes(pattern.block_size)
    if pattern.op == "write":
        def submit(offset):
            return dev.submit_write(offset, data)
    else:
        def submit(offset):
            return dev.submit_read(offset, pattern.block_size)
    depth, duration = pattern.queue_depth, params["duration"]
    clock = time.perf_counter
    for measured in (False, True):
        latencies = []
        inflight = {}  # handle -> submitted at
        if measured:
            emit({"label": params["name"], "fraction": 0.0, "mark": "measure"})
            cpu = os.times()
        start = clock()
        end = start + (duration if measured else WARMUP)
        next_report = last_done = start
        while True:
            now = clock()
            with dev.plugged():  # the refill goes out with one notify
                while len(inflight) < depth and now < end:
                    inflight[submit(next(where))] = clock()
            if not inflight:
                break
            dev.poll(1.0)
            now = clock()
            done = [h for h in inflight if h.done]
            for handle in done:
                if handle.error is not None:
                    raise handle.error
                latencies.append(now - inflight.pop(handle))
            if done:
                last_done = now
            elif now - last_done > dev.options.timeout:
                raise BlkifError("%s: no transfer finished for %.0f s"
                                 % (params["name"], now - last_done))
            if measured and now >= next_report:
                next_report = now + 0.2
                emit({"label": params["name"], "fraction": (now - start) / duration})
    seconds = clock() - start
    cpu_end = os.times()
    result = summary(latencies, seconds, pattern.block_size)
    used = (cpu_end.user - cpu.user) + (cpu_end.system - cpu.system)
    result["cpu_us_per_io"] = {"guest": round(used / max(result["ios"], 1) * 1e6, 1)}
    return result
