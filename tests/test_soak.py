"""A short soak (blkif/soak.py): three VBDs under verified I/O, one more
coming and going, one guest flooding its event channel and xenstore nodes;
nothing lost, the service's descriptors back where they were, every process
stopped cleanly.  Latency and memory are judged by the full run
(docs/reliability.md): seconds of a loaded 2-core machine say little."""
import os
import struct
import subprocess
import sys

from blkif import soak
from helpers import require


def _cpu_latency():
    with open(soak.CPU_LATENCY, "rb") as f:
        return struct.unpack("i", f.read(4))[0]


def test_a_short_soak_loses_nothing_and_leaks_no_descriptors():
    report = soak.run(vbds=3, duration=12, iops=10, sample_every=2, churn_life=2, log=None)
    assert report["solo_seconds"] == 6  # by default as long as each half
    failures = report["failures"]
    assert not failures["lost"] and not failures["fds"] and not failures["process"], failures
    assert report["churn_cycles"] >= 2
    assert report["flood"]["notifies"] > 1000 and report["flood"]["xenstore_writes"] > 20
    assert report["transfers"] >= 3 * 12 * 10 * 0.5
    assert report["first_sample"]["steady_workers"] == report["last_sample"]["steady_workers"] == 3
    assert len(report["p99_ratios"]) == 3
    assert all(len(r) == len(soak.PHASES) for r in report["p99_ratios"].values())
    assert 0 < report["warmup"] < 12 - soak.COOLDOWN
    # each guest's slowest transfers, timed from the start of the run, in its windows
    for slowest in report["slowest"].values():
        assert 0 < len(slowest) <= soak.SLOWEST
        assert all(0 <= t < 12 - soak.COOLDOWN and ms > 0 for t, ms in slowest)
    assert len(report["churn_created_s"]) == report["churn_cycles"]
    assert report["cpus_awake"] == os.access(soak.CPU_LATENCY, os.W_OK)
    stolen = [s["cpu_stolen"] for s in report["samples"]]
    assert stolen == sorted(stolen) and stolen[-1] - stolen[0] < 12 * os.cpu_count()
    assert all(0 <= report["stolen"][phase] <= 1 for phase in ("calm", "flood"))


def test_the_cpus_are_held_out_of_idle_states_while_it_measures():
    """The CPU latency QoS request is 0 while held, and back as it was after."""
    require(os.access(soak.CPU_LATENCY, os.W_OK), "a writable %s (root)" % soak.CPU_LATENCY)
    before = _cpu_latency()
    assert before > 0
    with soak.cpus_awake(lambda text: None) as held:
        assert held and _cpu_latency() == 0
    assert _cpu_latency() == before


def test_a_run_too_short_to_measure_is_refused_before_it_starts():
    """Each run leaves out its first tenth and its last COOLDOWN s: a 2 s solo
    run would measure nothing and make every ratio meaningless."""
    for args, option in ((["--solo-seconds", "2"], "--solo-seconds"),
                         (["--duration", "4"], "--duration")):
        done = subprocess.run([sys.executable, "-m", "blkif.soak", *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and not done.stdout
        assert done.stderr.splitlines()[-1] == (
            "python -m blkif.soak: error: %s must be at least 5 s: its first tenth "
            "and last 2 s are not measured" % option)
