"""blkif.lab.cli and the pure parts of blkif.lab.phases."""
import hashlib

import pytest

from blkif.errors import UsageError
from blkif.lab import cli, phases, workload


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
    assert phases.serve_argv("/p/python") == "/p/python -m blkif serve --platform xen"


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
                                  keep=False, json=False)
        with pytest.raises(BlkifError, match="another blkif lab"):
            cli.run(args)
