"""Our frontend against Linux's xen-blkback, run in dom0 by the lab.

    python -m blkif.lab.frontend_check --backend-domid 0 --target /dev/loopN [--seed N]

dom0 plays both ends: the kernel's xen-blkback serves ``--target`` and our
``BlockDevice`` is the frontend, granting through /dev/xen/gntalloc to
domain 0 and binding channels through /dev/xen/evtchn.  Xen lets a domain map
its own grants and bind an interdomain channel to itself, and blkback takes a
VBD whose ``frontend-id`` is its own domain (libxl's local attach does the
same), so nothing else is needed: no guest, no Python in a guest.

Steps (each prints ``LAB CHECK name pass|fail detail``, the lines the guests
print too, so ``blkif.lab.workload.parse_console`` reads both):

1. ``vbd``: the VBD's nodes as libxl writes them (``blkif.toolstack.create``)
   plus ``physical-device`` (``MAJOR:MINOR`` in hex, as the block hotplug
   script writes it), which makes blkback open the device.
2. ``attach``: ``BlockDevice.attach`` with no limits of ours, so we take what
   blkback offers; both directories are then printed as ``xenstore-ls -f``
   would, for the report.
3. ``fs``: an ext4 image made by the real ``mke2fs -d`` from 4 random files
   is written through the device, flushed and read back equal; on the target
   itself (what blkback wrote) ``e2fsck -fn`` is clean and ``debugfs`` dumps
   each file equal to its original.
4. ``discard``: 1 MiB of random data written and read back, discarded, read
   back as zeros through the device and from the target.
5. ``raw-write``/``raw-verify``: the lab's plan (4 KiB..1 MiB chunks at
   scattered offsets) written all at once over every queue, flushed, read
   back all at once, compared, and compared again on the target (O_DIRECT).
6. ``detach``: both ends Closed, nothing of ours still granted or bound; the
   VBD removed and blkback's device gone.

The last line sums up the negotiated values.  Exit status 0 only when every
check passed.
"""
import argparse
import fcntl
import hashlib
import mmap
import os
import subprocess
import sys
import tempfile
import time

from blkif.frontend import BlockDevice, FrontendOptions
from blkif.lab import workload
from blkif.platform import open_platform
from blkif.platform.xen import GNTALLOC_LIMIT
from blkif import toolstack
from xenstore import NoEntry, XenbusState, Xenstore

VDEV = "xvda"
CHUNK = 1 << 20
FS_FILES = (4096, 65536, 1 << 20, 3 << 20)
BLKFLSBUF = 0x1261  # <linux/fs.h> _IO(0x12, 97): drop the target's page cache
GRANTS_WANTED = 16384  # 2 queues x (16 ring + 512 pool + 512 indirect pages) and room
BLKBACK_STATS = ("rd_req", "wr_req", "f_req", "ds_req", "oo_req", "rd_sect", "wr_sect")


class Checks:
    """Prints each check as the guests do and remembers whether all passed."""

    def __init__(self, out=None):
        self.out = out  # None: sys.stdout at the time of each line
        self.failed = []

    def say(self, line):
        print(line, file=self.out or sys.stdout, flush=True)

    def check(self, name, passed, detail):
        self.say("LAB CHECK %s %s %s" % (name, "pass" if passed else "fail", detail))
        if not passed:
            self.failed.append(name)
        return passed


def dump_dir(xs, path):
    """``{path: value}`` of every node under ``path``, as ``xenstore-ls -f``."""
    nodes = {}
    try:
        value = xs.read_str(path)
    except NoEntry:
        return nodes
    nodes[path] = value
    for child in xs.list(path):
        nodes.update(dump_dir(xs, "%s/%s" % (path, child)))
    return nodes


def xenstore_ls(nodes):
    return "".join('%s = "%s"\n' % (path, value) for path, value in sorted(nodes.items()))


def raise_gntalloc_limit(path=GNTALLOC_LIMIT, wanted=GRANTS_WANTED):
    """gntalloc allows 1024 grants in all by default, less than two queues of
    blkback's largest rings need; raise it (root, dom0).  Returns the limit."""
    try:
        with open(path) as f:
            limit = int(f.read())
        if limit < wanted:
            with open(path, "w") as f:
                f.write(str(wanted))
            limit = wanted
        return limit
    except (OSError, ValueError):
        return None


def device_number(target):
    """``physical-device`` for ``target``: ``MAJOR:MINOR`` in hex, as the block
    hotplug script writes it.  Raises ValueError for a non-device."""
    st = os.stat(target)
    if not (st.st_mode & 0o170000) == 0o060000:
        raise ValueError("%s is not a block device" % target)
    return "%x:%x" % (os.major(st.st_rdev), os.minor(st.st_rdev))


class Target:
    """The device blkback serves, read directly (O_DIRECT, no page cache)."""

    def __init__(self, path):
        self.path = path

    def read(self, offset, length):
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, length)
        try:
            done = os.preadv(fd, [buf], offset)
            return bytes(buf[:done])
        finally:
            buf.close()
            os.close(fd)

    def drop_cache(self):
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, BLKFLSBUF, 0)
        finally:
            os.close(fd)


def wait_all(dev, handles, timeout):
    """Drive ``handles`` to completion; returns the errors (empty if none)."""
    dev.wait(handles, timeout)
    return [h.error or "no answer: %r" % h for h in handles if not h.done or h.error]


def md5(data):
    return hashlib.md5(data).hexdigest()


# -- the checks ---------------------------------------------------------------

def fs_check(checks, dev, target, tmp, timeout):
    """mke2fs -d image written through ``dev``, read back; fsck and files on the target."""
    t0 = time.monotonic()
    files = os.path.join(tmp, "files")
    os.makedirs(files)
    sums = {}
    for size in FS_FILES:
        data = os.urandom(size)
        sums["f%d" % size] = md5(data)
        with open(os.path.join(files, "f%d" % size), "wb") as f:
            f.write(data)
    image = os.path.join(tmp, "fs.img")
    with open(image, "wb") as f:
        f.truncate(dev.size)
    mkfs = subprocess.run(["/sbin/mke2fs", "-q", "-t", "ext4", "-F", "-d", files, image],
                          capture_output=True, text=True)
    if mkfs.returncode:
        return checks.check("fs", False, "mke2fs: %s" % mkfs.stderr.strip()[-200:])
    with open(image, "rb") as f:
        data = f.read()
    handles = [dev.submit_write(off, data[off:off + CHUNK]) for off in range(0, len(data), CHUNK)]
    errors = wait_all(dev, handles, timeout)
    if errors:
        return checks.check("fs", False, "writing the image: %s" % errors[0])
    dev.flush()
    reads = [dev.submit_read(off, CHUNK) for off in range(0, len(data), CHUNK)]
    errors = wait_all(dev, reads, timeout)
    if errors:
        return checks.check("fs", False, "reading the image back: %s" % errors[0])
    back = b"".join(h.data for h in reads)
    if back != data:
        return checks.check("fs", False, "image read back through the device differs")
    target.drop_cache()
    fsck = subprocess.run(["/sbin/e2fsck", "-fn", target.path], capture_output=True, text=True)
    if fsck.returncode:
        return checks.check("fs", False, "e2fsck -fn %s: rc %d %s" % (
            target.path, fsck.returncode, fsck.stdout.strip().splitlines()[-1:]))
    for name, digest in sorted(sums.items()):
        out = os.path.join(tmp, name + ".out")
        subprocess.run(["/sbin/debugfs", "-R", "dump /%s %s" % (name, out), target.path],
                       capture_output=True)
        with open(out, "rb") if os.path.exists(out) else open(os.devnull, "rb") as f:
            if md5(f.read()) != digest:
                return checks.check("fs", False, "%s on %s differs from what was written"
                                    % (name, target.path))
    return checks.check("fs", True, "ext4 of %d files (mke2fs -d) written, read back; %s: "
                        "fsck clean, files equal (%.1fs)" % (
                            len(sums), target.path, time.monotonic() - t0))


def discard_check(checks, dev, target, disk_bytes):
    offset, length = workload.discard_range(disk_bytes)
    data = os.urandom(length)
    dev.write(offset, data)
    if dev.read(offset, length) != data:
        return checks.check("discard", False, "write before discard not read back")
    dev.discard(offset, length)
    zeros = bytes(length)
    if dev.read(offset, length) != zeros:
        return checks.check("discard", False, "%d bytes at %d not zero after discard"
                            % (length, offset))
    if target.read(offset, length) != zeros:
        return checks.check("discard", False, "not zero on %s after discard" % target.path)
    return checks.check("discard", True, "%d bytes at %d read back as zeros (device and %s)"
                        % (length, offset, target.path))


def raw_checks(checks, dev, target, plan, timeout):
    t0 = time.monotonic()
    chunks = [(off, os.urandom(size)) for off, size in plan]
    handles = [dev.submit_write(off, data) for off, data in chunks]
    errors = wait_all(dev, handles, timeout)
    if errors:
        checks.check("raw-write", False, "%d of %d writes failed: %s"
                     % (len(errors), len(chunks), errors[0]))
        return
    dev.flush()
    checks.check("raw-write", True, "%d chunks of 4 KiB..1 MiB written at once over %d "
                 "queue(s), flushed (%.1fs)" % (len(chunks), dev.negotiated["queues"],
                                                 time.monotonic() - t0))
    t0 = time.monotonic()
    reads = [dev.submit_read(off, len(data)) for off, data in chunks]
    errors = wait_all(dev, reads, timeout)
    bad = [i for i, (h, (_, data)) in enumerate(zip(reads, chunks))
           if h.error or h.data != data]
    on_target = [i for i, (off, data) in enumerate(chunks) if target.read(off, len(data)) != data]
    for i, (off, data) in enumerate(chunks):
        checks.say("LAB MD5 %d %d %d %s" % (i, off, len(data), md5(data)))
    checks.check("raw-verify", not bad and not on_target and not errors,
                 "%d chunks read back at once and compared, %d differ; on %s %d differ (%.1fs)"
                 % (len(chunks), len(bad), target.path, len(on_target), time.monotonic() - t0))


def blkback_stats(domid, devid):
    """blkback's own counters for the VBD (sysfs), {} if it has none."""
    base = "/sys/bus/xen-backend/devices/vbd-%d-%d/statistics" % (domid, devid)
    out = {}
    for name in BLKBACK_STATS:
        try:
            with open(os.path.join(base, name)) as f:
                out[name] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return out


def takes_the_offer(neg, back):
    """What our device does not use of what blkback offered (empty: all of it)."""
    wanted = (("indirect_segments", int(back.get("feature-max-indirect-segments", 0))),
              ("ring_page_order", int(back.get("max-ring-page-order", 0))),
              ("queues", int(back.get("multi-queue-max-queues", 1))),
              ("persistent", back.get("feature-persistent") == "1"),
              ("flush", back.get("feature-flush-cache") == "1"),
              ("discard", back.get("feature-discard") == "1"))
    missing = ["we use %s %s, offered %s" % (k, neg.get(k), v)
               for k, v in wanted if neg.get(k) != v]
    offered = dict(wanted)
    if not (offered["persistent"] and offered["indirect_segments"] > 11
            and offered["ring_page_order"] >= 1 and offered["queues"] >= 2):
        missing.append("blkback offers too little to prove anything: %s" % (offered,))
    return missing


def summary(back, front):
    """One line: what blkback offered and what we wrote, read back from xenstore."""
    return ("blkback: indirect %s, max-ring-page-order %s, max-queues %s, persistent %s, "
            "flush %s, discard %s; ours: ring-page-order %s, queues %s, rings %s, persistent %s"
            % (back.get("feature-max-indirect-segments"), back.get("max-ring-page-order"),
               back.get("multi-queue-max-queues"), back.get("feature-persistent"),
               back.get("feature-flush-cache"), back.get("feature-discard"),
               front.get("ring-page-order", "0"), front.get("multi-queue-num-queues", "1"),
               front.get("rings"), front.get("feature-persistent")))


def run(args, checks):
    backend_domid = args.backend_domid
    domid = args.domid
    target = Target(args.target)
    limit = raise_gntalloc_limit()
    checks.say("LAB VALUE gntalloc_limit=%s" % limit)
    with Xenstore.open() as xs, open_platform("xen", domid=domid) as platform:
        devid = toolstack.vdev_to_devid(args.vdev)
        back = toolstack.backend_path(backend_domid, domid, devid)
        front = toolstack.frontend_path(domid, devid)
        for path in (front, back):  # a run that died before its cleanup
            if xs.exists(path):
                xs.rm(path)
        toolstack.create(xs, domid, args.vdev, args.target, "w", backend_domid)
        xs.write(back + "/physical-device", device_number(args.target))
        checks.check("vbd", True, "%s -> %s (physical-device %s)" % (
            front, back, device_number(args.target)))
        dev = None
        try:
            t0 = time.monotonic()
            options = FrontendOptions(timeout=args.timeout)
            dev = BlockDevice.attach(xs, platform, domid, devid, options=options)
            nodes = dump_dir(xs, back)
            nodes.update(dump_dir(xs, front))
            checks.say("LAB XENSTORE-BEGIN")
            checks.say(xenstore_ls(nodes).rstrip("\n"))
            checks.say("LAB XENSTORE-END")
            neg = dev.negotiated
            checks.say("LAB VALUE " + " ".join("%s=%s" % (k, v) for k, v in sorted(neg.items())))
            checks.check("attach", dev.connected, "Connected in %.1fs: %d queue(s) of %d ring "
                         "page(s), indirect %d, persistent %s, %d sectors" % (
                             time.monotonic() - t0, neg["queues"], neg["ring_pages"],
                             neg["indirect_segments"], neg["persistent"], neg["sectors"]))
            took = takes_the_offer(neg, workload.parse_xenstore_ls(xenstore_ls(nodes), back))
            checks.check("takes-offer", not took, "; ".join(took) or
                         "uses all blkback offers: indirect, ring order, queues, persistent "
                         "grants, flush, discard")
            with tempfile.TemporaryDirectory(prefix="blkif-frontend-") as tmp:
                fs_check(checks, dev, target, tmp, args.timeout)
            discard_check(checks, dev, target, dev.size)
            raw_checks(checks, dev, target, workload.make_plan(args.seed, dev.size), args.timeout)
            stats = blkback_stats(domid, devid)
            checks.say("LAB VALUE " + " ".join("blkback_%s=%d" % kv for kv in sorted(stats.items())))
            used = stats.get("rd_req", 0) and stats.get("wr_req", 0) and stats.get("f_req", 0) \
                and stats.get("ds_req", 0)
            checks.check("blkback-counters", bool(used) and not stats.get("oo_req"),
                         " ".join("%s=%d" % kv for kv in sorted(stats.items())) or "none")
        finally:
            detached = detach(checks, xs, platform, dev, back)
            toolstack.destroy(xs, domid, args.vdev, backend_domid)
            gone = wait_gone("/sys/bus/xen-backend/devices/vbd-%d-%d" % (domid, devid), 10)
            checks.check("destroy", gone, "VBD removed; blkback's vbd-%d-%d %s" % (
                domid, devid, "gone" if gone else "still there"))
        text = xenstore_ls(nodes)
        checks.say(summary(workload.summarize_backend(workload.parse_xenstore_ls(text, back)),
                           workload.summarize_frontend(workload.parse_xenstore_ls(text, front)))
                   if detached else "detach failed")


def detach(checks, xs, platform, dev, back):
    if dev is None:
        return False
    dev.detach()
    own = xs.read_state(dev.path + "/state")
    theirs = xs.read_state(back + "/state")
    left = len(getattr(platform, "_objects", ()))
    return checks.check("detach", own == theirs == XenbusState.Closed and not left,
                        "frontend %s, backend %s, %d grant/channel object(s) left"
                        % (own.name, theirs.name, left))


def wait_gone(path, timeout):
    deadline = time.monotonic() + timeout
    while os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m blkif.lab.frontend_check",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--backend-domid", type=int, default=0)
    parser.add_argument("--domid", type=int, default=0, help="our (the frontend's) domain")
    parser.add_argument("--target", required=True, help="the block device blkback serves")
    parser.add_argument("--vdev", default=VDEV)
    parser.add_argument("--seed", type=int, default=1, help="the workload plan's seed")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds for attach and each batch of I/O")
    args = parser.parse_args(argv)
    checks = Checks()
    try:
        run(args, checks)
    except Exception as exc:  # noqa: BLE001 - one line, then the exit status says it
        checks.check("error", False, "%s: %s" % (type(exc).__name__, exc))
        checks.say("frontend check failed: %s" % exc)
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
