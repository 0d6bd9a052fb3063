"""``blkif lab --perf`` (blkif/lab/perf.py): the guest's console parsed, fio's
figures taken from real fio JSON, the ratio table, the disk specs."""
import shutil
import subprocess

import pytest

from blkif.errors import UsageError
from blkif.lab import perf
from helpers import require_tool


@pytest.fixture(scope="module")
def fio_json(tmp_path_factory):
    """Real fio output: a short 4 KiB random read job on a file."""
    require_tool("fio")
    path = tmp_path_factory.mktemp("fio") / "disk"
    path.write_bytes(b"\1" * (4 << 20))
    run = subprocess.run([shutil.which("fio"), "--name=randread-4k-qd32", "--filename=%s" % path,
                          "--rw=randread", "--bs=4k", "--iodepth=4", "--ioengine=psync",
                          "--time_based", "--runtime=0.3", "--lat_percentiles=1",
                          "--output-format=json"], capture_output=True, text=True, check=True)
    return run.stdout


def test_fio_json_between_markers_among_console_noise(fio_json):
    console = ("LAB VALUE max_segments=11\n[   3.1] random kernel line\n"
               "LAB FIO randread-4k-qd32 BEGIN\r\n" + fio_json.replace("\n", "\r\n")
               + "LAB FIO randread-4k-qd32 END rc=0\r\n"
               "LAB FIO write-1m-qd8 BEGIN\nfio: error\nLAB FIO write-1m-qd8 END rc=1\n")
    jobs = perf.parse_fio_console(console)
    assert set(jobs) == {"randread-4k-qd32", "write-1m-qd8"}
    assert jobs["write-1m-qd8"] == {"error": "fio rc=1, no JSON"}
    figures = perf.job_figures(jobs["randread-4k-qd32"])
    assert figures["iops"] > 0 and figures["mb_per_s"] == pytest.approx(
        figures["iops"] * 4096 / 1e6, rel=0.05)
    assert 0 < figures["p50_ms"] and 0 < figures["mean_ms"]


def test_ratio_table_judges_each_job_on_its_figure():
    def figures(iops, mb, mean):
        return {job: {"iops": iops, "mb_per_s": mb, "mean_ms": mean, "p50_ms": mean}
                for job, _ in perf.JOBS}
    results = {"B": {"blkback": figures(1000, 200, 2.0), "qdisk": figures(500, 50, 4.0),
                     "blkif": figures(900, 220, 2.4)}, "A": {"blkback": figures(1, 1, 1)}}
    table = perf.ratio_table(results)
    row = table["B"]["randread-4k-qd32"]
    assert (row["figure"], row["ours/blkback"], row["ours/qdisk"]) == ("iops", 0.9, 1.8)
    assert table["B"]["read-1m-qd8"]["ours/blkback"] == 1.1
    assert table["B"]["randread-4k-qd1"]["figure"] == "mean_ms"
    assert table["B"]["randread-4k-qd1"]["ours/blkback"] == 1.2  # latency: lower is better
    assert table["A"]["write-1m-qd8"]["ours/blkback"] is None  # no run of ours
    text = perf.format_ratio_table(table)
    assert "config B (max_indirect_segments=512,max_ring_page_order=4)" in text
    assert len(text.splitlines()) == 2 * (2 + len(perf.JOBS))


@pytest.mark.parametrize("backends", [perf.BACKENDS, ("blkback", "blkif")])
def test_each_backend_takes_the_same_average_place_in_a_boot(backends):
    """A guest may run slower the later it comes in a boot: the mirrored
    order gives every backend two turns whose places add up to the same."""
    order = perf.turns(backends)
    places = {b: [i for i, t in enumerate(order) if t == b] for b in backends}
    assert all(len(p) == 2 for p in places.values()) and len(order) == 2 * len(backends)
    assert len({sum(p) for p in places.values()}) == 1


def test_a_run_can_be_cut_down_by_name():
    configs, jobs, backends = perf.selection("B", "write-1m-qd8,read-1m-qd8", "blkif,blkback")
    assert list(configs) == ["B"] and configs["B"] == perf.CONFIGS["B"]
    assert [j for j, _ in jobs] == ["read-1m-qd8", "write-1m-qd8"]  # in the table's order
    assert backends == ("blkback", "blkif")
    assert perf.selection() == (perf.CONFIGS, perf.JOBS, perf.BACKENDS)
    assert perf.jobs_text(jobs).splitlines()[0].startswith("read-1m-qd8 --rw=read ")
    for bad, message in [(("C", None, None), "unknown configuration C (choose from A,B)"),
                         ((None, "read-2m", None), "unknown job read-2m"),
                         ((None, None, "tapdisk,blkif"), "unknown backend tapdisk")]:
        with pytest.raises(UsageError) as exc:
            perf.selection(*bad)
        assert str(exc.value).startswith(message)


def test_a_cut_down_table_leaves_out_what_did_not_run():
    jobs = perf.selection(jobs="read-1m-qd8")[1]
    results = {"B": {"blkback": {"read-1m-qd8": {"mb_per_s": 80.0}},
                     "blkif": {"read-1m-qd8": {"mb_per_s": 60.0}}}}
    table = perf.ratio_table(results, jobs)
    assert list(table["B"]) == ["read-1m-qd8"]
    row = table["B"]["read-1m-qd8"]
    assert (row["qdisk"], row["ours/blkback"], row["ours/qdisk"]) == (None, 0.75, None)
    assert len(perf.format_ratio_table(table).splitlines()) == 3


def test_a_backends_figures_are_the_mean_of_its_turns():
    first = {"read-1m-qd8": {"mb_per_s": 100.0, "iops": 95.0}, "write-1m-qd8": {"mb_per_s": 1.0}}
    second = {"read-1m-qd8": {"mb_per_s": 50.0, "iops": 48.0}}
    assert perf.mean_figures([first, second]) == {
        "read-1m-qd8": {"mb_per_s": 75.0, "iops": 71.5}}  # write failed in one turn: left out
    assert perf.mean_figures([]) == {}


def test_disk_specs_and_jobs():
    assert perf.disk_spec("blkback", "/dev/loop0", "/s") == "phy:/dev/loop0,xvda,w"
    assert "backendtype=qdisk" in perf.disk_spec("qdisk", "/dev/loop0", "/s")
    assert "script=/s" in perf.disk_spec("blkif", "/dev/loop0", "/s")
    assert [line.split()[0] for line in perf.jobs_text().splitlines()] == [
        job for job, _ in perf.JOBS]
