"""A short soak (blkif/soak.py): three VBDs under verified I/O, one more
coming and going, one guest flooding its event channel and xenstore nodes;
nothing lost, the service's descriptors back where they were, every process
stopped cleanly.  Latency and memory are judged by the full run
(docs/reliability.md): seconds of a loaded 2-core machine say little."""
from blkif import soak


def test_a_short_soak_loses_nothing_and_leaks_no_descriptors():
    report = soak.run(vbds=3, duration=12, iops=10, solo_seconds=3, sample_every=2,
                      churn_life=2, log=None)
    failures = report["failures"]
    assert not failures["lost"] and not failures["fds"] and not failures["process"], failures
    assert report["churn_cycles"] >= 2
    assert report["flood"]["notifies"] > 1000 and report["flood"]["xenstore_writes"] > 20
    assert report["transfers"] >= 3 * 12 * 10 * 0.5
    assert report["first_sample"]["steady_workers"] == report["last_sample"]["steady_workers"] == 3
    assert len(report["p99_ratios"]) == 3
