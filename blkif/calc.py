"""``blkif calc``: what a ring carries, and what a host's VBDs cost.

Without capacity options it prints the ring table below; with any of them
(or ``--explain``/``--check``) a capacity plan from blkif.sizing, the live
limits read by blkif.livecheck for ``--check``.


A ring of 2**order pages holds ``(pages * PAGE_SIZE - header) / slot`` entries,
rounded down to a power of two (ring.h ``__CONST_RING_SIZE``).  Each entry is a
request of up to 11 direct segments, or an indirect request whose segment
descriptors sit in up to 8 granted pages of 512 each.
"""
import argparse
import json

from blkif import sizing
from blkif.abi import ABI_NAMES
from blkif.abi.constants import (
    BLKIF_MAX_INDIRECT_SEGMENTS,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_SEGS_PER_INDIRECT_FRAME,
    PAGE_SIZE,
    XENBUS_MAX_RING_GRANT_ORDER,
)
from blkif.errors import UsageError
from blkif.ring import ring_slots


def calculate(abi="x86_64", ring_page_order=0, max_indirect_segments=None):
    """One row of figures as a dict (the ``--json`` keys).

    ``max_indirect_segments`` None or 0 means no indirect descriptors.
    Raises UsageError naming the bad argument.
    """
    if abi not in ABI_NAMES:
        raise UsageError(
            "unknown ABI %r (choose from %s)" % (abi, ", ".join(sorted(ABI_NAMES)))
        )
    if not 0 <= ring_page_order <= XENBUS_MAX_RING_GRANT_ORDER:
        raise UsageError(
            "ring page order %d out of range 0..%d"
            % (ring_page_order, XENBUS_MAX_RING_GRANT_ORDER)
        )
    segments = max_indirect_segments or 0
    if not 0 <= segments <= BLKIF_MAX_INDIRECT_SEGMENTS:
        raise UsageError(
            "max indirect segments %d out of range 0..%d"
            % (segments, BLKIF_MAX_INDIRECT_SEGMENTS)
        )
    layout = ABI_NAMES[abi]
    pages = 1 << ring_page_order
    raw, slots = ring_slots(pages * PAGE_SIZE, layout.slot_size)
    direct_bytes = BLKIF_MAX_SEGMENTS_PER_REQUEST * PAGE_SIZE
    indirect = None
    if segments:
        indirect = {
            "segments": segments,
            "pages_per_request": -(-segments // BLKIF_SEGS_PER_INDIRECT_FRAME),
            "bytes_per_request": segments * PAGE_SIZE,
            "max_inflight_bytes": slots * segments * PAGE_SIZE,
        }
    return {
        "abi": abi,
        "page_size": PAGE_SIZE,
        "ring_page_order": ring_page_order,
        "ring_pages": pages,
        "request_size": layout.request_size,
        "response_size": layout.response_size,
        "raw_slots": raw,
        "slots": slots,
        "segments_per_request": BLKIF_MAX_SEGMENTS_PER_REQUEST,
        "bytes_per_request": direct_bytes,
        "max_inflight_bytes": slots * direct_bytes,
        "indirect": indirect,
    }


def human(n):
    """Bytes in binary units: 45056 -> '44 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            text = ("%.1f" % n).rstrip("0").rstrip(".")
            return "%s %s" % (text, unit)
        n /= 1024


def format_table(rows):
    """Rows as an aligned text table."""
    header = ["order", "pages", "slots(raw)", "req/rsp", "per request", "in flight"]
    indirect = any(r["indirect"] for r in rows)
    if indirect:
        header += ["indirect segs", "ind pages", "ind per request", "ind in flight"]
    lines = [header]
    for r in rows:
        line = [
            str(r["ring_page_order"]),
            str(r["ring_pages"]),
            "%d(%d)" % (r["slots"], r["raw_slots"]),
            "%d/%d" % (r["request_size"], r["response_size"]),
            human(r["bytes_per_request"]),
            human(r["max_inflight_bytes"]),
        ]
        if indirect:
            ind = r["indirect"]
            line += [
                str(ind["segments"]),
                str(ind["pages_per_request"]),
                human(ind["bytes_per_request"]),
                human(ind["max_inflight_bytes"]),
            ]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    title = "abi %s, page %d bytes, %d direct segments per request" % (
        rows[0]["abi"],
        rows[0]["page_size"],
        rows[0]["segments_per_request"],
    )
    body = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join([title] + body)


def add_arguments(parser):
    parser.add_argument(
        "--abi", default="x86_64", help="ring ABI: x86_64, x86_32 or arm (default x86_64)"
    )
    parser.add_argument(
        "--ring-page-order",
        type=int,
        metavar="N",
        help="ring of 2**N pages (0..4); default: a table of every order "
        "(capacity plan: blkfront's max_ring_page_order, default 0)",
    )
    parser.add_argument(
        "--max-indirect-segments",
        type=int,
        metavar="N",
        help="segments per indirect request (0..4096; Linux blkback offers 256; "
        "capacity plan: blkfront's max_indirect_segments, default 32)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    plan = parser.add_argument_group(
        "capacity plan (any of these, or --explain/--check, selects it; docs/calc.md)")
    for flag, kind, metavar, text in PLAN_OPTIONS:
        if kind is bool:
            plan.add_argument(flag, action="store_true", default=None, help=text)
        else:
            plan.add_argument(flag, type=kind, metavar=metavar, help=text)
    plan.add_argument("--explain", action="store_true",
                      help="print the formula and source behind every figure")
    plan.add_argument("--check", action="store_true",
                      help="read this host's limits (dom0 or guest) and warn; exit 1 on an error")
    plan.add_argument("--root", default="/", help=argparse.SUPPRESS)
    plan.add_argument("--xl-info", metavar="FILE",
                      help="--check: read `xl info` output from FILE instead of running xl")
    plan.add_argument("--state-dir", metavar="DIR",
                      help="--check: our service's state directory (default /run/blkif)")


# (flag, type, metavar, help) of the capacity plan's options.
PLAN_OPTIONS = (
    ("--backend", str, "KIND", "blkback (Linux xen-blkback, default) or blkif (ours)"),
    ("--queues", int, "N", "blkfront max_queues (default 4, capped at the vCPUs)"),
    ("--vcpus", int, "N", "guest vCPUs (default 1)"),
    ("--no-persistent", bool, None, "blkfront feature_persistent=0"),
    ("--untrusted", bool, None, "blkfront trusted=0 (bounce buffers without persistent grants)"),
    ("--guest-memory", int, "MIB", "guest memory in MiB, to warn about preallocation"),
    ("--disks", int, "N", "VBDs per guest (default 1)"),
    ("--guests", int, "N", "guests per host (default 1)"),
    ("--backend-queues", int, "N", "backend multi-queue-max-queues (default 4)"),
    ("--max-persistent-grants", int, "N",
     "blkback max_persistent_grants (default 1056; ours: 1056, fixed)"),
    ("--max-grant-frames", int, "N", "each guest's max_grant_frames (default 64)"),
    ("--max-maptrack-frames", int, "N", "dom0's gnttab_max_maptrack_frames (default 1024)"),
    ("--latency-ms", float, "MS", "per-request latency, for Little's law"),
    ("--target-mbps", float, "MB/S", "what the disk can do, to find where more stops paying"),
)


def plan_selected(args):
    return args.explain or args.check or any(
        getattr(args, flag[2:].replace("-", "_")) is not None for flag, *_ in PLAN_OPTIONS)


def host_from_args(args):
    """The sizing.Host the command line describes (unset options: defaults)."""
    def opt(name, default):
        value = getattr(args, name)
        return default if value is None else value

    fe = sizing.Blkfront(
        max_indirect_segments=opt("max_indirect_segments", 32),
        max_ring_page_order=opt("ring_page_order", 0),
        max_queues=opt("queues", 4),
        feature_persistent=not args.no_persistent,
        trusted=not args.untrusted,
        vcpus=opt("vcpus", 1),
        memory_mib=args.guest_memory,
    )
    kind = opt("backend", "blkback")
    be = dict(max_queues=opt("backend_queues", 4))
    if kind == "blkif":
        backend = sizing.Backend.ours(**be)
    else:
        backend = sizing.Backend(kind=kind, max_persistent_grants=opt(
            "max_persistent_grants", sizing.BLKBACK_MAX_PERSISTENT_GRANTS), **be)
    return sizing.Host(
        frontend=fe, backend=backend, abi=args.abi, disks=opt("disks", 1),
        guests=opt("guests", 1), max_grant_frames=opt("max_grant_frames", sizing.MAX_GRANT_FRAMES),
        max_maptrack_frames=opt("max_maptrack_frames", sizing.MAX_MAPTRACK_FRAMES),
        latency_ms=args.latency_ms, target_mbps=args.target_mbps)


def format_value(figure):
    if figure.unit == "bytes":
        return human(figure.value)
    if figure.unit == "bytes/s":
        return human(figure.value) + "/s"
    if isinstance(figure.value, dict):
        return ", ".join("%s %s" % kv for kv in figure.value.items())
    if figure.value is None:
        return "none reaches it"
    return "%s %s" % (figure.value, figure.unit)


def format_plan(result, explain=False, sources=()):
    """A capacity plan as text: what was read, negotiated values, figures, warnings."""
    host, n = result.host, result.negotiated
    lines = ["read: " + s for s in sources]
    lines.append("%d guest(s) x %d disk(s); blkfront against %s, abi %s" % (
        host.guests, host.disks, host.backend.kind, host.abi))
    lines.append("negotiated: ring order %d (%d slots), %d queue(s), %s, persistent %s, "
                 "bounce %s" % (
        n["ring_page_order"], n["slots"], n["queues"],
        "%d indirect segments" % n["indirect_segments"] if n["indirect_segments"]
        else "no indirect (11 segments)", "on" if n["persistent"] else "off",
        "on" if n["bounce"] else "off"))
    width = max(len(f.name) for f in result.figures)
    for f in result.figures:
        lines.append("  %s  %s" % (f.name.ljust(width), format_value(f)))
        if explain:
            lines.append("  %s    = %s" % (" " * width, f.why))
    for level, _, text in result.warnings:
        lines.append("%s: %s" % (level, text))
    return "\n".join(lines)


def run(args):
    if plan_selected(args):
        return run_plan(args)
    orders = (
        [args.ring_page_order]
        if args.ring_page_order is not None
        else range(XENBUS_MAX_RING_GRANT_ORDER + 1)
    )
    rows = [calculate(args.abi, order, args.max_indirect_segments) for order in orders]
    if args.json:
        print(json.dumps(rows[0] if args.ring_page_order is not None else rows, indent=2))
    else:
        print(format_table(rows))
    return 0


def run_plan(args):
    host, sources = host_from_args(args), []
    if args.check:
        from blkif import livecheck
        from blkif.backend.status import default_state_dir

        xl_info = livecheck.run_xl_info
        if args.xl_info:
            try:
                with open(args.xl_info) as f:
                    text = f.read()
            except OSError as exc:
                raise UsageError("--xl-info %s: %s" % (args.xl_info, exc.strerror))
            xl_info = lambda: text  # noqa: E731
        host, sources = livecheck.inspect(host, args.root, xl_info,
                                          args.state_dir or default_state_dir())
    result = sizing.plan(host)
    if args.json:
        out = result.as_dict()
        out["read"] = sources
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(result, args.explain, sources))
    return 1 if args.check and any(w[0] == "error" for w in result.warnings) else 0
