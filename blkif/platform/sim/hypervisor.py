"""The sim hypervisor: one process that every simulated domain talks to.

Each client process connects to DIR/hypervisor.sock and says which domain it
is.  The hypervisor owns every domain's memory and grant table and checks
each map, copy and bind the way Xen does; the data itself never passes
through it: mappers receive the granter's memory fd and map the granted
frames themselves (shared, zero-copy).  An event channel is a socketpair,
one end per bound port; notify is a write straight to the peer, so events
cost no hypervisor round trip.  The hypervisor keeps a copy of each end while
its port is open, so closing a port (or dying: the kernel closes the
process's fds and the hypervisor sees the connection drop) is what makes the
peer's notify fail.  On a dropped connection it runs that process's unmap
notifications, unmaps its mappings, ends its grants and closes its ports.

Single-threaded; signal handlers only wake the loop (set_wakeup_fd).
"""
import errno
import itertools
import logging
import os
import selectors
import signal
import socket
import struct

from blkif.abi.constants import GNTST_bad_domain, GNTST_no_space, GNTST_okay, PAGE_SIZE
from blkif.platform.sim import protocol
from blkif.platform.sim.domain import Domain

log = logging.getLogger("blkif.platform.sim")


class Refused(Exception):
    """A request fails; becomes an ``{"ok": false}`` reply of this kind."""

    def __init__(self, kind, **fields):
        super().__init__(kind)
        self.reply = dict(ok=False, kind=kind, **fields)


class PortRecord:
    """A port: the hypervisor's copy of its socket end, and its binding.

    Unbound, ``spare`` is the other end of the pair, kept for whoever binds;
    bound, ``remote_port`` is the peer's port.  As in Xen, closing a bound
    port leaves its peer unbound again, offered to the closer's domain (a
    restarted backend binds it anew), and events sent to it are dropped.
    """

    def __init__(self, conn, port, remote_domid, sock, spare=None, remote_port=None):
        self.conn = conn
        self.port = port
        self.remote_domid = remote_domid
        self.sock = sock  # our copy of the owner's end
        self.spare = spare
        self.remote_port = remote_port

    def send_event(self):
        try:
            self.sock.send(b"\x01", socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except OSError:
            pass  # already pending, or the peer is gone: nothing to wake

    def close(self):
        for sock in (self.sock, self.spare):
            if sock is not None:
                sock.close()
        self.sock = self.spare = None


class Conn:
    """One connected process of one domain and what it holds."""

    def __init__(self, sock):
        self.sock = sock
        self.pid = 0
        self.domain = None
        self.grants = {}  # id -> (refs, notify)
        self.maps = {}  # handle -> (granter Domain, refs, writable, notify)
        self.copies = {}  # id -> [(Domain, ref, writable)]
        self.ports = set()


class Hypervisor:
    """Serve DIR/hypervisor.sock until SIGTERM/SIGINT or ``watch_fd`` closes."""

    def __init__(self, directory, watch_fd=None):
        self.directory = directory
        self.domains = {}
        self.conns = {}
        self._ids = itertools.count(1)
        self._stop = False
        self._sel = selectors.DefaultSelector()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        path = protocol.socket_path(directory)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale, from a hypervisor that was killed
            else:
                raise RuntimeError("a sim hypervisor already serves %s" % directory)
            finally:
                probe.close()
        self._listener.bind(path)
        self._listener.listen(64)
        self._sel.register(self._listener, selectors.EVENT_READ, "accept")
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        if watch_fd is not None:
            self._sel.register(watch_fd, selectors.EVENT_READ, "watch")

    # -- the loop -----------------------------------------------------------

    def serve_forever(self):
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        old_wakeup = signal.set_wakeup_fd(self._wake_w.fileno())
        try:
            while not self._stop:
                for key, _ in self._sel.select():
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._wake_r.recv(512)
                    elif key.data == "watch":
                        self._stop = True  # our owner died or closed the pipe
                    else:
                        self._serve(key.data)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.shutdown()

    def _on_signal(self, signum, frame):
        self._stop = True

    def shutdown(self):
        """Drop every client, free every domain, remove the socket."""
        for conn in list(self.conns.values()):
            self._disconnect(conn)
        for domain in list(self.domains.values()):
            for record in domain.ports.values():
                record.close()
            domain.close()
        self.domains.clear()
        self._sel.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        try:
            os.unlink(protocol.socket_path(self.directory))
        except FileNotFoundError:
            pass

    def _accept(self):
        sock, _ = self._listener.accept()
        conn = Conn(sock)
        pid, _, _ = struct.unpack("3i", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        conn.pid = pid
        self.conns[sock.fileno()] = conn
        self._sel.register(sock, selectors.EVENT_READ, conn)

    def _serve(self, conn):
        try:
            message, fds = protocol.recv(conn.sock)
        except (OSError, ValueError):
            message, fds = None, []
        for fd in fds:
            os.close(fd)  # clients never send fds
        if message is None:
            self._disconnect(conn)
            return
        handler = getattr(self, "_op_" + str(message.get("op")), None)
        out_fds = []
        try:
            if handler is None:
                raise Refused("usage", message="unknown op %r" % message.get("op"))
            if conn.domain is None and message["op"] != "hello":
                raise Refused("usage", message="say hello first")
            reply, out_fds = handler(conn, message)
            reply["ok"] = True
        except Refused as refusal:
            reply = refusal.reply
        except (KeyError, TypeError, ValueError) as exc:
            reply = dict(ok=False, kind="usage", message="bad request: %r" % (exc,))
        except OSError as exc:  # e.g. out of memory for a memfd: refuse, keep serving
            reply = dict(ok=False, kind="os", message=str(exc))
        try:
            protocol.send(conn.sock, reply, out_fds)
        except OSError:
            self._disconnect(conn)
        finally:
            for fd in out_fds:
                os.close(fd)

    # -- domains ------------------------------------------------------------

    def _op_hello(self, conn, message):
        if conn.domain is not None:
            raise Refused("usage", message="already said hello")
        domid = int(message["domid"])
        if not 0 <= domid < 0x7FF0:  # DOMID_FIRST_RESERVED
            raise Refused("usage", message="invalid domid %d" % domid)
        domain = self.domains.get(domid)
        if domain is None:
            domain = self.domains[domid] = Domain(domid)
        domain.conns.add(conn)
        conn.domain = domain
        log.info("event=hello domid=%d pid=%d", domid, conn.pid)
        fds = [os.dup(domain.gnttab.ro_fd), os.dup(domain.memory.fd)]
        return {"gnttab_size": domain.gnttab.size}, fds

    def _live_domain(self, domid):
        domain = self.domains.get(domid)
        return domain if domain is not None and domain.alive else None

    def _maybe_reap(self, domain):
        if domain.finished and self.domains.get(domain.domid) is domain:
            del self.domains[domain.domid]
            domain.close()
            log.info("event=domain-freed domid=%d", domain.domid)

    def _disconnect(self, conn):
        """A process went away (or is being dropped): release all it held."""
        if self.conns.pop(conn.sock.fileno(), None) is None:
            return
        self._sel.unregister(conn.sock)
        log.info("event=disconnect domid=%s pid=%d maps=%d grants=%d ports=%d",
                 conn.domain.domid if conn.domain else "-", conn.pid, len(conn.maps),
                 len(conn.grants), len(conn.ports))
        for handle in list(conn.maps):
            self._unmap(conn, handle)
        for copy_id in list(conn.copies):
            self._copy_done(conn, copy_id)
        for grant_id in list(conn.grants):
            self._end_access(conn, grant_id)
        for port in list(conn.ports):
            self._close_port(conn, port)
        conn.sock.close()
        domain = conn.domain
        if domain is not None:
            domain.conns.discard(conn)
            self._maybe_reap(domain)

    # -- granting (gntalloc) ------------------------------------------------

    def _op_grant(self, conn, message):
        remote, count = int(message["remote"]), int(message["count"])
        if not 0 < count <= protocol.MAX_REFS:
            raise Refused("usage", message="grant count must be 1..%d" % protocol.MAX_REFS)
        domain = conn.domain
        frames = domain.memory.alloc(count)
        if frames is None:
            raise Refused("grant", status=GNTST_no_space, message="domain memory exhausted")
        refs = domain.gnttab.grant(remote, frames, bool(message.get("readonly")))
        if refs is None:
            for pfn in frames:
                domain.memory.free(pfn)
            raise Refused("grant", status=GNTST_no_space, message="grant table full")
        grant_id = next(self._ids)
        conn.grants[grant_id] = (refs, None)
        return {"id": grant_id, "refs": refs, "frames": frames}, []

    def _op_end_access(self, conn, message):
        return {"revoked": self._end_access(conn, int(message["id"]))}, []

    def _end_access(self, conn, grant_id):
        refs, notify = conn.grants.pop(grant_id)
        domain = conn.domain
        if notify is not None:
            page, spec = notify
            self._run_notify(domain, domain.gnttab.frame(refs[page]), spec)
        revoked = True
        for ref in refs:
            frame = domain.gnttab.end_access(ref)
            if frame is None:
                revoked = False
            else:
                domain.memory.free(frame)
        return revoked

    def _op_grant_notify(self, conn, message):
        grant_id, offset = int(message["id"]), message.get("offset")
        refs, _ = conn.grants[grant_id]
        spec = self._notify_spec(conn, message, len(refs))
        page = offset // PAGE_SIZE if offset is not None else 0
        conn.grants[grant_id] = (refs, (page, spec))
        return {}, []

    def _notify_spec(self, conn, message, pages):
        offset, port = message.get("offset"), message.get("port")
        if offset is not None and not 0 <= offset < pages * PAGE_SIZE:
            raise Refused("usage", message="notify byte outside the pages")
        if port is not None and port not in conn.ports:
            raise Refused("evtchn", errno=errno.EINVAL, message="port %r is not ours" % port)
        return (None if offset is None else offset % PAGE_SIZE, port)

    def _run_notify(self, port_domain, frame, notify, memory=None):
        """Zero the notify byte of ``frame`` and/or send the notify event."""
        offset, port = notify
        if offset is not None:
            fd = (memory or port_domain.memory).fd
            os.pwrite(fd, b"\0", frame * PAGE_SIZE + offset)
        if port is not None and port in port_domain.ports:
            port_domain.ports[port].send_event()

    # -- mapping (gntdev) ---------------------------------------------------

    def _op_map(self, conn, message):
        domid, refs = int(message["domid"]), [int(r) for r in message["refs"]]
        writable = bool(message["writable"])
        if not 0 < len(refs) <= protocol.MAX_REFS:
            raise Refused("usage", message="map count must be 1..%d" % protocol.MAX_REFS)
        granter = self._live_domain(domid)
        if granter is None:
            raise Refused("grant", status=GNTST_bad_domain, index=0,
                          message="no domain %d" % domid)
        for index, ref in enumerate(refs):
            status = granter.gnttab.check(ref, conn.domain.domid, writable)
            if status != GNTST_okay:
                raise Refused("grant", status=status, index=index,
                              message="d%d ref %d" % (domid, ref))
        for ref in refs:
            granter.gnttab.pin(ref, writable)
        frames = [granter.gnttab.frame(ref) for ref in refs]
        fd = granter.memory.fd if writable else granter.memory.ro_fd
        if message.get("each"):  # a handle per ref, as GNTTABOP_map_grant_ref's batch
            handles = [next(self._ids) for _ in refs]
            for handle, ref in zip(handles, refs):
                conn.maps[handle] = (granter, [ref], writable, None)
            return {"handles": handles, "frames": frames}, [os.dup(fd)]
        handle = next(self._ids)
        conn.maps[handle] = (granter, refs, writable, None)
        return {"handle": handle, "frames": frames}, [os.dup(fd)]

    def _op_map_notify(self, conn, message):
        handle = int(message["handle"])
        granter, refs, writable, _ = conn.maps[handle]
        if message.get("offset") is not None and not writable:
            raise Refused("usage", message="gntdev clears a notify byte only in a "
                          "writable mapping")
        notify = self._notify_spec(conn, message, len(refs))
        offset = message.get("offset")
        page = offset // PAGE_SIZE if offset is not None else 0
        conn.maps[handle] = (granter, refs, writable, (page, notify))
        return {}, []

    def _op_unmap(self, conn, message):
        """One handle, or a batch (``handles``), as GNTTABOP_unmap_grant_ref
        takes; a batch naming a handle this connection does not hold unmaps
        none of them."""
        handles = [int(h) for h in message["handles"]] if "handles" in message else [
            int(message["handle"])]
        if not 0 < len(handles) <= protocol.MAX_REFS:
            raise Refused("usage", message="unmap count must be 1..%d" % protocol.MAX_REFS)
        if len(set(handles)) != len(handles):
            raise Refused("usage", message="a handle given twice")
        for handle in handles:
            if handle not in conn.maps:
                raise Refused("usage", message="no mapping with handle %d" % handle)
        for handle in handles:
            self._unmap(conn, handle)
        return {}, []

    def _unmap(self, conn, handle):
        granter, refs, writable, notify = conn.maps.pop(handle)
        if notify is not None:
            page, spec = notify
            self._run_notify(conn.domain, granter.gnttab.frame(refs[page]), spec,
                             memory=granter.memory)
        for ref in refs:
            frame = granter.gnttab.unpin(ref, writable)
            if frame is not None:
                granter.memory.free(frame)
        self._maybe_reap(granter)

    # -- grant copy ---------------------------------------------------------

    def _op_copy(self, conn, message):
        """Check and pin every grant side; the client copies, then copy_done."""
        statuses, places, pins, fds, fd_index = [], [], [], [], {}
        for source, dest in message["ops"]:
            status, sides = GNTST_okay, []
            for side, writable in ((source, False), (dest, True)):
                if side is None:
                    sides.append(None)
                    continue
                domid, ref, offset = (int(v) for v in side)
                granter = self._live_domain(domid)
                if granter is None:
                    status = GNTST_bad_domain
                    break
                status = granter.gnttab.check(ref, conn.domain.domid, writable)
                if status != GNTST_okay:
                    break
                sides.append((granter, ref, writable, offset))
            statuses.append(status)
            if status != GNTST_okay:
                places.append(None)
                continue
            place = []
            for side in sides:
                if side is None:
                    place.append(None)
                    continue
                granter, ref, writable, offset = side
                granter.gnttab.pin(ref, writable)
                pins.append((granter, ref, writable))
                key = (granter.domid, writable)
                if key not in fd_index:
                    fd_index[key] = len(fds)
                    fds.append(os.dup(granter.memory.fd if writable else granter.memory.ro_fd))
                place.append([fd_index[key], granter.gnttab.frame(ref) * PAGE_SIZE + offset])
            places.append(place)
        if len(fds) > protocol.MAX_FDS:
            for fd in fds:
                os.close(fd)
            for granter, ref, writable in pins:
                granter.gnttab.unpin(ref, writable)
            raise Refused("usage", message="one copy may touch at most %d domains"
                          % (protocol.MAX_FDS // 2))
        copy_id = next(self._ids)
        conn.copies[copy_id] = pins
        return {"id": copy_id, "statuses": statuses, "places": places}, fds

    def _op_copy_done(self, conn, message):
        self._copy_done(conn, int(message["id"]))
        return {}, []

    def _copy_done(self, conn, copy_id):
        for granter, ref, writable in conn.copies.pop(copy_id):
            frame = granter.gnttab.unpin(ref, writable)
            if frame is not None:
                granter.memory.free(frame)
            self._maybe_reap(granter)

    # -- event channels -----------------------------------------------------

    def _op_alloc_unbound(self, conn, message):
        remote = int(message["remote"])
        domain = conn.domain
        port = domain.new_port_number()
        mine, spare = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        spare.setblocking(False)
        domain.ports[port] = PortRecord(conn, port, remote, mine, spare)
        conn.ports.add(port)
        return {"port": port}, [os.dup(mine.fileno())]

    def _op_bind(self, conn, message):
        remote, remote_port = int(message["remote"]), int(message["remote_port"])
        other = self._live_domain(remote)
        if other is None:
            raise Refused("evtchn", errno=errno.ESRCH, message="no domain %d" % remote)
        record = other.ports.get(remote_port)
        if record is None or record.spare is None:
            raise Refused("evtchn", errno=errno.EINVAL,
                          message="d%d port %d is not unbound" % (remote, remote_port))
        if record.remote_domid != conn.domain.domid:
            raise Refused("evtchn", errno=errno.EINVAL, message="d%d port %d is not offered to d%d"
                          % (remote, remote_port, conn.domain.domid))
        sock, record.spare = record.spare, None
        try:
            while sock.recv(4096):
                pass  # events sent while unbound are dropped, as Xen drops them
        except BlockingIOError:
            pass
        sock.setblocking(True)
        domain = conn.domain
        port = domain.new_port_number()
        domain.ports[port] = PortRecord(conn, port, remote, sock, remote_port=remote_port)
        record.remote_port = port
        conn.ports.add(port)
        return {"port": port}, [os.dup(sock.fileno())]

    def _op_close_port(self, conn, message):
        port = int(message["port"])
        if port not in conn.ports:
            raise Refused("evtchn", errno=errno.EINVAL, message="port %d is not ours" % port)
        self._close_port(conn, port)
        return {}, []

    def _close_port(self, conn, port):
        conn.ports.discard(port)
        record = conn.domain.ports.pop(port)
        domain = self.domains.get(record.remote_domid)
        peer = None
        if domain is not None and record.remote_port is not None:
            peer = domain.ports.get(record.remote_port)
        if peer is not None:  # the peer's port is unbound again: our end is its spare
            peer.spare, record.sock = record.sock, None
            peer.spare.setblocking(False)
            peer.remote_domid, peer.remote_port = conn.domain.domid, None
        record.close()
