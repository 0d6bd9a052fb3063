"""``blkif demo`` and the sandbox under it (blkif/demo.py, blkif/sandbox.py).

End to end, as a user runs it: the command in a subprocess, its JSON and
text reports, what it negotiates for the options given, an interrupt in the
middle (everything stopped, nothing left behind).  Then the pieces: a guest
job that must fail verification, a service that cannot start, the round
planner, the progress display.
"""
import io
import json
import os
import random
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from blkif import demo, sandbox
from xenstore_fixtures import ROOT

RUNNING_IN = re.compile(r"running in (\S+)")


def blkif(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "blkif", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def processes_using(path):
    """Pids whose command line mentions ``path``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                if path.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def workdir_of(stderr):
    return RUNNING_IN.search(stderr).group(1)


def assert_nothing_left(stderr):
    path = workdir_of(stderr)
    assert not os.path.exists(path), "working directory left behind"
    assert not processes_using(path), "processes left behind"


def test_demo_json_verifies_and_cleans_up():
    run = blkif("demo", "--duration", "0.5", "--size", "8M", "--seed", "7", "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["ok"] and report["seed"] == 7 and report["size"] == 8 << 20
    n = report["negotiated"]
    assert n["sectors"] * n["sector_size"] == 8 << 20
    assert n["queues"] >= 1 and n["ring_pages"] == 1 << n["ring_page_order"]
    assert n["indirect_segments"] == 256 and n["persistent"] and n["flush"]
    assert "discard" in n  # offered where the image's filesystem punches holes
    w = report["workload"]
    assert w["reads"] and w["writes"] and w["rounds"] and w["seconds"] >= 0.5
    transfers = w["reads"] + w["writes"] + w["discards"]
    assert report["iops"] == pytest.approx(transfers / w["seconds"], rel=0.01)
    assert report["mb_per_s"] == pytest.approx(
        report["read_mb_per_s"] + report["write_mb_per_s"], abs=0.02)
    # the first and the last read of the whole disk, plus every read between
    assert report["verified_bytes"] >= 2 * (8 << 20) + w["bytes_read"]
    assert report["shutdown"] == {"guest-1": 0, "serve": 0, "hypervisor": 0, "xenstored": 0}
    assert "reading the disk ..." in run.stderr and "verified I/O ..." in run.stderr
    assert_nothing_left(run.stderr)


def test_demo_options_are_negotiated_and_reported(tmp_path):
    work = tmp_path / "work"
    run = blkif("demo", "--duration", "0.3", "--size", "4M", "--queues", "1",
                "--ring-page-order", "0", "--indirect", "0", "--no-persistent",
                "--abi", "x86_32", "--inflight", "8", "--workdir", str(work), "-q")
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    lines = {k: v.strip() for k, v in (line.split(":", 1) for line in run.stdout.splitlines())}
    assert lines["negotiated"].split() == [
        "abi", "x86_32", "(x86_32-abi),", "1", "queue(s)", "of", "1", "ring", "page(s),",
        "indirect", "segments", "none", "(direct", "only),", "persistent", "grants", "off"]
    assert re.fullmatch(r"\d+ IOPS, [\d.]+ MB/s \(read [\d.]+, write [\d.]+\)",
                        lines["speed"])
    assert lines["verified"].startswith("every byte")
    assert "guest-1 ok, serve ok, hypervisor ok, xenstored ok" in lines["shutdown"]
    # a working directory of the caller's stays, with the logs in it
    assert {"serve.log", "guest-1.log", "disk.img"} <= set(os.listdir(work))
    assert "x86_32-abi" in (work / "serve.log").read_text()  # the worker's own account
    assert not processes_using(str(work))


def test_demo_interrupted_stops_everything():
    # Ctrl-C as a terminal sends it: SIGINT's default action, even when this
    # suite runs as a background job (a shell without job control starts
    # those with SIGINT ignored, which a child inherits and Python honours).
    proc = subprocess.Popen([sys.executable, "-m", "blkif", "demo", "--duration", "60",
                             "--size", "8M"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err = ""
    while "verified I/O" not in err:  # the workload is running
        line = proc.stderr.readline()
        assert line, "demo ended early: " + err
        err += line
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    out, rest = proc.communicate(timeout=30)
    err += rest
    assert proc.returncode == 130, err
    assert time.monotonic() - start < 10
    assert err.strip().splitlines()[-1] == "blkif: interrupted"
    assert out == ""
    assert_nothing_left(err)


@pytest.fixture
def interruption():
    """A guest's Interruption, as the handler of SIGUSR1 in this process."""
    stop = sandbox.Interruption()
    previous = signal.signal(signal.SIGUSR1, stop.handler)
    yield stop
    signal.signal(signal.SIGUSR1, previous)


def test_a_guest_between_jobs_stops_at_once(interruption):
    with pytest.raises(KeyboardInterrupt, match="SIGUSR1"):
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(5)


def test_a_job_waiting_for_events_stops_at_once(interruption):
    a, b = socket.socketpair()
    with a, b, selectors.DefaultSelector() as selector:
        selector.register(a, selectors.EVENT_READ)
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt), interruption.job():
            selector.select(10)
        assert time.monotonic() - start < 5


def test_a_job_busy_elsewhere_stops_at_its_next_checkpoint(interruption):
    # the bug this prevents: a SIGTERM between taking a response off the
    # ring and finishing its transfer left the detach waiting 30 s for it
    with interruption.job():
        os.kill(os.getpid(), signal.SIGUSR1)  # handled in this frame, not a wait
        sum(range(1000))  # bytecodes run: the handler has run, and returned
        assert interruption.requested
        with pytest.raises(KeyboardInterrupt, match="stopped by SIGUSR1"):
            interruption.checkpoint()
    with pytest.raises(KeyboardInterrupt):  # and no later job starts
        with interruption.job():
            pass


@pytest.mark.parametrize("args, message", [
    (["--size", "3M"], "argument --size: 3145728 bytes is not 4 MiB..1 GiB"),
    (["--queues", "0"], "--queues 0 is not in 1..16"),
    (["--duration", "0"], "argument --duration: '0' is not in (0, 3600] seconds"),
    (["--inflight", "1000"], "--inflight 1000 is not in 1..256"),
])
def test_bad_arguments_are_one_line(args, message):
    run = blkif("demo", *args)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and message in run.stderr, run.stderr


# -- the pieces -------------------------------------------------------------

@pytest.fixture(scope="module")
def box(tmp_path_factory):
    with sandbox.Sandbox(str(tmp_path_factory.mktemp("box"))) as made:
        yield made


def test_a_guest_reading_other_data_fails_verification(box):
    rng = random.Random(1)
    image = box.make_image("wrong.img", 4 << 20, lambda offset, n: rng.randbytes(n))
    box.add_vbd(2, "xvda", image)
    guest = box.start_guest(2)
    guest.call("attach", {"options": {"max_queues": 1}})
    wrong = demo.digests(bytes(4 << 20))  # what the image would hold if it were zeros
    with pytest.raises(sandbox.GuestError, match="first read of the disk, against the "
                                                 "image: MiB 0 .* differs") as caught:
        guest.call("call", {"function": "blkif.demo:guest_workload", "params": {
            "seed": 1, "duration": 0.1, "inflight": 4, "image_digests": wrong}})
    assert caught.value.kind == "VerifyError"
    with pytest.raises(sandbox.GuestError, match="does not run 'os:system'"):
        guest.call("call", {"function": "os:system"})
    guest.call("detach")
    assert guest.quit() == 0


def test_every_process_of_the_sandbox_is_in_our_session_and_a_group_of_its_own(box):
    """A group of its own: a Ctrl-C at the terminal reaches only us.  Our
    session: with the kernel's autogroup each session is a scheduling group,
    and a guest in a session of its own would weigh as much as the whole
    service, its SCHED_IDLE meaning nothing against the service's threads."""
    box.add_vbd(3, "xvda", box.make_image("groups.img", 4 << 20, None))
    guest = box.start_guest(3)
    guest.call("attach", {"options": {"max_queues": 1}})
    for name in ("xenstored", "hypervisor", "serve", "guest-3"):
        proc = box.procs[name]
        assert proc.poll() is None, name
        assert os.getsid(proc.pid) == os.getsid(0), name
        assert os.getpgid(proc.pid) == proc.pid, name
    guest.call("detach")
    assert guest.quit() == 0


def test_a_service_that_cannot_start_is_one_error(tmp_path):
    work = tmp_path / "box"  # its own directory: other runs' sandboxes do not count
    with pytest.raises(sandbox.SandboxError, match=r"serve exited with status 2 while "
                                                   r"starting: .*--max-queues"):
        with sandbox.Sandbox(str(work), serve_options=["--max-queues", "99"]):
            pass
    assert not processes_using(str(work))


def test_check_names_the_first_different_byte():
    model = bytearray(8192)
    demo.check(bytes(4096), model, 4096, 4096)
    bad = bytearray(4096)
    bad[100] = 1
    with pytest.raises(demo.VerifyError, match="read of 4096 bytes at 4096 .* byte 4196"):
        demo.check(bytes(bad), model, 4096, 4096)


def test_first_difference_names_the_mib():
    a = demo.digests(bytes(3 << 20))
    b = demo.digests(bytes(2 << 20) + b"x" + bytes((1 << 20) - 1))
    demo.first_difference(a, list(a), "same")
    with pytest.raises(demo.VerifyError, match="image: MiB 2 .* differs"):
        demo.first_difference(a, b, "image")
    with pytest.raises(demo.VerifyError, match="2 MiB instead of 3"):
        demo.first_difference(a, a[:2], "image")


@pytest.mark.parametrize("seed", range(20))
def test_a_round_never_overlaps(seed):
    rng = random.Random(seed)
    size = 16 << 20
    recent = [(4096 * i * 300, 8192) for i in range(5)]
    plan = demo.plan_round(rng, size, 32, recent, discard=seed % 2 == 0)
    assert 0 < len(plan) <= 32
    spans = sorted((offset, offset + length) for _, offset, length in plan)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    for op, offset, length in plan:
        assert op in (("read", "write", "discard") if seed % 2 == 0 else ("read", "write"))
        assert offset % 512 == 0 and length % 4096 == 0 and 4096 <= length <= 1 << 20
        assert offset + length <= size


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_bar_on_a_tty_and_lines_elsewhere():
    plain = io.StringIO()
    progress = sandbox.Progress(plain)
    for i in range(11):
        progress.update("phase", i / 10, "%d done" % i)
    progress.note("next")
    assert plain.getvalue() == ("phase ...\nphase: 25%  3 done\nphase: 50%  5 done\n"
                                "phase: 75%  8 done\nnext\n")
    tty = Tty()
    progress = sandbox.Progress(tty)
    progress.update("phase", 0.5, "half")
    progress.end()
    assert tty.getvalue() == "\r\x1b[K%-20s [%s%s]  50%%  half\n" % ("phase", "#" * 15, "." * 15)
    quiet = io.StringIO()
    sandbox.Progress(quiet, enabled=False).update("phase", 1)
    assert quiet.getvalue() == ""


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert sandbox.percentile(values, 50) == 50
    assert sandbox.percentile(values, 99) == 99
    assert sandbox.percentile([3], 99) == 3
    assert sandbox.percentile([], 50) == 0.0
