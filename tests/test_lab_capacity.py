"""The lab's calculator checks: parsing Xen's grant dump, memory and grant verdicts."""
import pytest

from blkif.lab import capacity
from blkif.lab.initramfs import GUEST_INIT

BASELINE = "max_queues=2,max_ring_page_order=2,max_indirect_segments=32"

# The shape Xen 4.17's gnttab_usage_print gives (keyhandler 'g'), as it lands
# in the lab's serial log; an older dump comes first and must be ignored.
DUMP = """(XEN) gnttab_usage_print_all [ key 'g' pressed
(XEN) grant-table for remote d0 (v1)
(XEN)   1 frames (64 max), 1 maptrack frames (1024 max)
(XEN) gnttab_usage_print_all ] done
junk
(XEN) gnttab_usage_print_all [ key 'g' pressed
(XEN) grant-table for remote d0 (v1)
(XEN)   1 frames (64 max), 9 maptrack frames (1024 max)
(XEN) grant-table for remote d1 (v1)
(XEN)   17 frames (64 max), 0 maptrack frames (1024 max)
(XEN) [0x000]        0 0x1b2c3 0x00000001          0 0x01b2c3 0x19
(XEN) [0x001]        0 0x1b2c4 0x00000001          0 0x01b2c4 0x19
(XEN) [0x105]        0 0x1b2c5 0x00000002          0 0x01b2c5 0x1b
(XEN) gnttab_usage_print_all ] done
(XEN) [0x106]        0 0x1b2c6 0x00000002          0 0x01b2c6 0x1b
"""


def _host(memory=256, backend="blkback", params=BASELINE):
    return capacity.host_for(params, memory, 2, backend)


def test_parse_grant_dump_takes_the_last_one():
    dump = capacity.parse_grant_dump(DUMP)
    assert dump[0] == {"mapped": 0, "frames": 1, "max_frames": 64, "maptrack_frames": 9,
                       "max_maptrack_frames": 1024}
    assert dump[1]["frames"] == 17 and dump[1]["mapped"] == 3
    assert capacity.parse_grant_dump("no dump here") == {}


def test_grant_checks_pass_within_prediction():
    rows = capacity.grant_checks(capacity.parse_grant_dump(DUMP), 1, _host(), True)
    assert [(name, status) for name, status, _ in rows] == [
        ("grant table max", "pass"), ("grant frames", "pass"),
        ("grants mapped by dom0", "pass"), ("dom0 maptrack max", "pass")]
    assert "predicted at most 17" in rows[1][2]


@pytest.mark.parametrize("old,new,failing", [
    ("17 frames (64 max)", "18 frames (64 max)", "grant frames"),
    ("17 frames (64 max)", "17 frames (32 max)", "grant table max"),
    ("9 maptrack frames (1024 max)", "9 maptrack frames (256 max)", "dom0 maptrack max"),
])
def test_grant_checks_fail_beyond_prediction(old, new, failing):
    rows = capacity.grant_checks(capacity.parse_grant_dump(DUMP.replace(old, new)), 1,
                                 _host(), True)
    assert [name for name, status, _ in rows if status == "fail"] == [failing]


def test_more_mapped_than_blkback_keeps_fails():
    line = "(XEN) [0x001]        0 0x1b2c4 0x00000001          0 0x01b2c4 0x19\n"
    text = DUMP.replace(line, line * 2200)
    rows = dict((n, s) for n, s, _ in capacity.grant_checks(
        capacity.parse_grant_dump(text), 1, _host(), True))
    assert rows["grants mapped by dom0"] == "fail"


def test_no_guest_in_dump_fails():
    assert capacity.grant_checks({}, 5, _host(), False)[0][1] == "fail"


@pytest.mark.parametrize("drop_kb,status", [
    (34400, "pass"),  # 33.6 MiB predicted: 8448 pages plus bookkeeping
    (34400 + 5 * 1024, "pass"),
    (34400 + 7 * 1024, "fail"),
    (1100, "fail"),  # what blkfront takes without bounce buffers: not this config
])
def test_memory_check(drop_kb, status):
    values = {"memfree_before_kb": "200000", "memfree_after_kb": str(200000 - drop_kb)}
    assert capacity.memory_check(values, _host())[0] == status


def test_memory_check_without_values_fails():
    assert capacity.memory_check({}, _host())[0] == "fail"


def test_backend_guest_prediction_is_257_mib_of_pages():
    status, detail = capacity.memory_check(
        {"memfree_before_kb": "400000", "memfree_after_kb": str(400000 - 266000)},
        _host(512, "blkif", "max_queues=2,max_ring_page_order=2,max_indirect_segments=256"))
    assert status == "pass" and "predicted 261.5 MiB" in detail  # 257 MiB + bookkeeping


def test_guest_init_reports_what_capacity_reads():
    for needle in ("memfree_before_kb=", "memfree_after_kb=", "fill_kb=", "nr_requests",
                   "max_hw_sectors_kb", "iflag=direct"):
        assert needle in GUEST_INIT
    # blkfront is loaded after the other modules, between the two readings.
    assert GUEST_INIT.index("FREE0=$(memfree)") < GUEST_INIT.index('insmod "$BLKFRONT"')


def test_backend_maps_check():
    host = _host(512, "blkif", "max_queues=2,max_ring_page_order=2,max_indirect_segments=256")
    summary = {"persistent_grants": 2090, "rings_mapped": 2, "ring_page_order": 2}
    status, detail = capacity.backend_maps_check(summary, host)
    assert status == "pass" and "keeps 2098 grants mapped" in detail and "at most 2120" in detail
    assert capacity.backend_maps_check(dict(summary, persistent_grants=2113), host)[0] == "fail"
    assert capacity.backend_maps_check({}, host)[0] == "fail"
