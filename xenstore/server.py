# The embedded xenstored's socket layer: selectors, one thread, many clients.
#
# The main socket serves domain 0 (privileged).  When dom0 introduces domain
# N, a second listening socket appears at ``domain_socket_path(main, N)``;
# every client connecting there *is* domain N, unprivileged, with its
# relative paths under /local/domain/N.  RELEASE closes that socket and its
# clients.  Bytes from a client go through its own wire.PacketReader into
# daemon.Xenstored; replies and events leave through non-blocking sends with
# a per-client write buffer.  A client that breaks framing (payload over
# XENSTORE_PAYLOAD_MAX) or stops reading is dropped; nobody else notices.
# A guest over its request rate (``Xenstored.admit``) has its requests held
# and its socket left unread until its turn comes: it slows only itself.
#
# Signals are only recorded by their handlers (``Server.request``) and acted
# on by the loop: stop (socket files removed) or write the --dump snapshot.
import errno
import json
import logging
import os
import selectors
import socket
import time
from collections import deque

from .daemon import Xenstored
from .errors import ProtocolError
from .wire import PacketReader

log = logging.getLogger("xenstore.server")

RECV_SIZE = 65536
# A client held back by its domain's rate waits at least this long, so that
# it comes back with several requests' worth of turns (at 200 a second, ten),
# not one: a flood costs a turn of the loop per ten requests, not per request.
HOLD_MIN = 0.05


def domain_socket_path(main_socket, domid):
    """Where domain ``domid``'s socket appears once introduced: ``<main>.d/<domid>``."""
    return "%s.d/%d" % (main_socket, domid)


class _Client:
    __slots__ = ("sock", "conn", "reader", "wbuf", "held", "resume_at", "mask")

    def __init__(self, sock, conn):
        self.sock = sock
        self.conn = conn
        self.reader = PacketReader()
        self.wbuf = bytearray()
        self.held = deque()  # requests read but not yet handled (over its rate)
        self.resume_at = None  # while held back: when its next request may go
        self.mask = 0  # the selector events its socket is registered for (0: not)


class Server:
    """A xenstored on ``socket_path``; ``serve_forever`` until ``request("stop")``."""

    def __init__(self, socket_path, dump=None, quotas=None):
        self.socket_path = os.path.abspath(socket_path)
        self.dump_path = dump
        self.daemon = Xenstored(quotas, on_introduce=self._open_domain,
                                on_release=self._close_domain)
        self._sel = selectors.DefaultSelector()
        self._listeners = {}     # domid -> listening socket
        self._clients = {}       # fileno -> _Client
        self._by_conn = {}       # connection id -> _Client
        self._held = set()       # clients held back by their domain's rate
        self._requests = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._running = False

    # Lifecycle.

    def start(self):
        """Bind the main socket (replacing a stale file); raise OSError if in use."""
        self._listen(0, self.socket_path)
        log.info("listening on %s", self.socket_path)

    @property
    def wakeup_fd(self):
        """Write a byte here (signal.set_wakeup_fd) to wake the loop."""
        return self._wake_w.fileno()

    def request(self, what):
        """Ask the loop to ``"stop"`` or ``"dump"``; safe from a signal handler."""
        self._requests.append(what)
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def serve_forever(self):
        self._running = True
        try:
            while self._running:
                for key, events in self._sel.select(timeout=self._next_turn()):
                    kind, data = key.data
                    if kind == "wake":
                        self._drain_wakeups()
                    elif kind == "listen":
                        self._accept(key.fileobj, data)
                    elif kind == "client":
                        self._service(data, events)
                self._resume_held()
                self._flush_all()
                self._act_on_requests()
        finally:
            self.close()

    def close(self):
        for client in list(self._clients.values()):
            self._drop(client, None)
        for domid in list(self._listeners):
            self._unlisten(domid)
        try:
            os.rmdir(self.socket_path + ".d")
        except OSError:
            pass
        for sock in (self._wake_r, self._wake_w):
            try:
                self._sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
        self._sel.close()

    def dump(self, path=None):
        """Write a JSON snapshot of the tree and domains to ``path``/--dump."""
        path = path or self.dump_path
        if not path:
            return
        tree = self.daemon.store.tree
        nodes = [{"path": p, "value": n.value.decode("utf-8", "backslashreplace"),
                  "perms": [str(x) for x in n.perms]} for p, n in tree.walk("/")]
        nodes += [{"path": name, "value": "", "perms": [str(x) for x in n.perms]}
                  for name, n in sorted(tree.specials.items())]
        snapshot = {
            "nodes": nodes,
            "domains": sorted(self.daemon.domains),
            "connections": [{"id": c.id, "domid": c.domid,
                             "watches": [[w.path, w.token.decode("ascii", "replace")]
                                         for w in c.watches],
                             "transactions": sorted(c.transactions)}
                            for c in self.daemon.connections.values()],
        }
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(snapshot, f, indent=1)
        os.replace(tmp, path)
        log.info("dumped %d nodes to %s", len(nodes), path)

    # Listening sockets.

    def _listen(self, domid, path):
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)      # stale socket file from a dead daemon
            else:
                raise OSError(errno.EADDRINUSE, "a xenstored already listens on %s"
                              % path)
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._listeners[domid] = sock
        self._sel.register(sock, selectors.EVENT_READ, ("listen", domid))

    def _unlisten(self, domid):
        sock = self._listeners.pop(domid)
        path = sock.getsockname()
        self._sel.unregister(sock)
        sock.close()
        try:
            os.unlink(path)
        except OSError:
            pass

    def _open_domain(self, domid):
        os.makedirs(self.socket_path + ".d", exist_ok=True)
        path = domain_socket_path(self.socket_path, domid)
        try:
            self._listen(domid, path)
        except OSError as e:
            log.error("domid=%d cannot listen on %s: %s", domid, path, e)

    def _close_domain(self, domid):
        if domid in self._listeners:
            self._unlisten(domid)

    # Clients.

    def _accept(self, listener, domid):
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("accept failed: %s", e)
            return
        if domid not in self.daemon.domains:
            sock.close()
            return
        sock.setblocking(False)
        client = _Client(sock, self.daemon.connect(domid))
        self._clients[sock.fileno()] = client
        self._by_conn[client.conn.id] = client
        self._interest(client)
        log.debug("domid=%d conn=%d connected", domid, client.conn.id)

    def _service(self, client, events):
        if events & selectors.EVENT_WRITE:
            self._flush(client)
        if (not events & selectors.EVENT_READ or client.conn.closing
                or client.sock.fileno() < 0):
            return
        try:
            data = client.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop(client, "recv failed: %s" % e)
            return
        if not data:
            self._drop(client, None)
            return
        try:
            client.held.extend(client.reader.feed(data))
        except ProtocolError as e:
            self._drop(client, "protocol error: %s" % e)
            return
        self._dispatch(client)

    def _dispatch(self, client):
        """Handle ``client``'s held requests while its domain's rate allows;
        the rest wait, and its socket is not read, until ``resume_at``."""
        while client.held and not client.conn.closing:
            wait = self.daemon.admit(client.conn, time.monotonic())
            if wait > 0:
                client.resume_at = time.monotonic() + max(wait, HOLD_MIN)
                self._held.add(client)
                self._interest(client)
                return
            self.daemon.handle(client.conn, client.held.popleft())
        if client.resume_at is not None:
            client.resume_at = None
            self._held.discard(client)
            self._interest(client)

    def _next_turn(self):
        """The select timeout: until the first held-back client may go on."""
        turns = [c.resume_at for c in self._held]
        return max(0.0, min(turns) - time.monotonic()) if turns else None

    def _resume_held(self):
        now = time.monotonic()
        for client in [c for c in self._held if c.resume_at <= now]:
            self._dispatch(client)

    def _interest(self, client):
        """Register ``client``'s socket for what it waits on: reading unless
        held back, writing while output is pending (neither: unregistered)."""
        mask = ((selectors.EVENT_READ if client.resume_at is None else 0)
                | (selectors.EVENT_WRITE if client.wbuf else 0))
        if mask == client.mask:
            return
        if not client.mask:
            self._sel.register(client.sock, mask, ("client", client))
        elif not mask:
            self._sel.unregister(client.sock)
        else:
            self._sel.modify(client.sock, mask, ("client", client))
        client.mask = mask

    def _flush_all(self):
        """Send what this turn's requests produced (to the connections the
        daemon marked: not a look at every client), drop those closing."""
        marked = list(self.daemon.outgoing)
        self.daemon.outgoing.clear()
        for conn in marked:
            client = self._by_conn.get(conn.id)
            if client is None:
                continue
            if conn.closing:
                self._drop(client, conn.closing)
            elif conn.outbox:
                self._flush(client)

    def _flush(self, client):
        conn = client.conn
        while conn.outbox:
            packet = conn.outbox.popleft()
            conn.sent(packet)
            client.wbuf += packet.encode()
        if client.wbuf:
            try:
                sent = client.sock.send(client.wbuf)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                self._drop(client, "send failed: %s" % e)
                return
            del client.wbuf[:sent]
        if len(client.wbuf) > (4 << 20):
            self._drop(client, "client does not read its replies and events")
            return
        self._interest(client)

    def _drop(self, client, reason):
        conn = client.conn
        if reason:
            log.warning("domid=%d conn=%d dropped: %s", conn.domid, conn.id, reason)
        self._clients.pop(client.sock.fileno(), None)
        self._by_conn.pop(conn.id, None)
        self._held.discard(client)
        if client.mask:
            self._sel.unregister(client.sock)
            client.mask = 0
        client.sock.close()
        self.daemon.disconnect(conn)

    # Requests recorded by signal handlers.

    def _drain_wakeups(self):
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _act_on_requests(self):
        while self._requests:
            what = self._requests.pop(0)
            if what == "stop":
                log.info("stopping")
                self._running = False
            elif what == "dump":
                try:
                    self.dump()
                except OSError as e:
                    log.error("dump to %s failed: %s", self.dump_path, e)
