"""The ring-size calculator reproduces the indirect-descriptor design's figures."""
import json
import subprocess
import sys

import pytest

from blkif.calc import calculate, human
from blkif.errors import UsageError

KIB, MIB = 1024, 1024 * 1024


def test_one_page_ring_without_indirect():
    row = calculate("x86_64", 0)
    assert (row["raw_slots"], row["slots"]) == (36, 32)
    assert row["segments_per_request"] == 11
    assert row["bytes_per_request"] == 44 * KIB
    assert row["max_inflight_bytes"] == 32 * 44 * KIB  # ~1.4 MB
    assert human(row["max_inflight_bytes"]) == "1.4 MiB"
    assert row["indirect"] is None


@pytest.mark.parametrize(
    "segments,pages,per_request,in_flight",
    [
        (256, 1, 1 * MIB, 32 * MIB),  # Linux blkback's default
        (512, 1, 2 * MIB, 64 * MIB),  # one full indirect page
        (4096, 8, 16 * MIB, 512 * MIB),  # all 8 indirect pages
    ],
)
def test_indirect_figures(segments, pages, per_request, in_flight):
    ind = calculate("x86_64", 0, segments)["indirect"]
    assert ind == {
        "segments": segments,
        "pages_per_request": pages,
        "bytes_per_request": per_request,
        "max_inflight_bytes": in_flight,
    }


def test_x86_32_layout_has_more_raw_slots():
    row = calculate("x86_32", 0)
    assert (row["request_size"], row["response_size"]) == (108, 12)
    assert (row["raw_slots"], row["slots"]) == (37, 32)


@pytest.mark.parametrize("order,slots", [(0, 32), (1, 64), (2, 128), (3, 256), (4, 512)])
def test_slots_double_with_each_order(order, slots):
    row = calculate("arm", order)
    assert row["ring_pages"] == 1 << order
    assert row["slots"] == slots


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "blkif", "calc", *args], capture_output=True, text=True
    )


def test_cli_json_table_has_every_order():
    out = _cli("--json", "--max-indirect-segments", "256")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["ring_page_order"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["indirect"]["max_inflight_bytes"] == 32 * MIB
    assert set(rows[0]) == {
        "abi", "page_size", "ring_page_order", "ring_pages", "request_size",
        "response_size", "raw_slots", "slots", "segments_per_request",
        "bytes_per_request", "max_inflight_bytes", "indirect",
    }


def test_cli_single_order_is_one_object():
    out = _cli("--json", "--ring-page-order", "2", "--abi", "x86_32")
    assert json.loads(out.stdout)["slots"] == 128


def test_cli_text_table():
    out = _cli("--ring-page-order", "0", "--max-indirect-segments", "512")
    assert out.returncode == 0
    assert "32(36)" in out.stdout and "2 MiB" in out.stdout and "64 MiB" in out.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ring-page-order", "-1"], "ring page order -1 out of range 0..4"),
        (["--ring-page-order", "5"], "ring page order 5 out of range 0..4"),
        (["--max-indirect-segments", "4097"], "max indirect segments 4097 out of range"),
        (["--max-indirect-segments", "-3"], "max indirect segments -3 out of range"),
        (["--abi", "sparc"], "unknown ABI 'sparc'"),
        (["--ring-page-order", "x"], "invalid int value"),
    ],
)
def test_cli_bad_arguments_are_one_line_and_exit_2(args, message):
    out = _cli(*args)
    assert out.returncode == 2
    assert out.stdout == ""
    assert message in out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_importable_errors_name_the_problem():
    with pytest.raises(UsageError, match="unknown ABI"):
        calculate("mips")


def test_capacity_plan_json_sizes_a_host():
    out = _cli("--json", "--guests", "10", "--disks", "2", "--vcpus", "2", "--queues", "2",
               "--ring-page-order", "2", "--guest-memory", "256")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["negotiated"]["slots"] == 128 and plan["negotiated"]["queues"] == 2
    figures = plan["figures"]
    assert figures["guest_prealloc_bytes_per_vbd"] == 2 * 128 * 33 * 4096
    assert figures["dom0_maps_peak"] == 20 * figures["dom0_maps_peak_per_vbd"]
    assert figures["host_guest_prealloc_bytes"] == 10 * figures["guest_prealloc_bytes"]
    assert set(plan["explain"]) == set(figures) == set(plan["units"])


def test_capacity_plan_explain_names_sources():
    out = _cli("--explain", "--vcpus", "2", "--queues", "2", "--ring-page-order", "4",
               "--max-indirect-segments", "512", "--guest-memory", "512")
    assert out.returncode == 0, out.stderr
    assert "fill_grant_buffer" in out.stdout and "opt_max_maptrack_frames" in out.stdout
    assert "error: blkfront preallocates 1046 MiB of the guest's 512 MiB" in out.stdout
    assert "negotiated: ring order 4 (512 slots), 2 queue(s), 256 indirect segments" in out.stdout


@pytest.mark.parametrize("args,message", [
    (["--disks", "0"], "disks 0 out of range"),
    (["--backend", "qdisk"], "unknown backend 'qdisk'"),
    (["--latency-ms", "-1"], "latency must be positive"),
    (["--guests", "x"], "invalid int value"),
])
def test_capacity_plan_bad_arguments_are_one_line(args, message):
    out = _cli(*args)
    assert out.returncode == 2 and out.stdout == ""
    assert message in out.stderr and out.stderr.count("\n") == 1
