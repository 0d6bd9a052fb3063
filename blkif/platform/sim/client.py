"""The ``sim`` platform as one domain's process sees it.

Control operations are one request/reply with the hypervisor (under a lock,
so threads may share a platform).  Granted and mapped pages are mmaps of the
granter's domain memory, stitched into one region per call (``_mman``); a
read-only map comes from a read-only fd, so its memoryview is read-only and
the pages are PROT_READ underneath.  Event-channel ports are socket ends:
notify writes one byte to the peer, wait drains what arrived (events
coalesce, like Xen's pending bit), end of file means the peer is gone.
Open the platform after fork(), never before: a forked child would share
the connection.
"""
import mmap
import os
import select
import socket
import sys
import threading

from blkif.abi.constants import PAGE_SIZE
from blkif.errors import LocalProtocolError
from blkif.platform import _mman
from blkif.platform.base import GrantedPages, GrantRef, Mapping, Platform, Port
from blkif.platform.errors import (
    EventChannelClosed,
    EventChannelError,
    GrantError,
    PlatformError,
    PlatformUnavailable,
)
from blkif.platform.sim import protocol

_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL


def _raise_for(reply):
    kind, what = reply.get("kind"), reply.get("message", "")
    if kind == "grant":
        raise GrantError(reply["status"], what)
    if kind == "evtchn":
        raise EventChannelError(reply["errno"], what)
    if kind == "usage":
        raise LocalProtocolError(what)
    if kind == "os":
        raise PlatformError("sim hypervisor: %s" % what)
    raise PlatformError("sim hypervisor refused: %r" % (reply,))


class SimPlatform(Platform):
    """Domain ``domid`` of the sim hypervisor serving directory ``path``
    (default: $BLKIF_SIM)."""

    name = "sim"

    def __init__(self, domid=0, path=None):
        path = path or os.environ.get("BLKIF_SIM")
        if not path:
            raise PlatformUnavailable(
                "sim platform needs path= or $BLKIF_SIM (start one with "
                "`python -m blkif.platform.sim start DIR`)")
        self.domid, self.path = int(domid), path
        self._lock = threading.Lock()
        self._objects = set()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._sock.connect(protocol.socket_path(path))
        except OSError as exc:
            self._sock.close()
            raise PlatformUnavailable("no sim hypervisor at %s: %s (start one with "
                                      "`python -m blkif.platform.sim start %s`)"
                                      % (path, exc.strerror, path)) from None
        try:
            reply, fds = self._call({"op": "hello", "domid": self.domid})
        except BaseException:
            self._sock.close()
            raise
        gnttab_fd, self._memory_fd = fds
        self._gnttab = mmap.mmap(gnttab_fd, reply["gnttab_size"], prot=mmap.PROT_READ)
        os.close(gnttab_fd)
        self._closed = False

    def _call(self, message):
        with self._lock:
            try:
                protocol.send(self._sock, message)
                reply, fds = protocol.recv(self._sock)
            except OSError:
                reply, fds = None, []
        if reply is None:
            raise PlatformUnavailable("the sim hypervisor at %s went away" % self.path)
        if not reply["ok"]:
            for fd in fds:
                os.close(fd)
            _raise_for(reply)
        return reply, fds

    def _check_open(self):
        if self._closed:
            raise LocalProtocolError("platform is closed")

    # -- grants -------------------------------------------------------------

    def grant_pages(self, remote_domid, count, readonly=False):
        self._check_open()
        reply, _ = self._call({"op": "grant", "remote": int(remote_domid),
                               "count": int(count), "readonly": bool(readonly)})
        try:
            region = _mman.map_pages(self._memory_fd,
                                     [f * PAGE_SIZE for f in reply["frames"]], True)
        except OSError:
            self._call({"op": "end_access", "id": reply["id"]})
            raise
        pages = SimGrantedPages(self, reply["id"], int(remote_domid), reply["refs"],
                                bool(readonly), region)
        self._objects.add(pages)
        return pages

    def _entry_flags(self, ref):
        return int.from_bytes(self._gnttab[ref * 8:ref * 8 + 2], sys.byteorder)

    def map_grants(self, remote_domid, refs, writable=True):
        self._check_open()
        refs = [int(r) for r in refs]
        reply, fds = self._call({"op": "map", "domid": int(remote_domid), "refs": refs,
                                 "writable": bool(writable)})
        try:
            region = _mman.map_pages(fds[0], [f * PAGE_SIZE for f in reply["frames"]],
                                     bool(writable))
        except OSError:
            self._call({"op": "unmap", "handle": reply["handle"]})
            raise
        finally:
            os.close(fds[0])
        mapping = SimMapping(self, reply["handle"], int(remote_domid), refs,
                             bool(writable), region)
        self._objects.add(mapping)
        return mapping

    def map_grants_each(self, remote_domid, refs, writable=True):
        """One request to the hypervisor for all of ``refs``, a mapping each."""
        self._check_open()
        refs = [int(r) for r in refs]
        reply, fds = self._call({"op": "map", "domid": int(remote_domid), "refs": refs,
                                 "writable": bool(writable), "each": True})
        mappings = []
        try:
            for ref, handle, frame in zip(refs, reply["handles"], reply["frames"]):
                region = _mman.map_pages(fds[0], [frame * PAGE_SIZE], bool(writable))
                mapping = SimMapping(self, handle, int(remote_domid), [ref], bool(writable),
                                     region)
                self._objects.add(mapping)
                mappings.append(mapping)
        except OSError:
            self.unmap_grants_each(mappings)
            self._call({"op": "unmap", "handles": reply["handles"][len(mappings):]})
            raise
        finally:
            os.close(fds[0])
        return mappings

    def unmap_grants_each(self, mappings):
        """One request to the hypervisor for all of ``mappings``."""
        handles = []
        try:
            for mapping in mappings:
                if mapping.release():
                    handles.append(mapping.handle)
        finally:  # what was released is unmapped, even if one view was still held
            for first in range(0, len(handles), protocol.MAX_REFS):
                try:
                    self._call({"op": "unmap",
                                "handles": handles[first:first + protocol.MAX_REFS]})
                except PlatformUnavailable:
                    break

    def grant_copy(self, ops):
        self._check_open()
        ops, statuses = list(ops), []
        for first in range(0, len(ops), protocol.MAX_COPY_OPS):
            statuses += self._grant_copy(ops[first:first + protocol.MAX_COPY_OPS])
        return statuses

    def _grant_copy(self, ops):
        wire = [[[s.domid, s.ref, s.offset] if isinstance(s, GrantRef) else None
                 for s in (op.source, op.dest)] for op in ops]
        reply, fds = self._call({"op": "copy", "ops": wire})
        try:
            for op, place in zip(ops, reply["places"]):
                if place is not None:
                    _copy_one(op, place, fds)
        finally:
            for fd in fds:
                os.close(fd)
            self._call({"op": "copy_done", "id": reply["id"]})
        return reply["statuses"]

    # -- event channels -----------------------------------------------------

    def evtchn_alloc_unbound(self, remote_domid):
        self._check_open()
        reply, fds = self._call({"op": "alloc_unbound", "remote": int(remote_domid)})
        return self._port(reply["port"], int(remote_domid), fds[0])

    def evtchn_bind_interdomain(self, remote_domid, remote_port):
        self._check_open()
        reply, fds = self._call({"op": "bind", "remote": int(remote_domid),
                                 "remote_port": int(remote_port)})
        return self._port(reply["port"], int(remote_domid), fds[0])

    def _port(self, number, remote_domid, fd):
        port = SimPort(self, number, remote_domid, socket.socket(fileno=fd))
        self._objects.add(port)
        return port

    def close(self):
        """Release everything; the hypervisor cleans up whatever we could not."""
        if self._closed:
            return
        self._closed = True
        for obj in list(self._objects):
            try:
                obj.close()
            except (PlatformError, LocalProtocolError):
                pass  # dropping the connection below releases it in the hypervisor
        self._sock.close()
        self._gnttab.close()
        os.close(self._memory_fd)


def _copy_one(op, place, fds):
    """Move the bytes of one checked CopyOp through the domains' memory fds."""
    (src, dst) = place
    if src is not None:
        data = os.pread(fds[src[0]], op.length, src[1])
    else:
        data = memoryview(op.source.buffer).cast("B")[op.source.offset:
                                                      op.source.offset + op.length]
    if dst is not None:
        os.pwrite(fds[dst[0]], data, dst[1])
    else:
        view = memoryview(op.dest.buffer).cast("B")
        view[op.dest.offset:op.dest.offset + op.length] = data


class SimGrantedPages(GrantedPages):
    def __init__(self, platform, grant_id, remote_domid, refs, readonly, region):
        self._platform, self._id = platform, grant_id
        self.remote_domid, self.refs, self.readonly = remote_domid, refs, readonly
        self._region, self._view = region, memoryview(region)
        self._ended = False

    @property
    def buffer(self):
        return self._view

    def flags(self, i):
        return self._platform._entry_flags(self.refs[i])

    def set_unmap_notify(self, clear_byte=None, port=None):
        number = port.port if isinstance(port, Port) else port
        self._platform._call({"op": "grant_notify", "id": self._id,
                              "offset": clear_byte, "port": number})

    def end_access(self):
        if self._ended:
            return True
        self._ended = True
        reply, _ = self._platform._call({"op": "end_access", "id": self._id})
        return reply["revoked"]

    def close(self):
        if not self._ended:
            try:
                self.end_access()
            except PlatformUnavailable:
                pass  # the hypervisor is gone: nothing left to revoke
        if not self._region.closed:
            _mman.close_region(self)
        self._platform._objects.discard(self)


class SimMapping(Mapping):
    def __init__(self, platform, handle, domid, refs, writable, region):
        self._platform, self.handle = platform, handle
        self.domid, self.refs, self.writable = domid, refs, writable
        self._region = region
        self._view = memoryview(region)

    @property
    def buffer(self):
        return self._view

    def set_unmap_notify(self, clear_byte=None, port=None):
        number = port.port if isinstance(port, Port) else port
        self._platform._call({"op": "map_notify", "handle": self.handle,
                              "offset": clear_byte, "port": number})

    def release(self):
        """Let our view of the pages go: True if it was held, and the
        hypervisor's handle is then still to be unmapped."""
        if self._region.closed:
            return False
        _mman.close_region(self)
        self._platform._objects.discard(self)
        return True

    def unmap(self):
        if self.release():
            try:
                self._platform._call({"op": "unmap", "handle": self.handle})
            except PlatformUnavailable:
                pass


class SimPort(Port):
    transport = "socket"

    def __init__(self, platform, port, remote_domid, sock):
        self._platform, self.port, self.remote_domid = platform, port, remote_domid
        self._sock = sock
        self._sock.setblocking(False)
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self._peer_gone = False

    def _live(self):
        if self._sock.fileno() < 0:
            raise LocalProtocolError("event channel port %d is closed" % self.port)
        return self._sock

    def notify(self):
        try:
            self._live().send(b"\x01", _SEND_FLAGS)
        except BlockingIOError:
            pass  # the peer has events pending already: they coalesce
        except (BrokenPipeError, ConnectionResetError):
            raise EventChannelClosed("port %d: peer d%d closed its end"
                                     % (self.port, self.remote_domid)) from None

    def clear(self):
        sock, got = self._live(), False
        while not self._peer_gone:
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                break
            except ConnectionResetError:  # the peer died with our events unread
                data = b""
            if not data:
                self._peer_gone = True
            got = True if data else got
        if not got and self._peer_gone:
            raise EventChannelClosed("port %d: peer d%d closed its end"
                                     % (self.port, self.remote_domid))
        return got

    def fileno(self):
        return self._live().fileno()

    def close(self):
        if self._sock.fileno() < 0:
            return
        self._platform._objects.discard(self)
        try:
            self._platform._call({"op": "close_port", "port": self.port})
        except (PlatformUnavailable, EventChannelError):
            pass
        finally:
            self._sock.close()
