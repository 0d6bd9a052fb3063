"""A disk with a volatile write cache, for the power-cut model.

A FUSE filesystem (libfuse 3 through ``mfusepy``) with one file,
``disk.img``, over a backing file.  Writes to ``disk.img`` stay in this
process's memory, as in a disk's write cache, until an fsync or fdatasync
writes them to the backing file and syncs it.  Writing a seed (decimal
text) to ``.powercut`` cuts the power: a random half of the cached sectors
(chosen by the seed: a real disk may have written any of them back) reach
the backing file, the rest are lost.  Reading ``.powercut`` gives the
counters: ``writes syncs cuts sectors_lost``.

Mounted with ``direct_io``, so the kernel caches nothing of the file above
us and the first read after a cut sees what survived.  ``--lying`` makes
fsync a no-op, a disk that acknowledges flushes it never did: the harness
must catch it.

``python -m blkif.crash.volatile BACKING MOUNTPOINT [--lying]`` serves in
the foreground until unmounted or sent SIGTERM.
"""
import argparse
import errno
import logging
import os
import random
import stat
import subprocess
import sys
import threading
import time

SECTOR = 512
IMAGE, CONTROL = "/disk.img", "/.powercut"
MOUNT_TIMEOUT = 10.0


class VolatileCache:
    """``disk.img``'s bytes: the backing file under a cache of whole sectors
    that only :meth:`sync` makes durable and :meth:`cut` partly loses."""

    def __init__(self, backing_fd, lying=False):
        self.fd, self.lying = backing_fd, lying
        self.size = os.fstat(backing_fd).st_size
        self.cached = {}  # sector -> SECTOR bytes not yet in the backing file
        self.lock = threading.Lock()
        self.writes = self.syncs = self.cuts = self.lost = 0

    def _sector(self, s):
        data = self.cached.get(s)
        return data if data is not None else os.pread(self.fd, SECTOR, s * SECTOR)

    def read(self, offset, size):
        with self.lock:
            size = max(0, min(size, self.size - offset))
            first, last = offset // SECTOR, (offset + size + SECTOR - 1) // SECTOR
            if not any(s in self.cached for s in range(first, last)):
                return os.pread(self.fd, size, offset)
            data = b"".join(self._sector(s) for s in range(first, last))
            start = offset - first * SECTOR
            return data[start:start + size]

    def write(self, offset, data):
        if offset + len(data) > self.size:
            raise OSError(errno.ENOSPC, "past the end of the disk")
        with self.lock:
            self.writes += 1
            end = offset + len(data)
            for s in range(offset // SECTOR, (end + SECTOR - 1) // SECTOR):
                lo, hi = max(offset, s * SECTOR), min(end, (s + 1) * SECTOR)
                if hi - lo == SECTOR:
                    self.cached[s] = bytes(data[lo - offset:hi - offset])
                else:  # part of a sector: the rest comes from what it holds now
                    sector = bytearray(self._sector(s))
                    sector[lo - s * SECTOR:hi - s * SECTOR] = data[lo - offset:hi - offset]
                    self.cached[s] = bytes(sector)
            return len(data)

    def sync(self):
        with self.lock:
            self.syncs += 1
            if self.lying:
                return
            self._write_back(self.cached)
            self.cached.clear()

    def cut(self, seed):
        """The power goes: a seeded half of the cache reaches the disk, the rest is lost."""
        with self.lock:
            rng = random.Random(seed)
            kept = {s: d for s, d in sorted(self.cached.items()) if rng.random() < 0.5}
            self._write_back(kept)
            self.cuts += 1
            self.lost += len(self.cached) - len(kept)
            self.cached.clear()

    def _write_back(self, sectors):
        for s, data in sectors.items():
            os.pwrite(self.fd, data, s * SECTOR)
        os.fdatasync(self.fd)

    def counters(self):
        return b"%d %d %d %d\n" % (self.writes, self.syncs, self.cuts, self.lost)


def operations(cache):
    """The filesystem's operations over ``cache`` (an ``mfusepy.Operations``)."""
    import mfusepy

    class Filesystem(mfusepy.Operations):
        use_ns = True

        def getattr(self, path, fh=None):
            if path == "/":
                return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
            if path == IMAGE:
                return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": cache.size}
            if path == CONTROL:
                return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": 0}
            raise mfusepy.FuseOSError(errno.ENOENT)

        def readdir(self, path, fh):
            return [".", "..", IMAGE[1:], CONTROL[1:]]

        def open(self, path, flags):
            self.getattr(path)
            return 0

        def read(self, path, size, offset, fh):
            if path == CONTROL:
                return cache.counters()[offset:offset + size]
            return cache.read(offset, size)

        def write(self, path, data, offset, fh):
            if path == CONTROL:
                try:
                    cache.cut(int(data.decode().strip() or "0"))
                except ValueError:
                    raise mfusepy.FuseOSError(errno.EINVAL) from None
                return len(data)
            try:
                return cache.write(offset, data)
            except OSError as exc:
                raise mfusepy.FuseOSError(exc.errno) from None

        def truncate(self, path, length, fh=None):
            if path == CONTROL or length == cache.size:
                return 0
            raise mfusepy.FuseOSError(errno.EPERM)  # a disk's size is fixed

        def fsync(self, path, datasync, fh):
            if path == IMAGE:
                cache.sync()
            return 0

    return Filesystem()


class VolatileDisk:
    """This filesystem in a child process over ``backing`` (made blank of
    ``size`` bytes), mounted on ``mountpoint``; a context manager.  ``image``
    is the disk's path for a VBD, :meth:`cut` the power switch."""

    def __init__(self, backing, mountpoint, size, lying=False):
        self.backing, self.mountpoint = backing, mountpoint
        self.image = os.path.join(mountpoint, IMAGE[1:])
        with open(backing, "wb") as f:
            f.truncate(size)
        os.makedirs(mountpoint, exist_ok=True)
        argv = [sys.executable, "-m", "blkif.crash.volatile", backing, mountpoint]
        self.log = open(backing + ".log", "wb")
        self.proc = subprocess.Popen(argv + (["--lying"] if lying else []),
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.exists(self.image):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                with open(backing + ".log", errors="replace") as f:
                    raise OSError("the volatile disk did not mount on %s: %s"
                                  % (mountpoint, f.read().strip() or "no output"))
            time.sleep(0.02)

    def cut(self, seed):
        """Cut the power: the cache's unsynced sectors reach the disk or not, by ``seed``."""
        with open(os.path.join(self.mountpoint, CONTROL[1:]), "w") as f:
            f.write("%d" % seed)

    def counters(self):
        """writes, syncs, cuts and sectors lost so far."""
        with open(os.path.join(self.mountpoint, CONTROL[1:])) as f:
            return dict(zip(("writes", "syncs", "cuts", "sectors_lost"),
                            map(int, f.read().split())))

    def durable(self):
        """The backing file's bytes: what the disk holds after a cut."""
        with open(self.backing, "rb") as f:
            return f.read()

    def close(self):
        if self.proc.poll() is None:
            subprocess.run(["umount", "-l", self.mountpoint], stderr=subprocess.DEVNULL)
            try:
                self.proc.wait(MOUNT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m blkif.crash.volatile",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("backing", help="the disk's durable bytes (a file; its size is the disk's)")
    parser.add_argument("mountpoint")
    parser.add_argument("--lying", action="store_true",
                        help="acknowledge fsync without writing anything back")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    try:
        import mfusepy
        fd = os.open(args.backing, os.O_RDWR | os.O_CLOEXEC)
    except (ImportError, OSError) as exc:
        print("volatile: %s" % exc, file=sys.stderr)
        return 1
    cache = VolatileCache(fd, args.lying)
    try:
        mfusepy.FUSE(operations(cache), args.mountpoint, foreground=True, direct_io=True,
                     fsname="blkif-volatile")
    except RuntimeError as exc:  # mfusepy: the mount failed
        print("volatile: cannot mount %s: %s" % (args.mountpoint, exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
