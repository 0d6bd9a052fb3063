"""The console agent (blkif.conformance.frontend.console_agent) under the
busybox shell a lab guest runs it with, on a terminal, reached through a
second pty relayed to the first as xenconsoled relays a guest's console:
the suite's commands and the agent's answers, on a real loop device
(O_DIRECT, discard) and on stand-in devices (a disk that appears and goes, an
operation that hangs, kernel messages)."""
import hashlib
import os
import pty
import signal
import subprocess
import threading
import time

import pytest

from blkif.conformance.catalogue import Failed
from blkif.conformance.frontend.console_agent import (
    AGENT,
    AgentError,
    ConsoleAgent,
    ConsoleFrontendUnderTest,
)
from blkif.conformance.frontend.guest import pattern
from helpers import loop_device, require_tool


@pytest.mark.parametrize("shell", ["busybox", "dash"])
def test_the_agent_is_plain_sh(shell):
    argv = [require_tool(shell)] + (["sh"] if shell == "busybox" else []) + ["-n"]
    proc = subprocess.run(argv, input=AGENT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def relay(a, b):
    """Copy bytes both ways between two pty masters until either closes."""
    def copy(src, dst):
        while True:
            try:
                data = os.read(src, 4096)
                os.write(dst, data)
            except OSError:
                return
            if not data:
                return
    for src, dst in ((a, b), (b, a)):
        threading.Thread(target=copy, args=(src, dst), daemon=True).start()


@pytest.fixture
def console(tmp_path):
    """start(env) runs the agent on a guest-side tty; returns a ConsoleAgent
    on the dom0-side tty of the relay."""
    busybox = require_tool("busybox")
    started = []

    def start(**env):
        guest_master, guest_tty = pty.openpty()
        dom0_master, dom0_tty = pty.openpty()
        relay(guest_master, dom0_master)
        script = tmp_path / "agent"
        script.write_text(AGENT)
        proc = subprocess.Popen([busybox, "sh", str(script)], stdin=guest_tty,
                                stdout=guest_tty, stderr=guest_tty, start_new_session=True,
                                env=dict(os.environ, AGENT_TMP=str(tmp_path), **env))
        os.close(guest_tty)
        agent = ConsoleAgent(os.ttyname(dom0_tty), open(tmp_path / "console.log", "w"))
        started.append((proc, agent, guest_master, dom0_master, dom0_tty))
        return agent

    yield start
    for proc, agent, *fds in started:
        os.killpg(proc.pid, signal.SIGKILL)  # the agent and any operation it left hanging
        proc.wait()
        agent.close()
        agent.log.close()
        for fd in fds:
            os.close(fd)


def test_io_on_a_real_block_device(console, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 << 20))
    with loop_device(image) as dev:
        name = os.path.basename(dev)
        agent = console()
        ok, sectors = agent.call("wait", name, 5)
        assert ok and int(sectors) == 8192
        assert agent.call("write", name, 1 << 20, 65536, 7) == (True, "")
        assert image.read_bytes()[1 << 20:(1 << 20) + 65536] == pattern(7, 65536)
        ok, digest = agent.call("read", name, 1 << 20, 65536)
        assert ok and digest == hashlib.sha256(pattern(7, 65536)).hexdigest()
        assert agent.call("flush", name)[0]
        assert agent.call("discard", name, 1 << 20, 4096)[0]
        assert agent.call("read", name, 1 << 20, 4096)[1] == hashlib.sha256(
            bytes(4096)).hexdigest()
        ok, error = agent.call("read", name, 8 << 20, 4096)  # past the end
        assert not ok and error == "short read"


@pytest.fixture
def standin(tmp_path):
    """AGENT_DEV and AGENT_SYS directories with disk ``xvdb`` (a 1 MiB file)."""
    dev, sys = tmp_path / "dev", tmp_path / "sys"
    dev.mkdir()
    (sys / "xvdb").mkdir(parents=True)
    (sys / "xvdb" / "size").write_text("2048\n")
    (dev / "xvdb").write_bytes(bytes(1 << 20))
    klog = tmp_path / "klog"
    klog.write_text("xen_blkfront: booted\n")
    reader = tmp_path / "read-klog"
    reader.write_text("cat %s; : > %s\n" % (klog, klog))
    return dict(AGENT_DEV=str(dev), AGENT_SYS=str(sys), AGENT_DIRECT="",
                AGENT_KLOG="sh %s" % reader), dev, sys, klog


def test_a_disk_appears_and_goes(console, standin):
    env, dev, sys, _ = standin
    agent = console(**env)

    def appear():
        (dev / "xvdc").write_bytes(bytes(4096))
        (sys / "xvdc.new").mkdir()
        (sys / "xvdc.new" / "size").write_text("8\n")
        (sys / "xvdc.new").rename(sys / "xvdc")
    threading.Timer(0.5, appear).start()
    assert agent.call("wait", "xvdc", 5) == (True, "8")
    assert agent.call("wait", "xvdd", 1) == (False, "no xvdd after 1 s")
    (sys / "xvde").mkdir()  # a disk the frontend declared dead: listed, not readable
    assert agent.call("wait", "xvde", 1) == (False, "xvde is there but cannot be read after 1 s")
    threading.Timer(0.5, lambda: (sys / "xvdc" / "size").unlink() or
                    (sys / "xvdc").rmdir()).start()
    assert agent.call("gone", "xvdc", 5) == (True, "")
    assert agent.call("gone", "xvdb", 1) == (False, "xvdb still there after 1 s")


def test_a_hung_operation_does_not_stop_the_agent(console, standin, tmp_path):
    env, dev, _, _ = standin
    os.mkfifo(dev / "xvdq")  # a read of it blocks until someone writes
    agent = console(**env)
    with pytest.raises(AgentError, match="no answer to 'read xvdq 0 4096' within 1 s"):
        agent.call("read", "xvdq", 0, 4096, timeout=1)
    started = time.monotonic()
    assert agent.call("ping", timeout=5) == (True, "")
    assert time.monotonic() - started < 5
    assert agent.call("frobnicate") == (False, "unknown command frobnicate")


def test_the_case_interface_judges_from_the_guest(console, standin):
    env, dev, _, klog = standin

    class Backend:  # what ConsoleFrontendUnderTest asks of the backend in io/alive
        pass

    agent = console(**env)
    fut = ConsoleFrontendUnderTest(Backend(), agent, "xvdb", timeout=5)
    wrote, read, bad = fut.io({"op": "write", "offset": 4096, "length": 8192, "seed": 3},
                              {"op": "read", "offset": 4096, "length": 8192},
                              {"op": "read", "offset": 1 << 20, "length": 512})
    assert wrote == {"ok": True}
    assert (dev / "xvdb").read_bytes()[4096:12288] == pattern(3, 8192)
    assert read == {"ok": True, "sha256": hashlib.sha256(pattern(3, 8192)).hexdigest()}
    assert bad["ok"] is False and bad["error"].startswith("short read (kernel: ")
    fut.alive()
    assert "xen_blkfront: booted" in fut.kernel
    klog.write_text("BUG: kernel NULL pointer dereference, address: 0000000000000008\n")
    with pytest.raises(Failed, match="the guest's kernel broke: BUG: kernel NULL"):
        fut.alive()
    os.mkfifo(dev / "xvdh")
    fut.vdev = "xvdh"
    with pytest.raises(Failed, match="the guest hangs: no answer to 'read xvdh 0 512'"):
        fut.io({"op": "read", "offset": 0, "length": 512}, timeout=1)
