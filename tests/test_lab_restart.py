"""The pure parts of ``blkif lab --only restart`` (the run itself needs the lab)."""
from blkif.lab import restart


def test_states_must_stay_connected_once_connected():
    ok = "1.0 2 1\n1.2 4 3\n1.4 4 4\n1.6 4 4\n9.6 4 4\n"
    assert restart.states_verdict(ok) == ("pass", "3 samples over 8 s, all Connected")
    closed = ok + "9.8 5 4\n10.0 4 4\n"
    status, detail = restart.states_verdict(closed)
    assert status == "fail" and "backend 5 frontend 4 at 9.8" in detail
    assert restart.states_verdict("1.0 2 1\n")[0] == "fail"
    assert restart.states_verdict("garbage\n1.0 - -\n")[0] == "fail"


def test_rounds_are_counted_from_the_console():
    text = "LAB RESTART BEGIN\nLAB RESTART ROUND 1 rc=0\nnoise\nLAB RESTART ROUND 2 rc=0\n"
    assert restart.rounds_done(text) == 2


def test_the_guest_init_runs_every_round_and_checks_the_kernel_log():
    init = restart.RESTART_INIT
    assert "seq %d" % restart.ROUNDS in init and "{rounds}" not in init
    assert "LAB DONE" not in init and 'say "DONE rc=$FAILED"' in init
    assert "--verify=crc32c" in restart.FIO_ROUND and "--fdatasync=8" in restart.FIO_ROUND
