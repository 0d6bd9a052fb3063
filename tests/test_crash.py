"""Crash consistency (blkif/crash): the contract model clause by clause, a
short seeded run of SIGKILLs under the workload on the sim (the seed is in
any failure's message; BLKIF_CRASH_SEED replays one), and proof that the
harness sees a write missing from the real image."""
import os
import random

import pytest

from blkif.crash import DiskModel, Violation, run
from blkif.crash.harness import SECTOR, CrashRig
from blkif.crash.model import payload, sector_bytes


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


@pytest.mark.parametrize("mode", ["live", "reattach"])
def test_kills_under_the_workload_keep_the_contract(mode):
    """live: no request fails, the device stays connected; reattach
    (--no-live-restart): in-flight writes may or may not have landed."""
    seed = int(os.environ.get("BLKIF_CRASH_SEED", random.randrange(2**32)))
    summary = run(seed, 8, mode, log=None)  # a Violation's message names the seed
    assert summary["kills"] == 8 and summary["vbds"] >= 3, summary
    assert summary["writes_answered"] > 0, summary
    if mode == "live":
        assert summary["writes_unsure"] == 0, summary


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
