"""The lab's report: one row per check, negotiated values, failure context.

A row is (phase, check, status, detail, seconds) with status pass, fail or
skip.  The run passes when no row failed and at least one row passed.
``format_table`` prints the rows, then the negotiated xenstore values per
side; ``as_json`` is the same as one object (``--json``).
"""
import json
from dataclasses import asdict, dataclass, field

STATUSES = ("pass", "fail", "skip")


@dataclass
class Row:
    phase: str
    check: str
    status: str
    detail: str = ""
    seconds: float = None

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError("status must be one of %s, not %r" % (STATUSES, self.status))


@dataclass
class Report:
    rows: list = field(default_factory=list)
    negotiated: dict = field(default_factory=dict)  # "phase side" -> {key: value}
    failure: dict = None  # step, serial_tail, guest_tail
    seconds: float = None

    def add(self, phase, check, status, detail="", seconds=None):
        row = Row(phase, check, status, detail, seconds)
        self.rows.append(row)
        return row

    @property
    def ok(self):
        statuses = [r.status for r in self.rows]
        return "fail" not in statuses and "pass" in statuses

    def as_json(self):
        return json.dumps(
            {
                "ok": self.ok,
                "seconds": _round(self.seconds),
                "rows": [dict(asdict(r), seconds=_round(r.seconds)) for r in self.rows],
                "negotiated": self.negotiated,
                "failure": self.failure,
            },
            indent=2,
        )


def _round(seconds):
    return None if seconds is None else round(seconds, 1)


def _secs(seconds):
    return "" if seconds is None else "%.1fs" % seconds


def format_table(report, width=100):
    """The report as text: the checks table, then negotiated values."""
    header = ("phase", "check", "result", "time", "details")
    lines = [header] + [
        (r.phase, r.check, r.status.upper(), _secs(r.seconds), r.detail) for r in report.rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    out = []
    for line in lines:
        cells = [line[0].ljust(widths[0]), line[1].ljust(widths[1]),
                 line[2].ljust(widths[2]), line[3].rjust(widths[3])]
        detail = line[4]
        if len(detail) > width:
            detail = detail[:width - 3] + "..."
        out.append("  ".join(cells + [detail]).rstrip())
    for side, values in report.negotiated.items():
        out.append("")
        out.append("%s:" % side)
        out.extend("  %s = %s" % (k, v) for k, v in values.items())
    verdict = "PASS" if report.ok else "FAIL"
    total = " in %s" % _secs(report.seconds) if report.seconds is not None else ""
    out.append("")
    out.append("lab: %s%s" % (verdict, total))
    return "\n".join(out)


def format_failure(failure, lines=30):
    """The failing step and the console tails, for stderr."""
    if not failure:
        return ""
    out = ["lab: FAILED at step: %s" % failure["step"]]
    for key, title in (("serial_tail", "Xen/dom0 console (tail)"),
                       ("guest_tail", "guest console (tail)"),
                       ("dom0_output", "dom0 command output (tail)")):
        text = failure.get(key)
        if text:
            tail = [l for l in text.replace("\r", "").splitlines() if l.strip()][-lines:]
            out.append("---- %s ----" % title)
            out.extend(tail)
    return "\n".join(out)
