"""Status files of a running service, and ``blkif stats`` that reads them.

Each worker rewrites ``vbd-<domid>-<devid>.json`` in the state directory
about once a second and when it exits (its counters summed and per queue);
the supervisor keeps ``service.json`` (its workers, restarts and failures).
Files are replaced atomically, so a reader never sees half of one.
"""
import glob
import json
import os
import sys

from blkif.errors import UsageError


def default_state_dir():
    """$BLKIF_STATE_DIR if set, else /run/blkif for root, else
    $XDG_RUNTIME_DIR/blkif or /tmp/blkif-<uid>."""
    if os.environ.get("BLKIF_STATE_DIR"):
        return os.environ["BLKIF_STATE_DIR"]
    if os.geteuid() == 0:
        return "/run/blkif"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "blkif") if runtime else "/tmp/blkif-%d" % os.getuid()


def vbd_file(state_dir, domid, devid):
    return os.path.join(state_dir, "vbd-%d-%d.json" % (domid, devid))


def read_vbd(state_dir, domid, devid):
    """One worker's status file, as a dict (OSError, ValueError if unreadable)."""
    with open(vbd_file(state_dir, domid, devid)) as f:
        return json.load(f)


def write_status(path, status, previous=None):
    """Replace ``path`` with ``status`` as JSON, atomically; returns the text.
    If the text is ``previous`` (what the caller wrote last) the file is only
    touched: its time is a worker's heartbeat.  Compact JSON, which the C
    encoder writes: every worker does this about once a second."""
    text = json.dumps(status, sort_keys=True, separators=(",", ":"))
    if text == previous:
        try:
            os.utime(path)
            return text
        except FileNotFoundError:
            pass  # removed meanwhile: write it again
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return text


def read_status(state_dir):
    """{"service": {...} or None, "vbds": [...]} from ``state_dir``."""
    if not os.path.isdir(state_dir):
        raise UsageError("no blkif service state in %s (is `blkif serve` running with "
                         "this --state-dir?)" % state_dir)
    service = None
    service_file = os.path.join(state_dir, "service.json")
    if os.path.exists(service_file):
        with open(service_file) as f:
            service = json.load(f)
    vbds = []
    for path in sorted(glob.glob(os.path.join(state_dir, "vbd-*.json"))):
        try:
            with open(path) as f:
                vbds.append(json.load(f))
        except (OSError, ValueError):
            continue  # removed or being replaced as we read: it will be back
    vbds.sort(key=lambda v: (v["domid"], v["devid"]))
    return {"service": service, "vbds": vbds}


def add_arguments(parser):
    parser.add_argument("--state-dir", metavar="DIR", default=None,
                        help="the service's state directory (default: %s)" % default_state_dir())
    parser.add_argument("--format", choices=("table", "json", "prometheus"), default="table",
                        help="a table (default), one JSON object, or Prometheus's text format")
    parser.add_argument("--json", action="store_const", dest="format", const="json",
                        help="the same as --format json")


def _row(vbd, worker):
    c = vbd["counters"]
    ops = c["ops"]
    neg = vbd.get("negotiated") or {}
    io = "%s/%s" % (neg["engine"], neg["io"]) if "io" in neg else "-"
    if neg.get("bounce_mib"):
        io += "+bounce"
    return "%-6d %-6d %-10s %-8s %8d %8d %8d %6d %6d %10d %10d %6d %6d %7d %-12s" % (
        vbd["domid"], vbd["devid"], vbd["state"], worker.get("status", "-"),
        c["requests"], ops.get("read", 0), ops.get("write", 0),
        ops.get("flush_diskcache", 0) + ops.get("write_barrier", 0), ops.get("discard", 0),
        c["read_bytes"], c["write_bytes"], c["errors"], c["in_flight"],
        c.get("persistent_grants", 0), io)


def run(args):
    state_dir = args.state_dir or default_state_dir()
    if args.format == "prometheus":
        from blkif.backend import metrics
        read_status(state_dir)  # the same error as the other formats when there is none
        sys.stdout.write(metrics.exposition(state_dir))
        return 0
    state = read_status(state_dir)
    if args.format == "json":
        print(json.dumps(state, indent=2, sort_keys=True))
        return 0
    workers = {}
    if state["service"]:
        svc = state["service"]
        print("service pid %d, %d VBD(s), state %s" % (svc["pid"], len(svc["workers"]),
                                                     svc["state"]))
        workers = {(w["domid"], w["devid"]): w for w in svc["workers"]}
    print("%-6s %-6s %-10s %-8s %8s %8s %8s %6s %6s %10s %10s %6s %6s %7s %-12s" % (
        "domid", "devid", "state", "worker", "requests", "reads", "writes", "flush",
        "disc", "read_B", "write_B", "errors", "flight", "pgrants", "engine/io"))
    for vbd in state["vbds"]:
        print(_row(vbd, workers.get((vbd["domid"], vbd["devid"]), {})))
        error = (vbd.get("storage") or {}).get("error")
        if error:  # the line under its VBD's row
            print("       storage error: %s" % error)
    return 0
