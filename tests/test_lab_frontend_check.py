"""blkif.lab.frontend_check without Xen: its pure parts, the xenstore dump the
lab parses, and that a run which cannot reach Xen fails with one check line.
The check itself runs in the QEMU lab (``blkif lab --only frontend``)."""
import os
import stat

import pytest

from blkif.lab import frontend_check as fc
from blkif.lab import phases, workload
from blkif.toolstack import backend_path, create, frontend_path
from xenstore import Xenstore
from xenstore_fixtures import xenstored  # noqa: F401

OFFER = {"feature-max-indirect-segments": "256", "max-ring-page-order": "4",
         "multi-queue-max-queues": "2", "feature-persistent": "1",
         "feature-flush-cache": "1", "feature-discard": "1"}
USED = {"indirect_segments": 256, "ring_page_order": 4, "queues": 2, "persistent": True,
        "flush": True, "discard": True}


def test_takes_the_offer():
    assert fc.takes_the_offer(USED, OFFER) == []
    assert fc.takes_the_offer(dict(USED, persistent=False), OFFER) == [
        "we use persistent False, offered True"]
    small = dict(OFFER, **{"multi-queue-max-queues": "1"})
    assert "offers too little" in fc.takes_the_offer(dict(USED, queues=1), small)[0]


def test_device_number_is_hex_major_minor(monkeypatch):
    with pytest.raises(ValueError, match="not a block device"):
        fc.device_number("/dev/null")
    fake = os.stat_result((stat.S_IFBLK | 0o660, 0, 0, 1, 0, 0, 0, 0, 0, 0))
    monkeypatch.setattr(fc.os, "stat", lambda path: fake)
    monkeypatch.setattr(fake.__class__, "st_rdev", property(lambda self: os.makedev(259, 17)),
                        raising=False)
    assert fc.device_number("/dev/nvme0n1p1") == "103:11"


def test_gntalloc_limit_raised_only_when_lower(tmp_path):
    limit = tmp_path / "limit"
    limit.write_text("1024\n")
    assert fc.raise_gntalloc_limit(str(limit), 4096) == 4096
    assert limit.read_text() == "4096"
    assert fc.raise_gntalloc_limit(str(limit), 2048) == 4096
    assert fc.raise_gntalloc_limit(str(tmp_path / "missing"), 10) is None


def test_dump_of_both_directories_reads_back_as_the_lab_parses_it(xenstored):  # noqa: F811
    with Xenstore.open(xenstored) as xs:
        create(xs, 0, "xvda", "/dev/null", "w", 0)  # dom0 both ends, as the check does
        back, front = backend_path(0, 0, 51712), frontend_path(0, 51712)
        for key, value in OFFER.items():
            xs.write("%s/%s" % (back, key), value)
        for key, value in (("queue-0/ring-ref0", "8"), ("queue-1/ring-ref0", "9"),
                           ("multi-queue-num-queues", "2"), ("feature-persistent", "1")):
            xs.write("%s/%s" % (front, key), value)
        nodes = fc.dump_dir(xs, back)
        nodes.update(fc.dump_dir(xs, front))
        assert fc.dump_dir(xs, back + "/nope") == {}
    text = fc.xenstore_ls(nodes)
    assert back == phases.FRONTEND_BACKEND and front == phases.FRONTEND_FRONTEND
    b, f = phases.frontend_check_nodes("LAB XENSTORE-BEGIN\n%sLAB XENSTORE-END\n" % text)
    assert b["feature-max-indirect-segments"] == "256" and b["state"] == "1"
    assert f["rings"] == "queue-0:1 queue-1:1" and f["feature-persistent"] == "1"
    line = fc.summary(b, f)
    assert "indirect 256" in line and "queues 2" in line


def test_checks_print_what_parse_console_reads(capsys):
    checks = fc.Checks()
    checks.check("fs", True, "fine")
    checks.check("discard", False, "not zero")
    report = workload.parse_console(capsys.readouterr().out)
    assert report.checks == [("fs", True, "fine"), ("discard", False, "not zero")]
    assert checks.failed == ["discard"]


def test_a_run_without_xen_fails_with_one_check(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XENSTORED_PATH", str(tmp_path / "no-xenstored"))
    monkeypatch.setattr(fc, "raise_gntalloc_limit", lambda: None)
    assert fc.main(["--target", "/dev/null"]) == 1
    out = capsys.readouterr().out
    assert "LAB CHECK error fail" in out
    assert out.strip().splitlines()[-1].startswith("frontend check failed")
