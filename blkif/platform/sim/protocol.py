"""The sim hypervisor's wire: JSON messages on a SOCK_SEQPACKET unix socket.

One request, one reply, in order.  File descriptors (domain memory, grant
table, event-channel sockets) travel beside a message with SCM_RIGHTS.  A
reply is ``{"ok": true, ...}`` or ``{"ok": false, "kind": K, ...}`` where K
names the error class the client raises (see ``client.raise_for``).
"""
import json
import os
import socket

SOCKET_NAME = "hypervisor.sock"
PID_NAME = "hypervisor.pid"
MAX_MESSAGE = 1 << 17
MAX_FDS = 16
# Limits that keep every message below MAX_MESSAGE: refs per map or grant
# call, ops per copy request (the client splits longer copies).
MAX_REFS = 8192
MAX_COPY_OPS = 1024


def socket_path(directory):
    return os.path.join(directory, SOCKET_NAME)


def send(sock, message, fds=()):
    """Send one message with ``fds`` attached."""
    data = json.dumps(message, separators=(",", ":")).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def recv(sock):
    """One message and the list of fds that came with it; (None, []) at EOF."""
    # Peek the packet's length first (MSG_TRUNC reports it): a receive buffer
    # of MAX_MESSAGE bytes for every small reply costs more than the syscall.
    size = sock.recv_into(bytearray(1), 1, socket.MSG_PEEK | socket.MSG_TRUNC)
    if size > MAX_MESSAGE:
        size = MAX_MESSAGE  # reported as truncated below
    data, fds, flags, _ = socket.recv_fds(sock, max(size, 1), MAX_FDS)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise ValueError("sim message truncated")
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), fds
