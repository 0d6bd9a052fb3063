"""Backing stores: the raw image file or block device behind a VBD.

Reads and writes go straight between the device and the caller's buffers
(mapped grant pages) with ``preadv``/``pwritev``: no copies, at most IOV_MAX
buffers a call.  ``flush`` is ``fdatasync``; once one has failed, every later
flush fails too (the writes it lost stay lost: QEMU's file-posix does the
same), shared with the C engine through ``flush_failed``.  ``discard``
punches a hole in a file (reads back as zeros, size kept) or issues
BLKDISCARD (BLKSECDISCARD when secure, offered where the device has it) on a
device.  Sizes are the device's own: ``logical_block_size`` (4096 on 4K-sector
storage) and ``physical_block_size``; ``sectors`` counts 512-byte units.
"""
import ctypes
import errno
import fcntl
import logging
import os
import re
import stat
import struct

from blkif.abi import ffi
from blkif.abi.constants import SECTOR_SIZE
from blkif.errors import BlkifError

log = logging.getLogger(__name__)

# <linux/fs.h>: _IO(0x12, 119), _IO(0x12, 125), _IOR(0x12, 114, size_t), _IO(0x12, 104)
BLKDISCARD = 0x1277
BLKSECDISCARD = 0x127D
BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKPBSZGET = 0x127B
BLKROGET = 0x125E

IOV_MAX = os.sysconf("SC_IOV_MAX")
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


class StoreError(BlkifError):
    """The backing store cannot be opened or used as asked."""


def _ioctl_u64(fd, request):
    buf = bytearray(8)
    fcntl.ioctl(fd, request, buf)
    return struct.unpack("<Q", buf)[0]


def _ioctl_int(fd, request):
    buf = bytearray(4)
    fcntl.ioctl(fd, request, buf)
    return struct.unpack("<i", buf)[0]


def _punches_holes(fd, size):
    """Can the file's filesystem punch holes?  Probed past the end of the file,
    which changes nothing; 9p and NFSv3 cannot (EOPNOTSUPP)."""
    return _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, size, SECTOR_SIZE) == 0


def _device_discard_limits(rdev, sysfs="/sys/dev/block"):
    """The discard limits sysfs shows for a block device ({} if unreadable):
    its queue's ``discard_max_bytes`` and ``discard_granularity``, and the
    device's own ``discard_alignment`` (a partition's offset into a granule)."""
    device = "%s/%d:%d" % (sysfs, os.major(rdev), os.minor(rdev))
    out = {}
    for name in ("queue/discard_max_bytes", "queue/discard_granularity", "discard_alignment"):
        try:
            with open(os.path.join(device, name)) as f:
                out[os.path.basename(name)] = int(f.read())
        except (OSError, ValueError):
            pass
    return out


def _secure_erase_supported(fd):
    """Does the device take BLKSECDISCARD?  Asked with a misaligned range,
    which Linux 5.19+ answers EOPNOTSUPP when it cannot, else EINVAL, before
    touching anything (older kernels check the range first: not asked)."""
    if tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2]) < (5, 19):
        return False
    try:
        fcntl.ioctl(fd, BLKSECDISCARD, struct.pack("QQ", 1, SECTOR_SIZE))
    except OSError as exc:
        return exc.errno == errno.EINVAL
    return False  # not reached: a misaligned range is refused


class Store:
    """An open backing store.  ``path`` is a regular file or a block device.

    ``writable=False`` opens it read-only (``mode=r``).  ``direct=True`` uses
    O_DIRECT; granted pages are page-aligned, so every blkif transfer is
    aligned enough.  Raises StoreError naming the path and the reason.
    """

    lent = False  # only an NBD store lends its connection to the engine

    def __init__(self, path, writable=True, direct=False):
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(path, flags)
        except OSError as exc:
            raise StoreError("cannot open backing store %s: %s" % (path, exc.strerror)) from None
        self.path = path
        self.writable = writable
        self.direct = direct
        self.flush_failed = ffi.new("int *")  # set by a failed flush, here or in C
        mode = os.fstat(self.fd).st_mode
        self.is_device = stat.S_ISBLK(mode)
        if self.is_device:
            self.size = self.current_size()
            self.logical_block_size = _ioctl_int(self.fd, BLKSSZGET)
            self.physical_block_size = _ioctl_int(self.fd, BLKPBSZGET)
            if writable and _ioctl_int(self.fd, BLKROGET):
                self.close()
                raise StoreError("block device %s is read-only" % path)
        elif stat.S_ISREG(mode):
            self.size = self.current_size()
            self.logical_block_size = SECTOR_SIZE
            self.physical_block_size = SECTOR_SIZE
        else:
            self.close()
            raise StoreError("backing store %s is neither a file nor a block device" % path)
        self.sectors = self.size // SECTOR_SIZE
        # Files: hole punching, offered only where the filesystem can (blkback
        # too offers discard only when the device has it; otherwise blkfront's
        # mkfs.ext4 and every later discard get EOPNOTSUPP), in the
        # filesystem's blocks.  Devices: what their queue says.
        self.discard_alignment = 0
        self.discard_secure = False
        if self.is_device:
            limits = _device_discard_limits(os.fstat(self.fd).st_rdev)
            self.discard_supported = writable and limits.get("discard_max_bytes", 0) > 0
            self.discard_granularity = limits.get("discard_granularity") or self.logical_block_size
            self.discard_alignment = limits.get("discard_alignment", 0)
            self.discard_secure = self.discard_supported and _secure_erase_supported(self.fd)
        else:
            self.discard_supported = writable and _punches_holes(self.fd, self.size)
            self.discard_granularity = max(os.fstatvfs(self.fd).f_frsize, SECTOR_SIZE)

    def current_size(self):
        """The size in bytes the file or device has now (it may have grown)."""
        if self.is_device:
            return _ioctl_u64(self.fd, BLKGETSIZE64)
        return os.fstat(self.fd).st_size

    def readv(self, buffers, offset):
        """Fill ``buffers`` from ``offset``.

        Requests are bounded by ``sectors``, so a short read means the store
        shrank under us: raise EIO rather than return stale bytes.
        """
        for at in range(0, len(buffers), IOV_MAX):
            chunk = buffers[at:at + IOV_MAX]
            want = sum(len(b) for b in chunk)
            if os.preadv(self.fd, chunk, offset) < want:
                raise OSError(errno.EIO, "short read at %d from %s" % (offset, self.path))
            offset += want

    def writev(self, buffers, offset):
        """Write every byte of ``buffers`` at ``offset``."""
        for at in range(0, len(buffers), IOV_MAX):
            offset += self._write_all(buffers[at:at + IOV_MAX], offset)

    def _write_all(self, buffers, offset):
        want = sum(len(b) for b in buffers)
        done = os.pwritev(self.fd, buffers, offset)
        while done < want:  # rare: retry the rest
            rest, skip = [], done
            for buf in buffers:
                n = len(buf)
                if skip >= n:
                    skip -= n
                    continue
                rest.append(memoryview(buf).cast("B")[skip:])
                skip = 0
            done += os.pwritev(self.fd, rest, offset + done)
        return want

    def flush(self):
        if self.flush_failed[0]:
            raise OSError(errno.EIO, "an earlier flush of %s failed" % self.path)
        try:
            os.fdatasync(self.fd)
        except OSError:
            self.flush_failed[0] = 1
            raise

    def discard(self, offset, length, secure=False):
        """Deallocate a range; it reads back as zeros (files and most devices)."""
        if self.is_device:
            fcntl.ioctl(self.fd, BLKSECDISCARD if secure else BLKDISCARD,
                        struct.pack("QQ", offset, length))
            return
        if secure:
            raise OSError(errno.EOPNOTSUPP, "secure discard on a file")
        if _libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                           offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
