"""The pure parts of ``blkif lab --only restart`` (the run itself needs the lab)."""
from blkif.lab import restart


def test_states_must_stay_connected_once_connected():
    log = ("1.0 back 2\n1.1 front 1\n1.2 front 3\n1.4 back 4\n1.6 front 4\n"
           "5.0 back 4\n9.6 front 4\n")
    assert restart.states_verdict(log, 11.6) == (
        "pass", "2 writes of a state over 10 s after both were Connected, all 4")
    status, detail = restart.states_verdict(log + "9.8 back 5\n10.0 back 4\n", 11.6)
    assert status == "fail" and "back wrote 5 at 9.8" in detail
    assert restart.states_verdict(log + "12.0 back 6\n", 11.6)[0] == "pass"  # after fio
    assert restart.states_verdict("1.0 back 2\n1.0 front 4\n", 5)[0] == "fail"
    assert restart.states_verdict("garbage\n", 5)[0] == "fail"


def test_rounds_are_counted_from_the_console():
    text = "LAB RESTART BEGIN\nLAB RESTART ROUND 1 rc=0\nnoise\nLAB RESTART ROUND 2 rc=0\n"
    assert restart.rounds_done(text) == 2


def test_the_guest_init_runs_every_round_and_checks_the_kernel_log():
    init = restart.RESTART_INIT
    assert "seq %d" % restart.ROUNDS in init and "{rounds}" not in init
    assert "LAB DONE" not in init and 'say "DONE rc=$FAILED"' in init
    assert "--verify=crc32c" in restart.FIO_ROUND and "--fdatasync=8" in restart.FIO_ROUND


def test_the_qcow2_phase_serves_an_image_our_toolstack_names(tmp_path):
    from types import SimpleNamespace

    from blkif.lab import cli, phases
    lab = SimpleNamespace(workdir=str(tmp_path), logs=str(tmp_path / "logs"))
    raw, qcow2 = restart.RestartRun(lab), restart.RestartRun(lab, "restart-qcow2")
    assert (raw.image, raw.qcow2) == (restart.IMAGE, False)
    assert (qcow2.image, qcow2.qcow2, qcow2.phase) == (restart.QCOW2_IMAGE, True,
                                                      "restart-qcow2")
    assert qcow2.log.endswith("serve-restart-qcow2.log")
    assert "restart-qcow2" in phases.OPTIONAL_PHASES
    assert cli.parse_only("restart-qcow2") >= {"boot", "dom0", "restart-qcow2"}
    body = restart.DESTROY_UNKNOWN.format(name="g", python="py", domid=3, vdev="xvda",
                                          back="/local/domain/0/backend/vbd/3")
    lines = body.splitlines()
    assert lines[0] == "py -m blkif vbd destroy --domid 3 --vdev xvda"
    assert lines[-1] == "xl destroy g"  # after the worker let go of the guest's grants
