"""The guest workload's plan and what comes back from the guest and xenstore.

The plan is a list of (offset, size) chunks: sizes are powers of two from
4 KiB to 1 MiB, each offset a multiple of its size (so the guest's ``dd`` can
seek in whole blocks with O_DIRECT), no two chunks overlapping, none touching
the discard range.  It is a pure function of a seed, so a failing run can be
replayed.

The guest reports on its console with lines ``LAB <KIND> <rest>``
(``CHECK name pass|fail detail``, ``VALUE k=v ...``, ``MD5 n off size sum``,
``DMESG line``, ``DONE rc=N``); ``parse_console`` collects them.
``parse_xenstore_ls`` reads ``xenstore-ls -f`` output.
"""
import random
import re
from dataclasses import dataclass, field

MIN_CHUNK = 4096
MAX_CHUNK = 1 << 20
DISCARD_LEN = 1 << 20


def discard_range(disk_bytes):
    """(offset, length) of the range the guest discards: the last MiB but one."""
    return disk_bytes - 2 * DISCARD_LEN, DISCARD_LEN


def make_plan(seed, disk_bytes, chunks=16):
    """``chunks`` non-overlapping (offset, size) pairs, sorted by offset.

    Raises ValueError when the disk is too small to hold them.
    """
    rng = random.Random(seed)
    taken = [discard_range(disk_bytes)]
    sizes = [MIN_CHUNK << (i % 9) for i in range(chunks)]  # 4 KiB .. 1 MiB, each used
    rng.shuffle(sizes)
    plan = []
    for size in sizes:
        for _ in range(1000):
            offset = rng.randrange(disk_bytes // size) * size
            if all(offset + size <= o or o + n <= offset for o, n in taken):
                break
        else:
            raise ValueError("no room for a %d-byte chunk on a %d-byte disk" % (size, disk_bytes))
        taken.append((offset, size))
        plan.append((offset, size))
    return sorted(plan)


def plan_text(plan):
    return "".join("%d %d\n" % chunk for chunk in plan)


@dataclass
class ConsoleReport:
    """What one guest said.  ``done`` is None until ``LAB DONE`` arrives."""

    checks: list = field(default_factory=list)  # (name, passed, detail)
    values: dict = field(default_factory=dict)
    md5: dict = field(default_factory=dict)  # xvda's chunk index -> (offset, size, md5)
    disk_md5: dict = field(default_factory=dict)  # disk -> its chunks, as md5
    dmesg: list = field(default_factory=list)
    done: int = None


_LINE = re.compile(r"LAB (CHECK|VALUE|MD5|DMESG|DONE|BOOT|WARN) ?(.*)$")


def parse_console(text):
    """Collect the ``LAB`` lines of a guest console log into a ConsoleReport."""
    report = ConsoleReport()
    for raw in text.splitlines():
        m = _LINE.search(raw.rstrip("\r"))
        if not m:
            continue
        kind, rest = m.groups()
        if kind == "CHECK":
            name, status, detail = (rest.split(" ", 2) + ["", ""])[:3]
            report.checks.append((name, status == "pass", detail))
        elif kind == "VALUE":
            for item in rest.split():
                key, _, value = item.partition("=")
                report.values[key] = value
        elif kind == "MD5":
            parts = rest.split()  # index offset size md5 [disk, default xvda]
            if len(parts) in (4, 5):
                disk = parts[4] if len(parts) == 5 else "xvda"
                chunk = (int(parts[1]), int(parts[2]), parts[3])
                report.disk_md5.setdefault(disk, {})[int(parts[0])] = chunk
                if disk == "xvda":
                    report.md5[int(parts[0])] = chunk
        elif kind == "DMESG":
            report.dmesg.append(rest)
        elif kind == "DONE":
            m = re.match(r"rc=(\d+)", rest)
            report.done = int(m.group(1)) if m else 1
    return report


def parse_xenstore_ls(text, prefix=""):
    """``xenstore-ls -f`` output -> ``{path relative to prefix: value}``.

    Values are unquoted; xenstore-ls' backslash escapes are kept as they are.
    """
    nodes = {}
    prefix = prefix.rstrip("/")
    for line in text.splitlines():
        m = re.match(r'^(/\S*) = "(.*)"$', line)
        if not m:
            continue
        path, value = m.groups()
        if prefix and (path == prefix or path.startswith(prefix + "/")):
            path = path[len(prefix) + 1:]
        nodes[path] = value
    return nodes


# Negotiated values worth reporting, per side (xenstore keys as Linux writes them).
BACKEND_KEYS = (
    "state", "feature-max-indirect-segments", "multi-queue-max-queues", "max-ring-page-order",
    "feature-persistent", "feature-flush-cache", "feature-barrier", "feature-discard",
    "discard-granularity", "sectors", "sector-size", "physical-sector-size",
)
FRONTEND_KEYS = (
    "state", "protocol", "ring-page-order", "multi-queue-num-queues", "feature-persistent",
    "event-channel", "ring-ref",
)


def summarize_frontend(nodes):
    """The frontend keys, plus ``rings``: ring refs per queue (``queue-0:4``)."""
    summary = {k: nodes[k] for k in FRONTEND_KEYS if k in nodes}
    queues = {}
    for key in nodes:
        m = re.match(r"(?:(queue-\d+)/)?ring-ref\d*$", key)
        if m:
            queue = m.group(1) or "queue-0"
            queues[queue] = queues.get(queue, 0) + 1
    summary["rings"] = " ".join("%s:%d" % q for q in sorted(queues.items()))
    return summary


def summarize_backend(nodes):
    return {k: nodes[k] for k in BACKEND_KEYS if k in nodes}
