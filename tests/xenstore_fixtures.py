"""Fixtures and helpers shared by the tests/test_xenstore_*.py modules.

``xenstored`` runs ``python -m xenstore serve`` as a real subprocess on a
fresh socket and checks on teardown that SIGTERM stops it cleanly (exit 0,
socket files gone).  ``RawClient`` speaks the wire protocol directly with our
sans-I/O codec, for the byte-level assertions pyxs would hide.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from xenstore.wire import HEADER, Op, Packet, PacketReader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server(socket_path, *extra):
    """Start the daemon; return the Popen once its socket accepts connections."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "xenstore", "serve", "--socket", socket_path,
         "--log-level", "WARNING", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("xenstored exited: %s" % proc.stderr.read().decode())
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(socket_path)
            return proc
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError("xenstored did not start listening on %s" % socket_path)


def stop_server(proc, timeout=10):
    """SIGTERM, then the exit status and stderr."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError("xenstored ignored SIGTERM")
    return proc.returncode, err.decode()


@pytest.fixture
def xenstored(tmp_path):
    """Path of the main socket of a fresh daemon subprocess."""
    path = str(tmp_path / "xenstored.sock")
    proc = start_server(path)
    yield path
    code, err = stop_server(proc)
    assert code == 0, err
    assert not os.path.exists(path), "socket file left behind"
    assert not os.path.exists(path + ".d"), "domain socket dir left behind"
    assert "Traceback" not in err, err


class RawClient:
    """A blocking client over a real socket, using xenstore.wire to frame."""

    def __init__(self, path, timeout=5):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.reader = PacketReader()
        self.pending = []
        self.events = []
        self.req_id = 0

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send_raw(self, data):
        self.sock.sendall(data)

    def recv_packet(self):
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("server closed the connection")
            self.pending.extend(self.reader.feed(data))
        return self.pending.pop(0)

    def request(self, op, payload=b"", tx_id=0):
        """Send one request; return its reply, stashing watch events in ``events``."""
        self.req_id += 1
        self.send_raw(Packet(int(op), self.req_id, tx_id, payload).encode())
        while True:
            packet = self.recv_packet()
            if packet.type == Op.WATCH_EVENT:
                self.events.append(packet.payload)
                continue
            assert packet.req_id == self.req_id and packet.tx_id == tx_id
            return packet

    def next_event(self):
        if self.events:
            return self.events.pop(0)
        packet = self.recv_packet()
        assert packet.type == Op.WATCH_EVENT, packet
        return packet.payload

    def ok(self, op, payload=b"", tx_id=0):
        """The reply payload; fail the test on XS_ERROR."""
        reply = self.request(op, payload, tx_id)
        assert reply.type == op, (op, reply)
        return reply.payload

    def error(self, op, payload=b"", tx_id=0):
        """The errno name of an XS_ERROR reply; fail the test otherwise."""
        reply = self.request(op, payload, tx_id)
        assert reply.type == Op.ERROR, (op, reply)
        assert reply.payload.endswith(b"\0")
        return reply.payload[:-1].decode()


__all__ = ["xenstored", "RawClient", "start_server", "stop_server", "HEADER"]
