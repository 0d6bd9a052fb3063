"""Mapping file pages into one contiguous region, owned by a Python ``mmap``.

The region is reserved with ``mmap.mmap`` (anonymous), then each run of pages
is placed over it with mmap(2) MAP_FIXED|MAP_SHARED from the file.  Closing
the ``mmap`` object unmaps everything, and Python refuses to close it while a
memoryview of it is alive, so a stale view cannot touch unmapped memory.
The region is read-only (PROT_READ, read-only memoryviews) unless writable.
"""
import mmap

from blkif.abi import ffi, lib
from blkif.abi.constants import PAGE_SIZE
from blkif.errors import LocalProtocolError


def _runs(offsets):
    """(first index, file offset, page count) for each run of consecutive pages."""
    start = 0
    for i in range(1, len(offsets) + 1):
        if i == len(offsets) or offsets[i] != offsets[i - 1] + PAGE_SIZE:
            yield start, offsets[start], i - start
            start = i


def address(buf):
    """The address of a buffer's first byte (the buffer stays owned by the caller)."""
    ptr = ffi.from_buffer(buf)
    try:
        return int(ffi.cast("uintptr_t", ptr))
    finally:
        ffi.release(ptr)


def map_pages(fd, offsets, writable):
    """An ``mmap`` of ``len(offsets)`` pages, page i from ``fd`` at ``offsets[i]``."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    region = mmap.mmap(-1, len(offsets) * PAGE_SIZE,
                       flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=prot)
    base = address(region)
    try:
        for index, offset, count in _runs(offsets):
            got = lib.mmap(ffi.cast("void *", base + index * PAGE_SIZE), count * PAGE_SIZE,
                           prot, lib.MAP_SHARED | lib.MAP_FIXED, fd, offset)
            if int(ffi.cast("intptr_t", got)) == -1:
                err = ffi.errno
                raise OSError(err, "mmap of %d pages at file offset %d failed" % (count, offset))
    except BaseException:
        region.close()
        raise
    return region


def close_region(obj):
    """Unmap ``obj._region``; refuse (leaving it usable) while the caller
    still holds memoryviews of it."""
    obj._view.release()
    try:
        obj._region.close()
    except BufferError:
        obj._view = memoryview(obj._region)
        raise LocalProtocolError(
            "release every memoryview of the pages before unmapping them") from None
