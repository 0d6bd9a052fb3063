"""blkif.lab.control: the dom0 command protocol, with the real agent loop run by sh."""
import os
import signal
import subprocess

import pytest

from blkif.lab import control


@pytest.fixture
def agent(tmp_path):
    """The agent loop of dom0's init, run on the host against tmp_path/ctl."""
    ctl = tmp_path / "ctl"
    for sub in ("cmd", "run", "res"):
        (ctl / sub).mkdir(parents=True)
    proc = subprocess.Popen(["sh", "-c", "C=%s\n%s" % (ctl, control.AGENT_LOOP)],
                            start_new_session=True)
    yield control.Dom0(str(tmp_path), alive=lambda: proc.poll() is None, poll=0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_run_returns_status_and_output(agent):
    r = agent.run("echo hello; echo oops >&2", timeout=10)
    assert (r.rc, r.out) == (0, "hello\noops\n")
    assert agent.run("exit 3", timeout=10).rc == 3
    assert sorted(os.listdir(os.path.join(agent.ctl, "res"))) == [
        "0001.out", "0001.rc", "0002.out", "0002.rc"]


def test_command_killed_by_its_own_timeout(agent):
    r = agent.run("sleep 30", timeout=1)
    assert r.rc == 124 and r.seconds < 10


def test_host_gives_up_when_dom0_is_gone(tmp_path):
    dom0 = control.Dom0(str(tmp_path), alive=lambda: False, poll=0.01)
    dom0.reset()
    with pytest.raises(control.Dom0Error, match="QEMU exited"):
        dom0.run("true", timeout=5)


def test_host_times_out(tmp_path, monkeypatch):
    monkeypatch.setattr(control, "AGENT_SLACK", 0)
    dom0 = control.Dom0(str(tmp_path), poll=0.01)
    dom0.reset()
    with pytest.raises(control.Dom0Error, match="timed out"):
        dom0.run("true", timeout=1)


def test_reset_clears_previous_run(tmp_path):
    dom0 = control.Dom0(str(tmp_path))
    dom0.reset()
    (tmp_path / "ctl" / "res" / "0001.rc").write_text("0")
    (tmp_path / "ctl" / "ready").write_text("x")
    dom0.reset()
    assert os.listdir(tmp_path / "ctl" / "res") == []
    assert not (tmp_path / "ctl" / "ready").exists()


def test_command_script_and_init_text():
    assert control.command_script("echo hi\n", 30) == "# timeout 30\nset -u\necho hi\n"
    with pytest.raises(ValueError):
        control.command_script("true", 0)
    init = control.dom0_init("/work/lab")
    assert "W=/work/lab" in init
    assert "ln -sf /proc/self/fd/0 /dev/stdin" in init
    assert init.endswith(control.AGENT_LOOP)
