"""blkif.lab.report: rows, verdict, table and JSON."""
import json

import pytest

from blkif.lab.report import Report, Row, format_failure, format_table


def test_verdict():
    r = Report()
    assert not r.ok  # nothing passed
    r.add("boot", "xen", "pass", "up", 13.8)
    r.add("backend", "our backend", "skip", "not yet available")
    assert r.ok
    r.add("baseline", "guest fs", "fail", "e2fsck")
    assert not r.ok


def test_row_status_checked():
    with pytest.raises(ValueError):
        Row("boot", "x", "maybe")


def test_table_and_json():
    r = Report()
    r.add("boot", "xen+dom0", "pass", "agent up", 13.84)
    r.add("baseline", "guest fs", "fail", "x" * 300)
    r.negotiated["baseline backend"] = {"state": "4"}
    r.seconds = 99.0
    text = format_table(r)
    lines = text.splitlines()
    assert lines[0].split() == ["phase", "check", "result", "time", "details"]
    assert "PASS" in lines[1] and "13.8s" in lines[1]
    assert lines[2].endswith("...") and len(lines[2]) < 200
    assert "baseline backend:" in text and "  state = 4" in text
    assert text.endswith("lab: FAIL in 99.0s")
    data = json.loads(r.as_json())
    assert data["ok"] is False
    assert data["rows"][0] == {"phase": "boot", "check": "xen+dom0", "status": "pass",
                               "detail": "agent up", "seconds": 13.8}
    assert data["negotiated"] == {"baseline backend": {"state": "4"}}


def test_failure_tails():
    text = format_failure({"step": "baseline: guest", "serial_tail": "a\r\n\r\nb\r\n",
                           "guest_tail": "\n".join("g%d" % i for i in range(50))}, lines=3)
    assert text.splitlines() == [
        "lab: FAILED at step: baseline: guest",
        "---- Xen/dom0 console (tail) ----", "a", "b",
        "---- guest console (tail) ----", "g47", "g48", "g49",
    ]
    assert format_failure(None) == ""
