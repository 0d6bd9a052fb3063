"""Running under systemd: the notify protocol over a real datagram socket,
from a real ``blkif serve`` on the sim platform; logs for journald; the
shipped unit file checked by systemd-analyze and by our own CLI parser."""
import configparser
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

from backend_fixtures import Service
from blkif import systemd
from blkif.cli import build_parser
from blkif.platform.sim import SimHypervisor
from helpers import require_tool
from xenstore import XenbusState as S
from xenstore_fixtures import ROOT

UNIT = os.path.join(ROOT, "blkif", "data", "blkif.service")


@pytest.fixture
def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(20)
    yield sock, path
    sock.close()


def _messages(sock, until, timeout=20):
    """Datagrams as {field: value} dicts until one has ``until``."""
    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        fields = dict(line.partition("=")[::2] for line in sock.recv(4096).decode().split("\n"))
        got.append(fields)
        if until in fields:
            return got
    raise AssertionError("no %s in %s" % (until, got))


def test_serve_says_ready_when_it_serves_and_stopping_when_it_stops(tmp_path, notify_socket,
                                                                    monkeypatch):
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # WATCHDOG=1 every 0.5 s (or each round)
    with SimHypervisor() as hv:
        service = Service(hv, tmp_path)
        try:
            ready = _messages(sock, "READY")[-1]
            assert ready["READY"] == "1" and "serving VBDs under" in ready["STATUS"]
            # READY means a VBD created now is served: it reaches InitWait.
            domid, devid = service.new_vbd(tmp_path / "disk.img")
            back = "/local/domain/0/backend/vbd/%d/%d/state" % (domid, devid)
            assert service.dom0.wait_for_state(back, [S.InitWait], 10) == S.InitWait
            kicks = [m for m in _messages(sock, "WATCHDOG", 5)]
            assert kicks[-1] == {"WATCHDOG": "1"}
            service.proc.send_signal(signal.SIGTERM)
            stopping = _messages(sock, "STOPPING")[-1]
            assert stopping["STOPPING"] == "1" and "stopping 1 worker(s)" in stopping["STATUS"]
        finally:
            assert service.close() == 0, service.output()


def test_notify_to_an_abstract_socket(monkeypatch):
    name = "blkif-test-%d" % os.getpid()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("READY=1", "STATUS=up")
        assert sock.recv(100) == b"READY=1\nSTATUS=up"


def test_notify_without_systemd_or_with_a_dead_socket(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert systemd.notify("READY=1") is False
    assert "cannot notify systemd" in caplog.text


@pytest.mark.parametrize("env,interval", [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # for another process
    ({}, None),
])
def test_watchdog_interval(monkeypatch, env, interval):
    for key in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert systemd.Watchdog().interval == interval


def test_logs_under_journald_have_a_priority_and_no_timestamp(tmp_path):
    """stderr is the journal's stream when $JOURNAL_STREAM names its device
    and inode: then lines start <N> and carry no date; otherwise a timestamp."""
    log = tmp_path / "stderr"
    with open(log, "w") as f:
        st = os.fstat(f.fileno())
        env = dict(os.environ, JOURNAL_STREAM="%d:%d" % (st.st_dev, st.st_ino))
        with SimHypervisor() as hv:
            proc = subprocess.run(
                [sys.executable, "-m", "blkif", "-v", "serve", "--platform", "sim", "--sim-path",
                 hv.path, "--xenstore", str(tmp_path / "none.sock"), "--state-dir",
                 str(tmp_path / "state"), "--metrics", "127.0.0.1:0"],
                cwd=ROOT, stderr=f, env=env, timeout=30)
    lines = log.read_text().splitlines()
    assert proc.returncode == 1
    assert lines[0].startswith("<6>INFO blkif.backend.service: metrics on http://127.0.0.1:")
    assert lines[-1].startswith("blkif: error: ")  # the CLI's one line, as always
    plain = subprocess.run(
        [sys.executable, "-c", "import logging; from blkif import systemd; "
         "systemd.setup_logging(logging.INFO, '%(levelname)s x: %(message)s'); "
         "logging.getLogger('t').error('boom')"],
        cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JOURNAL_STREAM="1:2"))
    assert plain.stderr[:4].isdigit() and plain.stderr.endswith(" ERROR x: boom\n")


def test_shipped_unit(tmp_path):
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(UNIT)
    service = unit["Service"]
    assert service["Type"] == "notify" and service["Restart"] == "on-failure"
    assert service["RuntimeDirectory"] == "blkif" and service["KillMode"] == "mixed"
    argv = shlex.split(service["ExecStart"])
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve" and args.platform == "xen" and args.metrics
    assert args.state_dir is None  # the default for root: /run/blkif, the RuntimeDirectory
    analyze = require_tool("systemd-analyze")
    blkif = os.path.join(os.path.dirname(sys.executable), "blkif")
    copy = tmp_path / "blkif.service"
    with open(UNIT) as f:
        copy.write_text(f.read().replace("/usr/local/bin/blkif", blkif))
    run = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True)
    assert run.returncode == 0 and not run.stderr.strip(), run.stderr
