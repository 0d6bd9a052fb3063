"""Ring-size calculator: what a ring of a given size can carry.

A ring of 2**order pages holds ``(pages * PAGE_SIZE - header) / slot`` entries,
rounded down to a power of two (ring.h ``__CONST_RING_SIZE``).  Each entry is a
request of up to 11 direct segments, or an indirect request whose segment
descriptors sit in up to 8 granted pages of 512 each.
"""
import json

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
        help="ring of 2**N pages (0..4); default: a table of every order",
    )
    parser.add_argument(
        "--max-indirect-segments",
        type=int,
        metavar="N",
        help="segments per indirect request (0..4096; Linux blkback offers 256)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args):
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
