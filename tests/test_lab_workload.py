"""blkif.lab.workload: the chunk plan, console reports and xenstore-ls output."""
import pytest

from blkif.lab import workload

DISK = 64 << 20


@pytest.mark.parametrize("seed", range(20))
def test_plan_chunks_aligned_disjoint_and_clear_of_discard(seed):
    plan = workload.make_plan(seed, DISK)
    assert len(plan) == 16
    assert {size for _, size in plan} == {4096 << i for i in range(9)}
    spans = sorted(plan + [workload.discard_range(DISK)])
    for (o1, n1), (o2, _) in zip(spans, spans[1:]):
        assert o1 + n1 <= o2
    for offset, size in plan:
        assert offset % size == 0 and offset + size <= DISK


def test_plan_is_a_function_of_the_seed():
    assert workload.make_plan(7, DISK) == workload.make_plan(7, DISK)
    assert workload.make_plan(7, DISK) != workload.make_plan(8, DISK)
    assert workload.plan_text([(0, 4096), (8192, 8192)]) == "0 4096\n8192 8192\n"


def test_plan_refuses_a_disk_too_small():
    with pytest.raises(ValueError):
        workload.make_plan(1, 4 << 20)


CONSOLE = """\
[    8.9] blkfront: xvda: flush diskcache: enabled
LAB BOOT mode=full blkfront=max_queues=2 uptime=8.35\r
LAB CHECK attach pass /dev/xvda at uptime 9.81s\r
LAB VALUE max_segments=32 nr_queues=2\r
LAB DMESG [    8.96] blkfront: xvda: persistent grants: enabled\r
LAB CHECK fs fail mke2fs: bad option\r
LAB MD5 0 3932160 131072 e1406e1f3b33536ac928ab9cf58d399b\r
LAB MD5 1 9437184 524288 5f81a791c993911af0b581b0a2f9397e xvda\r
LAB MD5 1 9437184 524288 00000000000000000000000000000000 xvdb\r
LAB DONE rc=1\r
"""


def test_parse_console():
    r = workload.parse_console(CONSOLE)
    assert r.checks == [("attach", True, "/dev/xvda at uptime 9.81s"),
                        ("fs", False, "mke2fs: bad option")]
    assert r.values == {"max_segments": "32", "nr_queues": "2"}
    assert r.md5[1] == (9437184, 524288, "5f81a791c993911af0b581b0a2f9397e")
    assert r.md5 == r.disk_md5["xvda"] and len(r.md5) == 2  # no disk named: xvda
    assert r.disk_md5["xvdb"] == {1: (9437184, 524288, "0" * 32)}
    assert r.dmesg == ["[    8.96] blkfront: xvda: persistent grants: enabled"]
    assert r.done == 1


def test_parse_console_unfinished():
    assert workload.parse_console("LAB CHECK attach pass x\n").done is None


XS_BACK = """\
/local/domain/0/backend/vbd/1/51712/frontend = "/local/domain/1/device/vbd/51712"
/local/domain/0/backend/vbd/1/51712/state = "4"
/local/domain/0/backend/vbd/1/51712/feature-max-indirect-segments = "256"
/local/domain/0/backend/vbd/1/51712/multi-queue-max-queues = "2"
"""
XS_FRONT = """\
/local/domain/1/device/vbd/51712/state = "4"
/local/domain/1/device/vbd/51712/ring-page-order = "2"
/local/domain/1/device/vbd/51712/multi-queue-num-queues = "2"
/local/domain/1/device/vbd/51712/queue-0/ring-ref0 = "8"
/local/domain/1/device/vbd/51712/queue-0/ring-ref1 = "9"
/local/domain/1/device/vbd/51712/queue-1/ring-ref0 = "10"
/local/domain/1/device/vbd/51712/queue-1/ring-ref1 = "11"
/local/domain/1/device/vbd/51712/queue-1/event-channel = "5"
"""


def test_parse_and_summarize_xenstore():
    back = workload.parse_xenstore_ls(XS_BACK, "/local/domain/0/backend/vbd/1/51712")
    assert back["frontend"] == "/local/domain/1/device/vbd/51712"
    assert workload.summarize_backend(back) == {
        "state": "4", "feature-max-indirect-segments": "256", "multi-queue-max-queues": "2"}
    front = workload.summarize_frontend(
        workload.parse_xenstore_ls(XS_FRONT, "/local/domain/1/device/vbd/51712"))
    assert front["rings"] == "queue-0:2 queue-1:2"
    assert front["ring-page-order"] == "2"


def test_single_ring_frontend_summary():
    front = workload.summarize_frontend({"state": "4", "ring-ref": "8", "event-channel": "4"})
    assert front["rings"] == "queue-0:1"
