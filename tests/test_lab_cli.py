"""blkif.lab.cli and the pure parts of blkif.lab.phases."""
import hashlib

import pytest

from blkif.errors import UsageError
from blkif.lab import cli, phases, workload

NO_PERF = dict(perf=False, perf_configs=None, perf_jobs=None, perf_backends=None)


def test_parse_only():
    assert cli.parse_only(None) == set(phases.PHASES)
    assert cli.parse_only("boot") == {"boot"}
    assert cli.parse_only("baseline") == {"boot", "dom0", "baseline"}
    with pytest.raises(UsageError, match="nope"):
        cli.parse_only("baseline,nope")


def test_missing_packages():
    present = {"/usr/bin/qemu-system-x86_64", "/bin/busybox"}
    missing = cli.missing_packages(exists=present.__contains__, installed=lambda p: True)
    assert "qemu-system-x86" not in missing and "busybox-static" not in missing
    assert "xen-hypervisor-4.17-amd64" in missing and "linux-image-amd64" not in missing


def test_lab_is_a_blkif_command():
    from blkif.cli import build_parser

    args = build_parser().parse_args(["lab", "--only", "boot", "--timeout", "60"])
    assert (args.only, args.timeout, args.keep, args.json) == ("boot", 60, False, False)


def test_xl_config():
    text = phases.xl_config("lab-baseline-1", "/boot/vmlinuz", "/w/guest.cpio",
                            "phy:/dev/loop0,xvda,w", phases.guest_extra("full"))
    assert 'name = "lab-baseline-1"\n' in text
    assert 'type = "pv"\n' in text
    assert 'disk = ["phy:/dev/loop0,xvda,w"]\n' in text
    assert 'extra = "console=hvc0 quiet labmode=full labblk=max_queues=2,' in text


def test_backend_disk_spec():
    spec = phases.backend_disk_spec("/w/disks/b.img", "/w/hotplug-connected.sh")
    assert spec == ("format=raw,vdev=xvda,access=rw,backendtype=phy,"
                    "script=/w/hotplug-connected.sh,target=/w/disks/b.img")
    assert 'xenstore-write "$XENBUS_PATH/hotplug-status" connected' in phases.HOTPLUG_SCRIPT
    assert phases.serve_argv("/p/python") == (
        "/p/python -m blkif -v serve --platform xen --state-dir /run/blkif")
    assert phases.stats_argv("/p/python") == "/p/python -m blkif stats --state-dir /run/blkif --json"


def test_compare_md5():
    a = workload.ConsoleReport(md5={0: (0, 4096, "x"), 1: (8192, 4096, "y")})
    b = workload.ConsoleReport(md5={0: (0, 4096, "x"), 1: (8192, 4096, "z")})
    assert phases.compare_md5(a, a)[0] == "pass"
    assert phases.compare_md5(a, b) == ("fail", "1 of 2 chunks differ (first: 1)")
    assert phases.compare_md5(workload.ConsoleReport(), a)[0] == "fail"


def test_image_matches(tmp_path):
    image = tmp_path / "disk.img"
    data = bytes(range(256)) * 64
    image.write_bytes(data)
    good = {0: (4096, 4096, hashlib.md5(data[4096:8192]).hexdigest())}
    assert phases.image_matches(str(image), good)[0] == "pass"
    bad = {0: (0, 4096, hashlib.md5(b"x").hexdigest())}
    assert phases.image_matches(str(image), bad)[0] == "fail"
    image.write_bytes(data[:8192] + bytes(8192))
    assert phases.image_matches(str(image), good, zeroed=(8192, 8192))[0] == "pass"
    assert phases.image_matches(str(image), good, zeroed=(4096, 8192))[0] == "fail"


def _stats(workers=(), finished=(), vbds=()):
    return {"service": {"workers": list(workers), "finished": list(finished)},
            "vbds": list(vbds)}


def _vbd(domid=3, rings=2, **counters):
    c = dict(requests=260, indirect=67, persistent_grants=128, mapped_grants=900, errors=0,
             ops={"read": 177, "write": 57, "flush_diskcache": 22, "discard": 3})
    c.update(counters)
    return {"domid": domid, "devid": 51712, "state": "Connected", "rings_mapped": rings,
            "channels_bound": rings, "counters": c,
            "negotiated": {"queues": 2, "ring_page_order": 2, "persistent": True}}


def test_backend_in_use_needs_every_feature_used():
    status, detail = phases.backend_in_use(_stats(vbds=[_vbd()]), 3, 2)
    assert status == "pass" and "persistent grants 128, 900 mapped" in detail
    assert "67 indirect" in detail
    assert phases.backend_in_use(_stats(vbds=[_vbd(mapped_grants=0)]), 3, 2)[0] == "fail"
    assert phases.backend_in_use(_stats(vbds=[_vbd(indirect=0)]), 3, 2)[0] == "fail"
    assert phases.backend_in_use(_stats(vbds=[_vbd(rings=1)]), 3, 2)[0] == "fail"
    assert phases.backend_in_use(_stats(vbds=[_vbd(errors=1)]), 3, 2)[0] == "fail"
    assert phases.backend_in_use(_stats(), 3, 2)[0] == "fail"
    summary = phases.stats_summary(_stats(vbds=[_vbd()]), 3)
    assert summary["rings_mapped"] == 2 and summary["op_discard"] == 3


def test_backend_released_waits_for_the_worker_and_finds_leaks():
    worker = {"domid": 3, "devid": 51712, "status": "running"}
    final = {"domid": 3, "devid": 51712, "exit": "exit status 0", "rings_mapped": 0,
             "channels_bound": 0, "persistent_grants": 0}
    assert phases.backend_released(_stats(workers=[worker]), 3)[2] is False
    status, detail, settled = phases.backend_released(_stats(finished=[final]), 3)
    assert (status, settled) == ("pass", True) and "exit status 0" in detail
    leak = dict(final, channels_bound=1)
    assert phases.backend_released(_stats(finished=[leak]), 3)[0] == "fail"
    left = _vbd(rings=2)
    assert phases.backend_released(_stats(finished=[final], vbds=[left]), 3)[0] == "fail"
    assert phases.backend_released(_stats(), 3)[0] == "fail"  # no final counters at all


def test_frontend_check_output_gives_both_sides():
    back, front = phases.FRONTEND_BACKEND, phases.FRONTEND_FRONTEND
    out = "\n".join([
        "LAB CHECK attach pass ok",
        "LAB XENSTORE-BEGIN",
        '%s/feature-persistent = "1"' % back,
        '%s/max-ring-page-order = "4"' % back,
        '%s/state = "4"' % back,
        '%s/queue-0/ring-ref0 = "8"' % front,
        '%s/queue-1/ring-ref0 = "9"' % front,
        '%s/multi-queue-num-queues = "2"' % front,
        "LAB XENSTORE-END",
        "summary line",
    ])
    b, f = phases.frontend_check_nodes(out)
    assert b == {"state": "4", "feature-persistent": "1", "max-ring-page-order": "4"}
    assert f == {"multi-queue-num-queues": "2", "rings": "queue-0:1 queue-1:1"}


def test_host_children():
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert any(c.startswith("%d " % child.pid) for c in phases.host_children())
    finally:
        child.kill()
        child.wait()
    assert not any(c.startswith("%d " % child.pid) for c in phases.host_children())


def test_availability_messages_say_not_yet_available():
    for why in (phases.available_backend(), phases.available_frontend()):
        assert why is None or why.startswith("not yet available")


def test_host_loops(tmp_path):
    for name, backing in (("loop0", "/work/lab/disks/a.img"), ("loop1", "/elsewhere/b.img"),
                          ("loop2", "/work/lab2/c.img")):
        (tmp_path / name / "loop").mkdir(parents=True)
        (tmp_path / name / "loop" / "backing_file").write_text(backing + "\n")
    (tmp_path / "vda").mkdir()
    assert phases.host_loops("/work/lab", str(tmp_path)) == ["/dev/loop0 (/work/lab/disks/a.img)"]


def test_budget_names_the_step_that_ran_out(tmp_path):
    lab = phases.Lab(str(tmp_path), None, timeout=0)
    with pytest.raises(phases.StepFailed) as info:
        lab.budget(60, "baseline: guest lab-baseline-1")
    assert info.value.step == "baseline: guest lab-baseline-1"
    assert phases.Lab(str(tmp_path), None, timeout=600).budget(60, "x") == 60


def test_one_run_per_workdir(tmp_path):
    import argparse
    import fcntl

    from blkif.errors import BlkifError

    with open(tmp_path / "lab.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        args = argparse.Namespace(workdir=str(tmp_path), timeout=60, only="boot", seed=1,
                                  keep=False, json=False, conformance_runs=None, **NO_PERF)
        with pytest.raises(BlkifError, match="another blkif lab"):
            cli.run(args)


def test_conformance_is_a_phase_only_on_request():
    assert "conformance" not in cli.parse_only(None)
    assert cli.parse_only("conformance") == {"boot", "dom0", "conformance"}


@pytest.mark.parametrize("only, runs, error", [
    ("conformance", "blkback,blkfrnt", "unknown conformance run blkfrnt (choose from "
                                       "blkback,qdisk,serve,frontend,blkfront)"),
    ("baseline", "blkfront", "--conformance-runs goes with --only conformance"),
])
def test_conformance_runs_are_checked_before_anything_starts(tmp_path, only, runs, error):
    import argparse

    args = argparse.Namespace(workdir=str(tmp_path / "w"), timeout=60, only=only, seed=1,
                              keep=False, json=False, conformance_runs=runs, **NO_PERF)
    with pytest.raises(UsageError) as info:
        cli.run(args)
    assert str(info.value) == error
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("perf, picks, error", [
    (False, {"perf_jobs": "read-1m-qd8"}, "--perf-jobs goes with --perf"),
    (True, {"perf_backends": "blkif,tapdisk"}, "unknown backend tapdisk (choose from "
                                               "blkback,qdisk,blkif)"),
])
def test_perf_choices_are_checked_before_anything_starts(tmp_path, perf, picks, error):
    import argparse

    args = argparse.Namespace(workdir=str(tmp_path / "w"), timeout=60, only=None, seed=1,
                              keep=False, json=False, conformance_runs=None,
                              **dict(NO_PERF, perf=perf, **picks))
    with pytest.raises(UsageError) as info:
        cli.run(args)
    assert str(info.value) == error
    assert not (tmp_path / "w").exists()


def test_conformance_column_shows_info_values():
    doc = {"results": [
        {"id": "xenbus-3", "level": "INFO", "status": "PASS", "observed": "native"},
        {"id": "req-16", "level": "MUST", "status": "FAIL", "observed": "EOPNOTSUPP"},
        {"id": "req-1", "level": "MUST", "status": "PASS", "observed": ""},
    ]}
    assert phases.conformance_column(doc) == {"xenbus-3": "native", "req-16": "FAIL",
                                              "req-1": "PASS"}


def test_guest_reports_a_resize_that_dom0_recognises(tmp_path):
    """The guest init's idle loop, run in a real sh against a stand-in for
    /sys/block/xvda/size: a new size appears on its console, and dom0's
    check accepts only the size it asked for."""
    import re
    import subprocess
    import time

    from blkif.lab.initramfs import GUEST_INIT

    idle = re.search(r"^idle\(\) \{\n.*?^\}\n", GUEST_INIT, re.S | re.M).group(0)
    for disk in ("xvda", "xvdb"):
        (tmp_path / disk).mkdir()
        (tmp_path / disk / "size").write_text("131072\n")
    size = tmp_path / "xvdb" / "size"
    script = ('say() { echo "LAB $*"; }\nDISKS="xvda xvdb"\n'
              + idle.replace("/sys/block/", str(tmp_path) + "/") + "idle\n")
    proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.8)
        size.write_text("139264\n")
        time.sleep(1.5)
    finally:
        proc.kill()
    console = proc.communicate()[0]
    assert console == "LAB VALUE resized_xvdb=139264\n"
    assert phases.resize_seen(console, 139264, "xvdb")[0] == "pass"
    assert phases.resize_seen(console, 140000, "xvdb") == (
        "fail", "the guest's /sys/block/xvdb/size became 139264, want 140000")
    assert phases.resize_seen(console, 139264)[1].endswith(
        "/sys/block/xvda/size never changed, want 139264")
