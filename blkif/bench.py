"""``blkif bench``: blkif against fio on its own backing file, pattern by pattern.

The demo's sandbox (``blkif/sandbox.py``): xenstored, the sim hypervisor,
``blkif serve`` and guest domain 1, each a process, with VBD ``xvda`` on an
image of ``--size`` bytes (in the sandbox's directory, or at ``--image PATH``
on a filesystem of your choice).  For each pattern of :data:`PATTERNS`:

- **blkif**: the guest does the pattern through its :class:`BlockDevice`
  for ``--duration`` seconds, keeping ``queue_depth`` transfers in flight;
  a transfer's latency runs from its submission to the moment the guest
  sees its completion;
- **fio**: then fio (ioengine io_uring) does the same pattern (block size,
  queue depth, random or sequential, same time) on the image file the
  backend serves: what the storage gives without blkif.

``--format`` chooses the storage behind the VBD, filled with the same data:
``raw`` (the image file, the C engine; fio with io_uring on the file),
``qcow2`` (``qemu-img convert`` of it, served through the VBD's own
qemu-storage-daemon; fio's nbd engine on that daemon's socket) or ``nbd``
(the raw file exported by ``nbdkit file`` on a Unix socket and given to the
VBD as an NBD URI; fio's nbd engine on the same URI).  The fio side is what
the storage gives without blkif, so ``ratio`` is blkif's cost on each route.

``--direct`` serves the image with O_DIRECT and runs fio with ``--direct=1``:
the page cache out of both sides, as on a real disk.  Each side first runs
the pattern unmeasured for a warm-up (caches, the backend's persistent
grants).  Besides wall-clock figures, which move with whatever else the
machine runs, each side reports its CPU time per I/O (``cpu_us_per_io``:
blkif's guest and backend worker, fio's processes with their io_uring
workers): what the code costs, steadier from run to run than IOPS on a busy
machine.  ``ratio`` is blkif's IOPS over fio's: the fraction of the
storage's speed that reaches the guest.
Patterns needing other negotiation (indirect descriptors off) re-attach the
guest.  Figures are for comparing runs on one machine, never assertions.
"""
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import time
from dataclasses import asdict, dataclass

from blkif import sandbox, toolstack
from blkif.abi.constants import BLKIF_OP_READ, BLKIF_OP_WRITE
from blkif.errors import BlkifError, UsageError
from blkif.frontend.fastpath import FastQueue, run_pattern
from blkif.sandbox import percentile

DOMID, VDEV = 1, "xvda"
FORMATS = ("raw", "qcow2", "nbd")
FRONTENDS = ("c", "python")
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
    parser.add_argument("--direct", action="store_true",
                        help="O_DIRECT on both sides: blkif serve --direct, fio --direct=1 "
                             "(needs --image on a filesystem with O_DIRECT, not tmpfs)")
    parser.add_argument("--image", metavar="PATH",
                        help="create the image here (a new file, removed afterwards) "
                             "instead of in the sandbox's directory")
    parser.add_argument("--format", choices=FORMATS, default="raw",
                        help="the VBD's storage: raw (the image file, default), qcow2 (a "
                             "qcow2 copy through qemu-storage-daemon) or nbd (the file "
                             "exported by nbdkit, an NBD URI)")
    parser.add_argument("--frontend", choices=FRONTENDS, default="c",
                        help="the guest's side: c (its queues' C fast path, as fio over "
                             "blkfront; default) or python (the BlockDevice API)")
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


def children_cpu():
    """User + system CPU seconds of this process's waited-for children."""
    now = os.times()
    return now.children_user + now.children_system


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
    fio = shutil.which("fio")
    if fio is None:
        raise BlkifError("fio is not installed (Debian: apt-get install fio)")
    if args.format == "nbd" and args.direct:
        raise UsageError("--direct needs --format raw or qcow2 (nbdkit opens the file itself)")
    for tool in {"qcow2": ["qemu-img", "qemu-storage-daemon"], "nbd": ["nbdkit"]}.get(
            args.format, []):
        if shutil.which(tool) is None:
            raise BlkifError("%s is not installed (Debian: qemu-utils, qemu-system-common, "
                             "nbdkit)" % tool)
    if args.image and os.path.lexists(args.image):
        raise UsageError("--image %s exists: give a new path (the bench creates and "
                         "removes it)" % args.image)
    serve_options, front = sandbox.setup(args)
    if args.direct:
        serve_options.append("--direct")
    progress = sandbox.Progress(enabled=not args.quiet, steps=1)
    with sandbox.Sandbox(args.workdir, serve_options) as box:
        progress.note("blkif bench: xenstored, sim hypervisor, blkif serve and guest "
                      "domain %d running in %s" % (DOMID, box.dir))
        chunk = random.Random(0).randbytes(1 << 20)
        image = box.make_image(os.path.abspath(args.image) if args.image else "disk.img",
                               args.size, lambda offset, n: chunk[:n])
        try:
            with storage_for(args.format, box, image) as (params, uri):
                results = _run_patterns(args, names, box, params, uri or image, front, fio,
                                        progress)
        finally:
            if args.image:
                os.unlink(image)
    report = {"size": args.size, "duration": args.duration, "direct": args.direct,
              "format": args.format, "engine": args.engine or "c", "frontend": args.frontend,
              "patterns": results}
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True))
    else:
        print_report(report)
    return 0


@contextlib.contextmanager
def storage_for(fmt, box, image):
    """(``params`` for the VBD, the NBD URI fio uses or None) for ``--format``."""
    if fmt == "raw":
        yield image, None
        return
    if fmt == "qcow2":
        qcow2 = box.path("disk.qcow2")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", image, qcow2],
                       check=True, capture_output=True)
        try:  # fio connects to the VBD's own daemon (storage_daemon's socket)
            yield "qcow2:" + qcow2, "nbd+unix:///disk?socket=%s" % os.path.join(
                box.state_dir, "vbd-%d-%d.nbd" % (DOMID, toolstack.vdev_to_devid(VDEV)))
        finally:
            os.unlink(qcow2)
        return
    sock = box.path("nbdkit.sock")
    with open(box.path("nbdkit.log"), "ab") as log:
        proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", sock,
                                 "file", image], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while not _listening(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BlkifError("nbdkit did not start (see %s)" % box.path("nbdkit.log"))
            time.sleep(0.02)
        uri = "nbd+unix:///?socket=" + sock
        yield uri, uri
    finally:
        proc.terminate()
        proc.wait()


def _listening(path):
    with socket.socket(socket.AF_UNIX) as sock:
        return sock.connect_ex(path) == 0


def _run_patterns(args, names, box, params, target, front, fio, progress):
    """Each pattern through the guest, then through fio on ``target`` (a file or
    NBD URI); the report's rows."""
    results = []
    box.add_vbd(DOMID, VDEV, params)
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
        params = dict(asdict(pattern), duration=args.duration, seed=len(results),
                      frontend=args.frontend)
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
        progress.update(name + " fio", 0.0)
        baseline = run_fio(fio, target, pattern, args.duration, args.direct)
        results.append(dict(
            name=name, **asdict(pattern), negotiated=negotiated, blkif=blkif, fio=baseline,
            ratio=round(blkif["iops"] / baseline["iops"], 4) if baseline["iops"] else None))
    guest.call("detach")
    progress.end()
    box.stop_cleanly()
    return results


def fio_argv(fio, target, pattern, duration, direct):
    """fio doing ``pattern`` on ``target`` (a file, or an NBD URI: fio's nbd
    engine) for ``duration`` s after a warm-up."""
    rw = {("read", "random"): "randread", ("write", "random"): "randwrite",
          ("read", "sequential"): "read", ("write", "sequential"): "write"}
    where = (["--ioengine=nbd", "--uri=" + target] if "://" in target else
             ["--filename=" + target, "--ioengine=io_uring", "--direct=%d" % direct])
    return [fio, "--name=baseline", *where,
            "--rw=" + rw[pattern.op, pattern.access], "--bs=%d" % pattern.block_size,
            "--iodepth=%d" % pattern.queue_depth,
            "--time_based", "--runtime=%dms" % (duration * 1000),
            "--ramp_time=%dms" % (WARMUP * 1000),
            "--norandommap", "--randrepeat=0", "--lat_percentiles=1",
            "--output-format=json"]


def run_fio(fio, target, pattern, duration, direct):
    """fio's figures for ``pattern``, in :func:`summary`'s shape plus CPU per I/O."""
    before = children_cpu()
    run = subprocess.run(fio_argv(fio, target, pattern, duration, direct),
                         capture_output=True, text=True, timeout=duration + 60)
    used = children_cpu() - before
    if run.returncode != 0:
        raise BlkifError("fio failed on %s: %s" % (target, (run.stderr or run.stdout).strip()
                                                    .splitlines()[-1:]))
    job = json.loads(run.stdout[run.stdout.index("{"):])["jobs"][0]
    side = job[pattern.op]
    seconds = side["runtime"] / 1e3
    ios = side["total_ios"]
    lat = side["lat_ns"]["percentile"]
    # fio's usr_cpu and sys_cpu are its job thread's alone; the io_uring
    # workers doing its buffered writes count only in its processes' rusage,
    # which covers the warm-up too: spread over it at the measured rate
    cpu = used * seconds / (seconds + WARMUP)
    return {
        "ios": ios, "seconds": round(seconds, 3),
        "iops": round(ios / seconds, 1) if seconds else 0.0,
        "mb_per_s": round(ios * pattern.block_size / seconds / 1e6, 2) if seconds else 0.0,
        "p50_ms": round(lat["50.000000"] / 1e6, 4), "p99_ms": round(lat["99.000000"] / 1e6, 4),
        "cpu_us_per_io": round(cpu / max(ios, 1) * 1e6, 1),
    }


def print_report(report):
    print("%-21s %8s %8s %7s %7s %12s   %8s %8s %7s %7s %6s   %7s" % (
        "pattern", "IOPS", "MB/s", "p50 ms", "p99 ms", "CPU us/IO", "fio IOPS", "MB/s",
        "p50 ms", "p99 ms", "CPU", "ratio"))
    for r in report["patterns"]:
        b, f = r["blkif"], r["fio"]
        cpu = "%.0f+%.0f" % (b["cpu_us_per_io"]["guest"], b["cpu_us_per_io"]["backend"])
        print("%-21s %8.0f %8.1f %7.3f %7.3f %12s   %8.0f %8.1f %7.3f %7.3f %6.0f   %7.4f" % (
            r["name"], b["iops"], b["mb_per_s"], b["p50_ms"], b["p99_ms"], cpu,
            f["iops"], f["mb_per_s"], f["p50_ms"], f["p99_ms"], f["cpu_us_per_io"],
            r["ratio"] or 0))
    n = report["patterns"][0]["negotiated"] if report["patterns"] else None
    if n:
        print("negotiated: abi %s, %d queue(s) of %d ring page(s), persistent grants %s; "
              "indirect %d segments (the -direct patterns: none); image %d MiB, %.1f s "
              "per pattern and side; CPU us/IO: guest+backend worker" % (
                  n["abi"], n["queues"], n["ring_pages"], "on" if n["persistent"] else "off",
                  max(r["negotiated"]["indirect_segments"] for r in report["patterns"]),
                  report["size"] >> 20, report["duration"]))
        fio = ("ioengine io_uring on the same image" if report["format"] == "raw"
               else "ioengine nbd on the same NBD export")
        engine = report["engine"] + ("" if report["format"] == "raw"
                                     else " over NBD, format %s" % report["format"])
        print("engine %s%s; guest frontend %s; fio: %s; CPU us/IO: fio's processes" % (
            engine, ", O_DIRECT" if report["direct"] else "", report["frontend"], fio))


# -- the guest --------------------------------------------------------------

def guest_pattern(guest, params, emit):
    """One pattern through the guest's device: warm-up, then measured."""
    dev = guest.dev
    pattern = Pattern(params["op"], params["block_size"], params["queue_depth"],
                      params["access"], params["indirect"])
    data = random.Random(params["seed"]).randbytes(pattern.block_size)
    drive = _c_frontend if params["frontend"] == "c" else _python_frontend
    latencies, seconds, cpu = drive(dev, pattern, params, data, emit)
    result = summary(latencies, seconds, pattern.block_size)
    result["cpu_us_per_io"] = {"guest": round(cpu / max(result["ios"], 1) * 1e6, 1)}
    return result


def _cpu_seconds(start):
    now = os.times()
    return (now.user - start.user) + (now.system - start.system)


def _c_frontend(dev, pattern, params, data, emit):
    """The pattern through the queues' C fast path (blkif.frontend.fastpath),
    as fio drives blkfront in a Linux guest: (latencies, seconds, CPU seconds)."""
    fast = []
    try:
        for queue in dev.queues:
            fast.append(FastQueue(queue))
        def run(seconds):
            return run_pattern(
                fast, BLKIF_OP_READ if pattern.op == "read" else BLKIF_OP_WRITE,
                pattern.block_size, pattern.queue_depth, pattern.access == "random",
                dev.size, params["seed"], seconds, dev.options.timeout,
                data if pattern.op == "write" else None)
        run(WARMUP)
        emit({"label": params["name"], "fraction": 0.0, "mark": "measure"})
        cpu = os.times()
        latencies, seconds = run(params["duration"])
        used = _cpu_seconds(cpu)
        emit({"label": params["name"], "fraction": 1.0})
    finally:
        for queue in fast:
            queue.close()
    return latencies, seconds, used


def _python_frontend(dev, pattern, params, data, emit):
    """The pattern through the device's Python API: (latencies, seconds, CPU seconds)."""
    where = offsets(pattern, dev.size, random.Random(params["seed"]))
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
    return latencies, clock() - start, _cpu_seconds(cpu)
