"""``blkif bench`` (blkif/bench.py): its report's structure and the relations
its figures must keep, never their values.  The baseline is a real fio run."""
import json
import random
import re
import subprocess
import sys

import pytest

from blkif import bench
from helpers import require_tool
from xenstore_fixtures import ROOT

CHOSEN = ["randread-4k-qd1", "randwrite-4k-qd32", "seqread-1m-direct"]


def blkif(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "blkif", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def check_side(side, block_size):
    assert side["ios"] > 0 and side["seconds"] > 0
    assert side["iops"] == pytest.approx(side["ios"] / side["seconds"], rel=0.01)
    assert side["mb_per_s"] == pytest.approx(side["iops"] * block_size / 1e6, rel=0.01)
    assert 0 < side["p50_ms"] <= side["p99_ms"]


@pytest.fixture(scope="module")
def report():
    run = blkif("bench", "--duration", "0.3", "--size", "16M", "--json",
                "--pattern", ",".join(CHOSEN[:2]), "--pattern", CHOSEN[2],
                "--pattern", CHOSEN[0])
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_each_pattern_beside_fio(report):
    assert [r["name"] for r in report["patterns"]] == CHOSEN
    assert report["size"] == 16 << 20 and report["duration"] == 0.3
    for r in report["patterns"]:
        pattern = bench.PATTERNS[r["name"]]
        assert (r["op"], r["block_size"], r["queue_depth"], r["access"], r["indirect"]) == (
            pattern.op, pattern.block_size, pattern.queue_depth, pattern.access,
            pattern.indirect)
        check_side(r["blkif"], r["block_size"])
        check_side(r["fio"], r["block_size"])
        assert r["fio"]["cpu_us_per_io"] > 0
        cpu = r["blkif"]["cpu_us_per_io"]
        assert set(cpu) == {"guest", "backend"} and cpu["guest"] > 0 and cpu["backend"] >= 0
        assert r["blkif"]["seconds"] >= 0.3 and r["fio"]["seconds"] >= 0.25
        assert r["ratio"] == pytest.approx(r["blkif"]["iops"] / r["fio"]["iops"], rel=0.01)
        if r["queue_depth"] == 1:  # through two processes and a ring, not one syscall
            assert r["blkif"]["p50_ms"] > r["fio"]["p50_ms"]
        assert r["negotiated"]["indirect_segments"] == (256 if pattern.indirect else 0)


def test_text_report_has_a_row_per_pattern(tmp_path):
    run = blkif("bench", "--duration", "0.2", "--size", "8M", "--queues", "1",
                "--pattern", "seqwrite-1m-indirect", "--workdir", str(tmp_path / "w"))
    assert run.returncode == 0, run.stderr
    header, row, negotiated, engine = run.stdout.splitlines()
    assert header.split() == ["pattern", "IOPS", "MB/s", "p50", "ms", "p99", "ms", "CPU",
                              "us/IO", "fio", "IOPS", "MB/s", "p50", "ms", "p99", "ms", "CPU",
                              "ratio"]
    assert row.split()[0] == "seqwrite-1m-indirect" and len(row.split()) == 12
    assert re.fullmatch(r"\d+\+\d+", row.split()[5])
    assert negotiated.startswith("negotiated: abi ") and "1 queue(s)" in negotiated
    assert engine.startswith("engine c; guest frontend c; fio: ioengine io_uring")
    assert "seqwrite-1m-indirect ..." in run.stderr
    assert "seqwrite-1m-indirect fio ..." in run.stderr


def test_direct_on_an_image_of_our_own_with_the_python_engine_and_frontend(tmp_path):
    """--image on a real filesystem, --direct on both sides, --engine and
    --frontend passed on."""
    image = tmp_path / "bench.img"
    run = blkif("bench", "--duration", "0.2", "--size", "8M", "--json", "--direct",
                "--image", str(image), "--engine", "python", "--frontend", "python",
                "--pattern", "randread-4k-qd32")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert (report["direct"], report["engine"], report["frontend"]) == (True, "python",
                                                                        "python")
    check_side(report["patterns"][0]["fio"], 4096)
    assert not image.exists()  # created for the run, removed after it
    image.write_bytes(b"mine")
    run = blkif("bench", "--image", str(image))
    assert run.returncode == 2 and "exists" in run.stderr and run.stderr.count("\n") == 1
    assert image.read_bytes() == b"mine"


def test_list_and_bad_pattern():
    run = blkif("bench", "--list")
    assert run.returncode == 0
    assert [line.split()[0] for line in run.stdout.splitlines()] == list(bench.PATTERNS)
    run = blkif("bench", "--pattern", "nosuch")
    assert run.returncode == 2 and "unknown pattern 'nosuch'" in run.stderr
    assert run.stderr.count("\n") == 1


def test_offsets_stay_on_the_disk_and_in_blocks():
    random_reads = bench.offsets(bench.PATTERNS["randread-4k-qd1"], 1 << 20, random.Random(1))
    seen = [next(random_reads) for _ in range(1000)]
    assert all(o % 4096 == 0 and 0 <= o <= (1 << 20) - 4096 for o in seen)
    assert len(set(seen)) > 100
    sequential = bench.offsets(bench.PATTERNS["seqread-1m-direct"], 3 << 20, random.Random(1))
    assert [next(sequential) for _ in range(5)] == [0, 1 << 20, 2 << 20, 0, 1 << 20]


def test_summary():
    got = bench.summary([0.002, 0.001, 0.004, 0.003], 2.0, 4096)
    assert got == {"ios": 4, "seconds": 2.0, "iops": 2.0, "mb_per_s": 0.01,
                   "p50_ms": 2.0, "p99_ms": 4.0}


def test_parse_patterns_keeps_order_without_repeats():
    assert bench.parse_patterns(None) == list(bench.PATTERNS)
    assert bench.parse_patterns(["seqread-1m-direct,randread-4k-qd1", "randread-4k-qd1"]) == [
        "seqread-1m-direct", "randread-4k-qd1"]


@pytest.mark.parametrize("fmt", ["qcow2", "nbd"])
def test_formats_beside_fio_on_the_same_nbd_export(fmt):
    """--format qcow2|nbd: the guest through the VBD's NBD route, fio's nbd
    engine on the same export."""
    for tool in ("qemu-img", "qemu-storage-daemon", "nbdkit"):
        require_tool(tool)
    run = blkif("bench", "--duration", "0.3", "--size", "16M", "--json", "--format", fmt,
                "--pattern", "randread-4k-qd32,seqwrite-1m-indirect")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["format"] == fmt
    for r in report["patterns"]:
        check_side(r["blkif"], r["block_size"])
        check_side(r["fio"], r["block_size"])
        assert r["negotiated"]["queues"] == 1  # one NBD connection per VBD


def test_direct_is_refused_for_nbd():
    run = blkif("bench", "--format", "nbd", "--direct")
    assert run.returncode == 2 and "--direct needs --format raw or qcow2" in run.stderr
    assert run.stderr.count("\n") == 1
