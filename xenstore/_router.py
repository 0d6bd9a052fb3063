# pyxs 0.4.1 (2016) underneath the client, with its quirks fixed here.
#
# What pyxs does that we cannot live with, and what we do instead:
# - Router thread: any read error or unexpected packet raises inside the
#   thread, which dies silently while callers block forever in RVar.get().
#   ``Router.__call__`` here records the error, wakes every waiter with
#   ``DEAD`` and every watch queue with ``None``, and closes the socket.
# - Unknown req_id replies and WATCH_EVENTs with odd payloads are logged and
#   skipped, not fatal; events go to a queue per token (``watch_queues``),
#   not through pyxs.Monitor, whose wait() drops "@" events and can spin
#   forever on absolute paths it does not watch.
# - ``Client.execute_command`` rejects non-7-bit values and strips trailing
#   NULs from replies; ``Packet`` refuses ops pyxs does not know
#   (RESET_WATCHES, DIRECTORY_PART).  We build packets with ``make_packet``
#   and talk to the router directly, so values are arbitrary bytes.
# - ``next_rq_id`` is a global unlocked counter; we count per connection.
# - ``PacketConnection.recv`` builds a Packet, so a reply with an op pyxs
#   does not know (DIRECTORY_PART) kills the router; ``_AnyOpRecv`` fixes it.
# - A failed connect leaks the socket; ``SocketConnection`` closes it.
# - ``terminate`` on a never-started or already-dead router leaks the
#   terminator socketpair; ours always closes everything and joins.
import logging
import socket

import select

from pyxs._internal import NUL, Op as PyxsOp, Packet
from pyxs.client import Router as _PyxsRouter
from pyxs.connection import UnixSocketConnection
from pyxs.connection import XenBusConnection as _PyxsXenBusConnection
from pyxs.exceptions import ConnectionError as PyxsConnectionError

from .wire import Op

log = logging.getLogger("xenstore.client")

#: Set on an RVar when the connection died before its reply came.
DEAD = object()


def make_packet(op, payload, rq_id, tx_id):
    """A pyxs Packet, also for ops pyxs 0.4.1 does not list."""
    if op in PyxsOp:
        return Packet(op, payload, rq_id, tx_id)
    return tuple.__new__(Packet, (int(op), rq_id, tx_id, len(payload), payload))


class _Transport:
    def __init__(self, sock):
        self.sock = sock

    def fileno(self):
        return self.sock.fileno()

    def recv(self, size):
        chunks = []
        while size:
            chunk = self.sock.recv(size)
            if not chunk:
                raise OSError("connection closed by xenstored")
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def send(self, data):
        self.sock.sendall(data)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class _AnyOpRecv:
    """``recv`` that accepts every op number the daemon may answer with."""

    def recv(self):
        if not self.is_connected:
            raise PyxsConnectionError("not connected")
        try:
            header = self.transport.recv(Packet._struct.size)
            op, rq_id, tx_id, size = Packet._struct.unpack(header)
            payload = self.transport.recv(size) if size else b""
        except OSError as e:
            self.close()
            raise PyxsConnectionError("error while reading from %r: %s"
                                      % (self.path, e))
        return make_packet(op, payload, rq_id, tx_id)


class XenBusConnection(_AnyOpRecv, _PyxsXenBusConnection):
    """pyxs' /dev/xen/xenbus connection, accepting every reply op."""


class SocketConnection(_AnyOpRecv, UnixSocketConnection):
    """pyxs' Unix socket connection without the fd leak on a failed connect."""

    def create_transport(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except OSError as e:
            sock.close()
            raise PyxsConnectionError("error connecting to %r: %s"
                                      % (self.path, e.strerror or e))
        return _Transport(sock)


class Router(_PyxsRouter):
    """pyxs' Router with a loop that fails loudly and cleans up (see above)."""

    def __init__(self, connection):
        super().__init__(connection)
        self.thread.name = "xenstore-router"
        self.watch_queues = {}     # token bytes -> queue.Queue of (path, token)
        self.error = None          # why the connection ended, once it has
        self.dead = False

    def __call__(self):
        try:
            while True:
                rlist, _, _ = select.select([self.connection, self.r_terminator],
                                            [], [])
                if self.r_terminator in rlist:
                    break
                packet = self.connection.recv()
                if packet.op == Op.WATCH_EVENT:
                    self._event(packet.payload)
                    continue
                rvar = self.rvars.pop(packet.rq_id, None)
                if rvar is None:
                    log.warning("xenstored reply with unknown req_id %d (op %d)",
                                packet.rq_id, packet.op)
                    continue
                rvar.set(packet)
        except Exception as e:  # noqa: BLE001 - the thread must not die mute
            self.error = e
        finally:
            self._shutdown()

    def _event(self, payload):
        parts = payload.split(NUL)
        if len(parts) < 3:
            log.warning("malformed WATCH_EVENT payload %r", payload[:80])
            return
        queue = self.watch_queues.get(parts[1])
        if queue is not None:
            queue.put((parts[0], parts[1]))

    def _shutdown(self):
        self.dead = True
        if self.error is None:
            self.error = "connection closed"
        for rvar in list(self.rvars.values()):
            rvar.set(DEAD)
        self.rvars.clear()
        for queue in list(self.watch_queues.values()):
            queue.put(None)
        self.connection.close()
        for sock in (self.r_terminator, self.w_terminator):
            sock.close()

    def send(self, packet):
        if self.dead:
            raise PyxsConnectionError("not connected")
        return super().send(packet)

    def terminate(self):
        if self.thread.is_alive():
            try:
                self.w_terminator.sendall(NUL)
            except OSError:
                pass
            self.thread.join()
        elif not self.dead:
            self.error = "closed"
            self._shutdown()
