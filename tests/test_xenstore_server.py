"""The daemon process: command line, signals, --dump, and fuzzing its socket
with random packets while a well-behaved client keeps being served."""
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xenstore import Xenstore, domain_socket_path
from xenstore.wire import XENSTORE_PAYLOAD_MAX, Op, Packet
from xenstore_fixtures import ROOT, RawClient, start_server, stop_server, xenstored  # noqa: F401


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "xenstore", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


def test_help():
    result = run_cli("serve", "--help")
    assert result.returncode == 0 and "--socket" in result.stdout


@pytest.mark.parametrize("args", [
    ["serve"],
    ["serve", "--socket"],
    ["serve", "--socket", "/tmp/x", "--quota", "bogus=1"],
    ["frobnicate"],
])
def test_bad_arguments_one_line_exit_2(args):
    result = run_cli(*args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_unusable_socket_path_one_line_exit_1(tmp_path):
    result = run_cli("serve", "--socket", str(tmp_path / "no" / "dir" / "s"))
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_second_daemon_on_same_socket_refused(xenstored):
    result = run_cli("serve", "--socket", xenstored)
    assert result.returncode == 1 and "already" in result.stderr
    with Xenstore.open(xenstored) as xs:           # the first one is unharmed
        assert xs.list("/") == ["tool"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_cleanly_removing_sockets(tmp_path, signum):
    path = str(tmp_path / "s.sock")
    proc = start_server(path)
    with Xenstore.open(path) as xs:
        xs.introduce_domain(3)
        assert os.path.exists(domain_socket_path(path, 3))
    proc.send_signal(signum)
    assert proc.wait(timeout=10) == 0
    assert not os.path.exists(path) and not os.path.exists(path + ".d")


def test_dump_on_sigusr1_and_exit(tmp_path):
    path, dump = str(tmp_path / "s.sock"), str(tmp_path / "dump.json")
    proc = start_server(path, "--dump", dump)
    try:
        with Xenstore.open(path) as xs:
            xs.write("/vm/name", "guest")
            xs.set_perms("/vm/name", ["n0", "r1"])
            proc.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 10
            while not os.path.exists(dump) and time.monotonic() < deadline:
                time.sleep(0.02)
            xs.write("/vm/later", "x")
    finally:
        assert stop_server(proc)[0] == 0
    nodes = {n["path"]: n for n in json.load(open(dump))["nodes"]}
    assert nodes["/vm/name"] == {"path": "/vm/name", "value": "guest",
                                 "perms": ["n0", "r1"]}
    assert "/vm/later" in nodes                    # rewritten at exit
    assert "@introduceDomain" in nodes


def test_many_concurrent_clients(xenstored):
    clients = [RawClient(xenstored) for _ in range(50)]
    try:
        for i, client in enumerate(clients):
            client.send_raw(Packet(Op.WRITE, 1, 0, b"/m/%d\0v" % i).encode())
        for client in clients:
            assert client.recv_packet().payload == b"OK\0"
        with Xenstore.open(xenstored) as xs:
            assert len(xs.list("/m")) == 50
    finally:
        for client in clients:
            client.close()


def test_client_that_never_reads_is_dropped_alone(xenstored):
    greedy = socket.socket(socket.AF_UNIX)
    greedy.connect(xenstored)
    greedy.setblocking(False)
    request = Packet(Op.READ, 1, 0, b"/big\0").encode()
    with Xenstore.open(xenstored) as xs:
        xs.write("/big", b"x" * 4000)
        sent = 0
        try:
            for _ in range(3000):      # ~12 MiB of replies it never reads
                greedy.send(request)
                sent += 1
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            pass
        assert xs.read("/big") == b"x" * 4000
    greedy.close()


ops = st.one_of(st.sampled_from(list(Op)), st.integers(0, 0xFFFFFFFF))
payloads = st.one_of(
    st.binary(max_size=64),
    st.lists(st.sampled_from([b"/", b"a", b"@", b"\0", b"/local/domain/1",
                              b"T", b"F", b"0", b"5", b"r1", b"b0", b"-", b"//"]),
             max_size=12).map(b"".join),
)
frames = st.builds(lambda op, req, tx, payload: struct.pack(
    "=IIII", op, req, tx, len(payload)) + payload,
    ops, st.integers(0, 0xFFFFFFFF), st.integers(0, 5), payloads)
garbage = st.one_of(
    st.lists(frames, min_size=1, max_size=6).map(b"".join),
    st.binary(min_size=1, max_size=64),
    st.integers(XENSTORE_PAYLOAD_MAX + 1, 0xFFFFFFFF).map(
        lambda n: struct.pack("=IIII", 2, 1, 0, n)),
)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fuzz") / "s.sock")
    proc = start_server(path)
    yield path, proc
    code, err = stop_server(proc)
    assert code == 0 and "Traceback" not in err, err


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=garbage, as_guest=st.booleans())
def test_fuzz_never_crashes_server_and_others_carry_on(fuzz_server, data, as_guest):
    path, proc = fuzz_server
    with Xenstore.open(path, timeout=10) as good:
        good.introduce_domain(1)        # idempotent; the fuzzer may release it
        target = domain_socket_path(path, 1) if as_guest else path
        bad = socket.socket(socket.AF_UNIX)
        bad.settimeout(2)
        try:
            bad.connect(target)
            bad.sendall(data)
            bad.shutdown(socket.SHUT_WR)
            while bad.recv(65536):      # read replies until the server closes
                pass
        except OSError:
            pass
        finally:
            bad.close()
        assert proc.poll() is None, "xenstored died"
        good.write("/fuzz/alive", "yes")
        assert good.read("/fuzz/alive") == b"yes"
