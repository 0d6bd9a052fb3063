"""The ``xen`` platform: /dev/xen/gntdev, /dev/xen/gntalloc and /dev/xen/evtchn.

Every ioctl structure and number comes from the cffi layer (checked against
the uapi headers by tests/test_devices_layout.py).  gntdev: MAP_GRANT_REF
reserves an offset, mmap at that offset maps the grants (PROT_READ alone maps
them read-only), munmap then UNMAP_GRANT_REF releases them.  gntalloc:
ALLOC_GREF allocates and grants zeroed pages, mmap at the returned offset
gives us the memory, DEALLOC_GREF ends access (the kernel frees pages the
remote still maps once it unmaps them).  evtchn: one open of /dev/xen/evtchn
per Port, so each port has its own pollable fd; read() returns the pending
port, writing it back unmasks it.  Devices open on first use.

Pages are mapped with mmap(2) from the device's one fd into a region Python
owns (``_mman.map_pages``), not with ``mmap.mmap(fd)``, which dup()s the fd
for each mapping: a backend keeping a thousand persistent grants per ring
ran out of file descriptors (EMFILE) on real Xen.
"""
import array
import fcntl
import os
import select

from blkif.abi import ffi, lib
from blkif.abi.constants import GNTST_general_error, PAGE_SIZE
from blkif.errors import LocalProtocolError
from blkif.platform._mman import close_region, map_pages
from blkif.platform.base import GrantedPages, GrantRef, Mapping, Platform, Port
from blkif.platform.errors import EventChannelError, GrantError, PlatformUnavailable

_HINT = "modprobe xen-evtchn xen-gntdev xen-gntalloc; mount -t xenfs xenfs /proc/xen"
GNTALLOC_LIMIT = "/sys/module/xen_gntalloc/parameters/limit"


def _ioctl(fd, request, cdata):
    """ioctl(2) on a cffi struct pointer or char[] holding one (updated in
    place); returns the ioctl's integer result (a bound port, for evtchn)."""
    return fcntl.ioctl(fd, request, ffi.buffer(cdata), True)


def _port_number(port):
    return port.port if isinstance(port, Port) else int(port)


def _notify_action(clear_byte, port):
    return ((lib.UNMAP_NOTIFY_CLEAR_BYTE if clear_byte is not None else 0)
            | (lib.UNMAP_NOTIFY_SEND_EVENT if port is not None else 0))


class XenPlatform(Platform):
    """The devices of a real Xen domain (dom0 or a guest); ``domid`` is ours."""

    name = "xen"

    def __init__(self, domid=0, dev_dir="/dev/xen"):
        if not os.path.isdir(dev_dir):
            raise PlatformUnavailable(
                "%s does not exist: not running on Xen, or the Xen device modules are "
                "not loaded (%s)" % (dev_dir, _HINT))
        self.domid, self.dev_dir = int(domid), dev_dir
        self._fds = {}
        self._objects = set()
        self._closed = False

    def _device(self, name):
        if self._closed:
            raise LocalProtocolError("platform is closed")
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = self.open_device(name)
        return fd

    def open_device(self, name):
        """A new fd of /dev/xen/``name``; PlatformUnavailable if it cannot open."""
        path = os.path.join(self.dev_dir, name)
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise PlatformUnavailable("cannot open %s: %s (%s)"
                                      % (path, exc.strerror, _HINT)) from None

    # -- grants (gntalloc) --------------------------------------------------

    def grant_pages(self, remote_domid, count, readonly=False):
        if not 0 < count <= 0xFFFF:
            raise LocalProtocolError("grant count must be 1..65535")
        fd = self._device("gntalloc")
        size = ffi.sizeof("struct ioctl_gntalloc_alloc_gref") + 4 * (count - 1)
        raw = ffi.new("char[]", size)
        op = ffi.cast("struct ioctl_gntalloc_alloc_gref *", raw)
        op.domid, op.count = remote_domid, count
        op.flags = 0 if readonly else lib.GNTALLOC_FLAG_WRITABLE
        try:
            _ioctl(fd, lib.IOCTL_GNTALLOC_ALLOC_GREF, raw)
        except OSError as exc:  # ENOSPC: past gntalloc's limit (1024 grants by default)
            raise GrantError(GNTST_general_error, "gntalloc of %d pages for d%d: %s (limit in "
                             "%s)" % (count, remote_domid, exc.strerror, GNTALLOC_LIMIT)) from None
        ids = op.gref_ids + 0  # pointer: the array runs past its declared [1]
        refs = [ids[i] for i in range(count)]
        index = op.index
        try:
            region = map_pages(fd, _page_offsets(index, count), writable=True)
        except OSError:
            _dealloc(fd, index, count)
            raise
        pages = XenGrantedPages(self, fd, index, int(remote_domid), refs, readonly, region)
        self._objects.add(pages)
        return pages

    # -- mapping (gntdev) ---------------------------------------------------

    def map_grants(self, remote_domid, refs, writable=True):
        fd = self._device("gntdev")
        refs = [int(r) for r in refs]
        count = len(refs)
        if not count:
            raise LocalProtocolError("map_grants needs at least one ref")
        size = ffi.sizeof("struct ioctl_gntdev_map_grant_ref") + 8 * (count - 1)
        raw = ffi.new("char[]", size)
        op = ffi.cast("struct ioctl_gntdev_map_grant_ref *", raw)
        op.count = count
        entries = op.refs + 0
        for i, ref in enumerate(refs):
            entries[i].domid, entries[i].ref = remote_domid, ref
        _ioctl(fd, lib.IOCTL_GNTDEV_MAP_GRANT_REF, raw)
        index = op.index
        try:
            region = map_pages(fd, _page_offsets(index, count), writable)
        except OSError as exc:
            _unmap_grant_ref(fd, index, count)
            # gntdev logs each GNTST_* status; userspace only sees the errno.
            raise GrantError(GNTST_general_error, "gntdev mmap of d%d refs %s: %s"
                             % (remote_domid, refs, exc.strerror)) from None
        mapping = XenMapping(self, fd, index, int(remote_domid), refs, writable, region)
        self._objects.add(mapping)
        return mapping

    def grant_device(self):
        return self._device("gntdev")

    def grant_copy(self, ops):
        fd = self._device("gntdev")
        ops = list(ops)
        segments = ffi.new("struct gntdev_grant_copy_segment[]", len(ops))
        keep = []  # cffi views of local buffers, alive until the ioctl returns
        for seg, op in zip(segments, ops):
            for name, side, flag in (("source", op.source, lib.GNTCOPY_source_gref),
                                     ("dest", op.dest, lib.GNTCOPY_dest_gref)):
                end = getattr(seg, name)
                if isinstance(side, GrantRef):
                    end.foreign.ref, end.foreign.offset = side.ref, side.offset
                    end.foreign.domid = side.domid
                    seg.flags |= flag
                else:
                    view = ffi.from_buffer(side.buffer, require_writable=(name == "dest"))
                    keep.append(view)
                    end.virt = ffi.cast("char *", view) + side.offset
            seg.len = op.length
        copy = ffi.new("struct ioctl_gntdev_grant_copy *")
        copy.count, copy.segments = len(ops), segments
        _ioctl(fd, lib.IOCTL_GNTDEV_GRANT_COPY, copy)
        for view in keep:
            ffi.release(view)
        return [seg.status for seg in segments]

    # -- event channels -----------------------------------------------------

    def evtchn_alloc_unbound(self, remote_domid):
        fd = self._port_fd()
        op = ffi.new("struct ioctl_evtchn_bind_unbound_port *", {"remote_domain": remote_domid})
        return self._bound(fd, lib.IOCTL_EVTCHN_BIND_UNBOUND_PORT, op, remote_domid)

    def evtchn_bind_interdomain(self, remote_domid, remote_port):
        fd = self._port_fd()
        op = ffi.new("struct ioctl_evtchn_bind_interdomain *",
                     {"remote_domain": remote_domid, "remote_port": remote_port})
        return self._bound(fd, lib.IOCTL_EVTCHN_BIND_INTERDOMAIN, op, remote_domid)

    def _port_fd(self):
        if self._closed:
            raise LocalProtocolError("platform is closed")
        fd = self.open_device("evtchn")
        os.set_blocking(fd, False)
        return fd

    def _bound(self, fd, request, op, remote_domid):
        try:
            port = _ioctl(fd, request, op)
        except OSError as exc:
            os.close(fd)
            raise EventChannelError(exc.errno, "d%d: %s" % (remote_domid, exc.strerror)) from None
        port = XenPort(self, fd, port, int(remote_domid))
        self._objects.add(port)
        return port

    def close(self):
        if self._closed:
            return
        for obj in list(self._objects):
            try:
                obj.close()
            except (OSError, LocalProtocolError):
                pass  # closing the device fds below releases it in the kernel
        self._closed = True
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _page_offsets(index, count):
    return [index + i * PAGE_SIZE for i in range(count)]


def _dealloc(fd, index, count):
    op = ffi.new("struct ioctl_gntalloc_dealloc_gref *", {"index": index, "count": count})
    _ioctl(fd, lib.IOCTL_GNTALLOC_DEALLOC_GREF, op)


def _unmap_grant_ref(fd, index, count):
    op = ffi.new("struct ioctl_gntdev_unmap_grant_ref *", {"index": index, "count": count})
    _ioctl(fd, lib.IOCTL_GNTDEV_UNMAP_GRANT_REF, op)


class XenGrantedPages(GrantedPages):
    def __init__(self, platform, fd, index, remote_domid, refs, readonly, region):
        self._platform, self._fd, self._index = platform, fd, index
        self.remote_domid, self.refs, self.readonly = remote_domid, refs, readonly
        self._region, self._view = region, memoryview(region)
        self._ended = False

    @property
    def buffer(self):
        return self._view

    def set_unmap_notify(self, clear_byte=None, port=None):
        op = ffi.new("struct ioctl_gntalloc_unmap_notify *")
        op.index = self._index + (clear_byte or 0)
        op.action = _notify_action(clear_byte, port)
        op.event_channel_port = _port_number(port) if port is not None else 0
        _ioctl(self._fd, lib.IOCTL_GNTALLOC_SET_UNMAP_NOTIFY, op)

    def end_access(self):
        """DEALLOC_GREF.  Always True: gntalloc does not tell userspace whether
        the remote still maps a page; the kernel defers those frees itself."""
        if not self._ended:
            self._ended = True
            _dealloc(self._fd, self._index, len(self.refs))
        return True

    def close(self):
        self.end_access()
        if not self._region.closed:
            close_region(self)
        self._platform._objects.discard(self)


class XenMapping(Mapping):
    def __init__(self, platform, fd, index, domid, refs, writable, region):
        self._platform, self._fd, self._index = platform, fd, index
        self.domid, self.refs, self.writable = domid, refs, writable
        self._region, self._view = region, memoryview(region)

    @property
    def buffer(self):
        return self._view

    def set_unmap_notify(self, clear_byte=None, port=None):
        if clear_byte is not None and not self.writable:
            raise LocalProtocolError("gntdev clears a notify byte only in a writable mapping")
        op = ffi.new("struct ioctl_gntdev_unmap_notify *")
        op.index = self._index + (clear_byte or 0)
        op.action = _notify_action(clear_byte, port)
        op.event_channel_port = _port_number(port) if port is not None else 0
        _ioctl(self._fd, lib.IOCTL_GNTDEV_SET_UNMAP_NOTIFY, op)

    def unmap(self):
        if self._region.closed:
            return
        close_region(self)
        _unmap_grant_ref(self._fd, self._index, len(self.refs))
        self._platform._objects.discard(self)


class XenPort(Port):
    """A port on its own /dev/xen/evtchn fd (non-blocking).  Xen drops a
    notify to a closed peer silently, so ``notify`` cannot raise
    EventChannelClosed here."""

    transport = "evtchn"

    def __init__(self, platform, fd, port, remote_domid):
        self._platform, self._fd = platform, fd
        self.port, self.remote_domid = port, remote_domid
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def _live(self):
        if self._fd < 0:
            raise LocalProtocolError("event channel port %d is closed" % self.port)
        return self._fd

    def notify(self):
        op = ffi.new("struct ioctl_evtchn_notify *", {"port": self.port})
        try:
            _ioctl(self._live(), lib.IOCTL_EVTCHN_NOTIFY, op)
        except OSError as exc:
            raise EventChannelError(exc.errno, "notify port %d" % self.port) from None

    def clear(self):
        fd = self._live()
        try:
            data = os.read(fd, 4 * 64)
        except BlockingIOError:
            return False
        pending = array.array("I", data[:len(data) // 4 * 4])
        if pending:
            os.write(fd, array.array("I", [self.port]).tobytes())  # unmask: re-arm
        return self.port in pending

    def fileno(self):
        return self._live()

    def close(self):
        if self._fd < 0:
            return
        op = ffi.new("struct ioctl_evtchn_unbind *", {"port": self.port})
        try:
            _ioctl(self._fd, lib.IOCTL_EVTCHN_UNBIND, op)
        except OSError:
            pass  # closing the fd below unbinds it anyway
        finally:
            os.close(self._fd)
            self._fd = -1
            self._platform._objects.discard(self)
