"""The xen platform without Xen: a clear error, and the ioctls it would issue.

No /dev/xen here, so the devices are played by regular files (which mmap and
read like the real ones) and ``fcntl.ioctl`` by a fake that decodes each
request with ``struct`` at the uapi offsets, answers as the kernel would,
and records it.  The real devices are exercised in the QEMU lab.
"""
import fcntl
import struct

import pytest

from blkif.abi import ffi, lib
from blkif.abi.constants import GNTST_okay, PAGE_SIZE
from blkif.errors import BlkifError
from blkif.platform import CopyOp, GrantRef, Local, PlatformUnavailable, open_platform


def test_opening_without_dev_xen_is_a_clear_error(tmp_path):
    with pytest.raises(PlatformUnavailable, match="modprobe") as info:
        open_platform("xen", dev_dir=str(tmp_path / "no-such-dir"))
    assert isinstance(info.value, BlkifError)
    platform = open_platform("xen", dev_dir=str(tmp_path))  # the directory alone
    with pytest.raises(PlatformUnavailable, match="gntdev"):
        platform.map_grants(1, [8])
    with pytest.raises(PlatformUnavailable, match="evtchn"):
        platform.evtchn_alloc_unbound(1)
    platform.close()


class FakeKernel:
    """Answers the ioctls the way gntdev, gntalloc and evtchn do."""

    def __init__(self):
        self.calls = []
        self.next_index = 0

    def _index(self, count):
        index, self.next_index = self.next_index, self.next_index + count * PAGE_SIZE
        return index

    def ioctl(self, fd, request, buf, mutate=True):
        mem = memoryview(buf).cast("B")
        if request == lib.IOCTL_GNTDEV_MAP_GRANT_REF:
            (count,) = struct.unpack_from("=I", mem, 0)
            refs = [struct.unpack_from("=II", mem, 16 + 8 * i) for i in range(count)]
            struct.pack_into("=Q", mem, 8, self._index(count))
            self.calls.append(("map", refs))
        elif request == lib.IOCTL_GNTDEV_UNMAP_GRANT_REF:
            self.calls.append(("unmap",) + struct.unpack_from("=QI", mem, 0))
        elif request in (lib.IOCTL_GNTDEV_SET_UNMAP_NOTIFY, lib.IOCTL_GNTALLOC_SET_UNMAP_NOTIFY):
            self.calls.append(("notify",) + struct.unpack_from("=QII", mem, 0))
        elif request == lib.IOCTL_GNTALLOC_ALLOC_GREF:
            domid, flags, count = struct.unpack_from("=HHI", mem, 0)
            struct.pack_into("=Q", mem, 8, self._index(count))
            for i in range(count):
                struct.pack_into("=I", mem, 16 + 4 * i, 100 + i)
            self.calls.append(("alloc", domid, flags, count))
        elif request == lib.IOCTL_GNTALLOC_DEALLOC_GREF:
            self.calls.append(("dealloc",) + struct.unpack_from("=QI", mem, 0))
        elif request == lib.IOCTL_GNTDEV_GRANT_COPY:
            count, address = struct.unpack_from("=I4xQ", mem, 0)
            segments = ffi.cast("struct gntdev_grant_copy_segment *", address)
            for i in range(count):
                seg = segments[i]
                self.calls.append(("copy", seg.flags, seg.len, seg.source.foreign.ref,
                                   seg.source.foreign.domid, seg.source.foreign.offset))
                ffi.memmove(seg.dest.virt, b"copied"[:seg.len], seg.len)
                seg.status = GNTST_okay
        elif request == lib.IOCTL_EVTCHN_BIND_UNBOUND_PORT:
            self.calls.append(("unbound",) + struct.unpack_from("=I", mem, 0))
            return 42
        elif request == lib.IOCTL_EVTCHN_BIND_INTERDOMAIN:
            self.calls.append(("bind",) + struct.unpack_from("=II", mem, 0))
            return 43
        elif request in (lib.IOCTL_EVTCHN_NOTIFY, lib.IOCTL_EVTCHN_UNBIND):
            name = "notify" if request == lib.IOCTL_EVTCHN_NOTIFY else "unbind"
            self.calls.append((name,) + struct.unpack_from("=I", mem, 0))
        else:
            raise OSError(25, "unexpected ioctl %#x" % request)
        return 0


@pytest.fixture
def fake(tmp_path, monkeypatch):
    for name in ("gntdev", "gntalloc"):
        (tmp_path / name).write_bytes(bytes(64 * PAGE_SIZE))
    (tmp_path / "evtchn").write_bytes(struct.pack("=I", 42))  # port 42 is pending
    kernel = FakeKernel()
    monkeypatch.setattr(fcntl, "ioctl", kernel.ioctl)
    with open_platform("xen", dev_dir=str(tmp_path)) as platform:
        yield platform, kernel, tmp_path


def test_map_grants_issues_map_mmap_and_unmap(fake):
    platform, kernel, devices = fake
    mapping = platform.map_grants(5, [8, 9, 10])
    assert kernel.calls == [("map", [(5, 8), (5, 9), (5, 10)])]
    assert len(mapping.buffer) == 3 * PAGE_SIZE and not mapping.buffer.readonly
    mapping.buffer[PAGE_SIZE] = 0x5A  # lands at the mmap offset gntdev returned
    mapping.set_unmap_notify(clear_byte=PAGE_SIZE + 1, port=7)
    assert kernel.calls[-1] == ("notify", PAGE_SIZE + 1, 3, 7)
    mapping.unmap()
    assert kernel.calls[-1] == ("unmap", 0, 3)
    assert (devices / "gntdev").read_bytes()[PAGE_SIZE] == 0x5A
    readonly = platform.map_grants(5, [11], writable=False)
    assert readonly.buffer.readonly
    readonly.unmap()
    assert kernel.calls[-1] == ("unmap", 3 * PAGE_SIZE, 1)


def test_mappings_take_no_file_descriptor_each(fake):
    """mmap.mmap(fd) would dup the device fd per mapping: a backend with a
    thousand persistent grants per ring hit EMFILE on real Xen."""
    import os

    platform, kernel, _ = fake
    platform.map_grants(5, [1]).unmap()  # the device is open from here on
    before = len(os.listdir("/proc/self/fd"))
    mappings = [platform.map_grants(5, [i]) for i in range(40)]
    pages = [platform.grant_pages(0, 1) for _ in range(10)]
    assert len(os.listdir("/proc/self/fd")) == before + 1  # gntalloc's own fd
    for m in mappings:
        m.unmap()
    for p in pages:
        p.close()


def test_grant_pages_issues_alloc_and_dealloc(fake):
    platform, kernel, _ = fake
    pages = platform.grant_pages(0, 2)
    assert kernel.calls == [("alloc", 0, lib.GNTALLOC_FLAG_WRITABLE, 2)]
    assert pages.refs == [100, 101]
    pages.set_unmap_notify(clear_byte=5, port=9)
    assert kernel.calls[-1] == ("notify", 5, 3, 9)
    assert pages.end_access() is True
    assert kernel.calls[-1] == ("dealloc", 0, 2)
    pages.close()
    readonly = platform.grant_pages(3, 1, readonly=True)
    assert kernel.calls[-1] == ("alloc", 3, 0, 1)
    readonly.close()


def test_gntalloc_past_its_limit_is_a_grant_error(fake, monkeypatch):
    import errno

    from blkif.platform import GrantError

    def refuse(fd, request, buf, mutate=True):
        raise OSError(errno.ENOSPC, "No space left on device")

    platform, _, _ = fake
    monkeypatch.setattr(fcntl, "ioctl", refuse)
    with pytest.raises(GrantError, match="gntalloc of 2000 pages.*parameters/limit"):
        platform.grant_pages(0, 2000)


def test_grant_copy_fills_segments(fake):
    platform, kernel, _ = fake
    local = bytearray(8)
    assert platform.grant_copy([CopyOp(GrantRef(4, 12, 100), Local(local, 2), 6)]) == [0]
    assert kernel.calls == [("copy", lib.GNTCOPY_source_gref, 6, 12, 4, 100)]
    assert bytes(local) == b"\0\0copied"


def test_event_channel_ports(fake):
    platform, kernel, devices = fake
    port = platform.evtchn_alloc_unbound(2)
    assert port.port == 42 and kernel.calls == [("unbound", 2)]
    port.notify()
    assert kernel.calls[-1] == ("notify", 42)
    assert port.clear() is True  # read port 42, then wrote it back to unmask
    assert (devices / "evtchn").read_bytes() == struct.pack("=II", 42, 42)
    bound = platform.evtchn_bind_interdomain(2, 17)
    assert bound.port == 43 and kernel.calls[-1] == ("bind", 2, 17)
    port.close()
    assert ("unbind", 42) in kernel.calls
