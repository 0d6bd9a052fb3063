"""Crash consistency (blkif/crash): the contract model clause by clause, a
short seeded run of SIGKILLs under the workload on the sim (the seed is in
any failure's message; BLKIF_CRASH_SEED replays one), the same with power
cuts on a FUSE disk with a volatile write cache, and proof that the harness
sees a write missing from the real image or a disk that lies about flushes."""
import importlib.util
import os
import random

import pytest

from blkif.crash import DiskModel, Violation, run
from blkif.crash.harness import SECTOR, CrashRig
from blkif.crash.model import payload, sector_bytes
from blkif.crash.volatile import VolatileDisk
from helpers import require


def require_fuse():
    require(importlib.util.find_spec("mfusepy") is not None, "mfusepy (pip)")
    require(os.path.exists("/dev/fuse"), "/dev/fuse")
    require(os.geteuid() == 0, "root, to mount FUSE")


def test_answered_and_unsure_writes_are_allowed_nothing_else():
    m = DiskModel(8)
    a, data_a = m.new_write(2, 2)
    m.write_answered(a, 2, 2)
    b, data_b = m.new_write(3, 2)
    m.write_unanswered(b, 3, 2)
    m.check(bytes(2 * SECTOR) + data_a + data_b[SECTOR:] + bytes(3 * SECTOR), 0, "t")
    m.check(data_a[:SECTOR] + data_b, 2, "t")  # the unsure write landed
    with pytest.raises(Violation) as lost:
        m.check(bytes(SECTOR), 2, "t")
    assert lost.value.clause == "answered write lost or stale data"


def test_a_flushed_write_missing_is_named_so():
    m = DiskModel(4)
    a, data = m.new_write(0, 1)
    m.write_answered(a, 0, 1)
    covered = m.flush_sent()
    b, _ = m.new_write(1, 1)  # answered after the flush was sent: not covered
    m.write_answered(b, 1, 1)
    m.flush_answered(covered)
    with pytest.raises(Violation) as exc:
        m.check(bytes(SECTOR), 0, "t")
    assert exc.value.clause == "flushed write lost"
    with pytest.raises(Violation) as exc:
        m.check(bytes(SECTOR), 1, "t")
    assert exc.value.clause == "answered write lost or stale data"


def test_torn_foreign_and_unsent_sectors_are_refused():
    m = DiskModel(4)
    a, data = m.new_write(0, 1)
    m.write_answered(a, 0, 1)
    for bad, clause in [(data[:100] + bytes(412), "torn or foreign sector"),
                        (sector_bytes(a, 3), "torn or foreign sector"),
                        (sector_bytes(99, 0), "write never sent or never allowed")]:
        with pytest.raises(Violation) as exc:
            m.check(bad, 0, "t")
        assert exc.value.clause == clause


def test_settle_takes_the_image_as_the_truth():
    m = DiskModel(2)
    a, data = m.new_write(0, 2)
    m.write_unanswered(a, 0, 2)
    m.settle(data[:SECTOR] + bytes(SECTOR))  # half of it landed
    m.check(data[:SECTOR] + bytes(SECTOR), 0, "t")
    with pytest.raises(Violation):
        m.check(data, 0, "t")  # the other half may not appear later


def test_a_power_cut_keeps_what_was_flushed_and_may_keep_later_writes():
    m = DiskModel(4)
    a, data_a = m.new_write(0, 2)
    m.write_answered(a, 0, 2)
    covered = m.flush_sent()
    m.flush_answered(covered)
    b, data_b = m.new_write(1, 2)
    m.write_answered(b, 1, 2)  # answered, never flushed: the cut may take it
    m.power_cut(data_a[:SECTOR] + data_b[:SECTOR] + bytes(2 * SECTOR))
    m.check(data_a[:SECTOR] + data_b[:SECTOR] + bytes(2 * SECTOR), 0, "t")
    with pytest.raises(Violation) as exc:  # what survived a cut is durable now
        m.power_cut(data_a + bytes(2 * SECTOR))
    assert exc.value.clause == "flushed write lost" and "sector 1" in str(exc.value)
    m = DiskModel(2)
    a, data_a = m.new_write(0, 2)
    m.write_answered(a, 0, 2)
    m.flush_answered(m.flush_sent())
    for bad, clause in [(bytes(2 * SECTOR), "flushed write lost"),
                        (data_a[:SECTOR] + sector_bytes(7, 1), "torn or foreign sector")]:
        with pytest.raises(Violation) as exc:
            m.power_cut(bad)
        assert exc.value.clause == clause


def test_the_volatile_disk_loses_only_what_no_sync_covered(tmp_path):
    """Through the real FUSE mount: a sync makes writes durable, a cut loses
    a seeded part of the rest, reads see the cache and then what survived."""
    require_fuse()
    with VolatileDisk(str(tmp_path / "durable"), str(tmp_path / "mnt"), 64 * SECTOR) as disk:
        fd = os.open(disk.image, os.O_RDWR)
        try:
            os.pwrite(fd, b"a" * 1000, 100)  # partial sectors, read-modify-write
            assert os.pread(fd, 1000, 100) == b"a" * 1000
            assert disk.durable()[100:1100] == bytes(1000)
            os.fdatasync(fd)
            assert disk.durable()[100:1100] == b"a" * 1000
            os.pwrite(fd, b"b" * (32 * SECTOR), 16 * SECTOR)
            disk.cut(7)
            survived = disk.durable()[16 * SECTOR:48 * SECTOR]
            kept = [survived[i:i + SECTOR] for i in range(0, len(survived), SECTOR)]
            assert set(kept) == {b"b" * SECTOR, bytes(SECTOR)}, "some lost, some kept"
            assert os.pread(fd, 32 * SECTOR, 16 * SECTOR) == survived
            counters = disk.counters()
            assert counters["syncs"] == 1 and counters["cuts"] == 1
            assert counters["sectors_lost"] == kept.count(bytes(SECTOR))
        finally:
            os.close(fd)
    assert not os.path.exists(disk.image), "unmounted"


@pytest.mark.parametrize("mode", ["live", "reattach", "powercut"])
def test_kills_under_the_workload_keep_the_contract(mode):
    """live: no request fails, the device stays connected; reattach
    (--no-live-restart): in-flight writes may or may not have landed;
    powercut: also whatever no answered flush covered may be gone."""
    if mode == "powercut":
        require_fuse()
    seed = int(os.environ.get("BLKIF_CRASH_SEED", random.randrange(2**32)))
    summary = run(seed, 8, mode, log=None)  # a Violation's message names the seed
    assert summary["kills"] == 8 and summary["vbds"] >= 3, summary
    assert summary["writes_answered"] > 0, summary
    if mode == "live":
        assert summary["writes_unsure"] == 0, summary
    if mode == "powercut":
        assert summary["sectors_lost_to_cuts"] > 0, summary


def test_power_cuts_catch_a_disk_that_lies_about_flushes():
    """The same run on a disk whose fsync does nothing must break the flush
    clause: the power-cut model can fail."""
    require_fuse()
    with pytest.raises(Violation) as exc:
        run(11, 30, "powercut", log=None, lying_disk=True)
    assert exc.value.clause == "flushed write lost", exc.value


def test_a_rig_on_a_volatile_disk_leaves_nothing_behind():
    require_fuse()
    with CrashRig(sectors=64, disk="volatile") as rig:
        rig.dev.write(0, bytes(range(256)) * 2)
        rig.dev.flush()
        where = rig.sandbox.dir
        assert os.path.ismount(os.path.join(where, "volatile"))
    assert not os.path.exists(where)


def test_the_harness_sees_a_flushed_write_missing_from_the_image():
    with CrashRig(sectors=64) as rig:
        m = DiskModel(64)
        w, data = m.new_write(8, 4)
        rig.dev.write(8 * SECTOR, data)
        m.write_answered(w, 8, 4)
        covered = m.flush_sent()
        rig.dev.flush()
        m.flush_answered(covered)
        m.check(rig.image_bytes(), 0, "the image")
        with open(rig.image, "r+b") as f:  # the store loses sector 9
            f.seek(9 * SECTOR)
            f.write(bytes(SECTOR))
        with pytest.raises(Violation) as exc:
            m.settle(rig.image_bytes())
        assert exc.value.clause == "flushed write lost" and "sector 9" in str(exc.value)
    assert payload(w, 8, 4) == data
