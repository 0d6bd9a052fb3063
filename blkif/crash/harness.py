"""Kill a VBD's worker at random points of a verified write workload, then
check the image and what the device reads against :class:`DiskModel`.

:class:`CrashRig` is the sandbox (our xenstored, the sim hypervisor and
``blkif serve``, each a process) with one VBD on a small image; this process
is the guest, with our frontend (:class:`BlockDevice`).  Each iteration
runs a few rounds of non-overlapping writes, reads (checked as they are
answered) and flushes, then SIGKILLs the VBD's worker, at a random moment
of a round in flight or between rounds, and recovers:

- ``live`` (``blkif serve``'s default): a successor worker takes the
  connection over from the dead one's journal, so no request may fail and
  the device never disconnects; then the image file and the whole disk read
  back through the device are checked;
- ``reattach`` (``blkif serve --no-live-restart``): the restarted worker
  closes the old connection; the frontend fails what was in flight (those
  writes become *unsure*) and attaches again.  The image file is then
  checked and taken as the truth, and the whole disk read back must match.
- ``powercut``: as ``reattach``, on a disk with a volatile write cache
  (:mod:`blkif.crash.volatile`) whose power is cut right after each kill:
  what no flush made durable may be lost, so only the flush clause holds
  (:meth:`DiskModel.power_cut`).  A SIGKILL alone leaves the kernel's page
  cache, so only this mode shows that a flush answered OKAY was really
  synced, after every write it covers.

A VBD gets at most :data:`KILLS_PER_VBD` kills (the supervisor gives up on
one that crashes too often, by design); then it is destroyed and a new one,
for a new guest domain, is made on the same image.  The run is seeded: the
schedule and the data come from the seed, the moment of each kill relative
to the worker's progress from the scheduler, so a failure prints the seed
and the iteration, and a rerun with that seed replays the same schedule.
"""
import os
import random
import signal
import time

from blkif import toolstack
from blkif.crash.model import SECTOR, DiskModel, Violation
from blkif.crash.volatile import VolatileDisk
from blkif.errors import BlkifError
from blkif.frontend import BlockDevice, FrontendOptions
from blkif.frontend.transfer import BlockIOError
from blkif.platform import open_platform
from blkif.sandbox import Sandbox
from xenstore import Xenstore, domain_socket_path

KILLS_PER_VBD = 3  # the supervisor allows 5 crashes a minute per VBD
VDEV = "xvda"
MAX_SECTORS = 256  # per transfer
TIMEOUT = 30.0


class CrashRig:
    """The sandbox, one VBD on a blank image of ``sectors`` sectors, and our
    frontend attached to it; a context manager.  ``disk``: ``"volatile"``
    (or ``"lying"``, whose flushes do nothing) puts the image on a
    :class:`VolatileDisk`."""

    def __init__(self, sectors=4096, serve_options=(), workdir=None, disk=None):
        self.sandbox = Sandbox(workdir, serve_options)
        self.sectors, self.disk_kind = sectors, disk
        self.domid = 0
        self.dev = self.xs = self.platform = self.disk = None
        self.kills_here = 0

    def __enter__(self):
        self.sandbox.__enter__()
        try:
            if self.disk_kind:
                self.disk = VolatileDisk(self.sandbox.path("durable.img"),
                                         self.sandbox.path("volatile"), self.sectors * SECTOR,
                                         lying=self.disk_kind == "lying")
                self.image = self.disk.image
            else:
                self.image = self.sandbox.make_image("disk.img", self.sectors * SECTOR, None)
            self.new_vbd()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        try:
            self.detach()
        finally:
            try:
                self.sandbox.stop()  # nothing has the image open when its disk goes
            finally:
                try:
                    if self.disk is not None:
                        self.disk.close()  # unmounted before its mount point is removed
                finally:
                    self.sandbox.__exit__(*exc)

    def new_vbd(self):
        """A new guest domain with a VBD on the image, attached."""
        self.domid += 1
        self.sandbox.add_vbd(self.domid, VDEV, self.image)
        self.xs = Xenstore.open(domain_socket_path(self.sandbox.xenstore, self.domid))
        self.platform = open_platform("sim", domid=self.domid, path=self.sandbox.sim_path)
        self.dev = BlockDevice.attach(self.xs, self.platform, self.domid, VDEV,
                                      FrontendOptions(timeout=TIMEOUT, max_queues=2))
        self.kills_here = 0

    def detach(self):
        if self.dev is not None:
            self.dev.detach()
            self.platform.close()
            self.xs.close()
            self.dev = None

    def rotate(self):
        """Detach, destroy the VBD, make the next one (a fresh crash budget)."""
        self.detach()
        toolstack.destroy(self.sandbox.dom0, self.domid, VDEV)
        self.new_vbd()

    def worker_pid(self):
        devid = toolstack.vdev_to_devid(VDEV)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            pid = self.sandbox.workers().get((self.domid, devid))
            if pid:
                return pid
            time.sleep(0.02)
        raise AssertionError("no running worker for %d/%d" % (self.domid, devid))

    def kill_worker(self):
        """SIGKILL the VBD's worker; returns once every thread of it is dead."""
        pid = self.worker_pid()
        os.kill(pid, signal.SIGKILL)
        self.kills_here += 1
        deadline = time.monotonic() + TIMEOUT
        while _alive(pid):
            if time.monotonic() > deadline:
                raise AssertionError("worker %d outlived SIGKILL" % pid)
            time.sleep(0.002)

    def image_bytes(self):
        with open(self.image, "rb") as f:
            return f.read()


def _alive(pid):
    """Whether any thread of ``pid`` still runs.  A killed leader turns zombie
    before its other threads (io_uring's workers among them) have finished
    the I/O they had started; only then is the process done with the disk."""
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return False
    for tid in tasks:
        try:
            with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                if f.read().rsplit(")", 1)[1].split()[0] not in "ZX":
                    return True
        except OSError:
            pass
    return False


class Workload:
    """Seeded rounds of writes, reads and flushes on ``rig.dev``, kept in ``model``."""

    def __init__(self, rig, rng, model):
        self.rig, self.rng, self.model = rig, rng, model
        self.unanswered = 0

    def plan(self):
        """Up to 8 non-overlapping (op, first sector, count), maybe a flush last."""
        taken, rng = [], self.rng
        for _ in range(rng.randint(1, 8)):
            count = rng.randint(1, MAX_SECTORS)
            first = rng.randrange(self.model.sectors - count + 1)
            if all(first + count <= f or f + n <= first for _, f, n in taken):
                taken.append(("write" if rng.random() < 0.6 else "read", first, count))
        if rng.random() < 0.35:
            taken.append(("flush", 0, 0))
        return taken

    def submit(self, plan):
        dev, model, sent = self.rig.dev, self.model, []
        with dev.plugged():
            for op, first, count in plan:
                if op == "write":
                    write_id, data = model.new_write(first, count)
                    sent.append((dev.submit_write(first * SECTOR, data), op, first, count,
                                 write_id))
                elif op == "read":
                    sent.append((dev.submit_read(first * SECTOR, count * SECTOR), op, first,
                                 count, None))
                else:
                    sent.append((dev.submit_flush(), op, 0, 0, model.flush_sent()))
        return sent

    def account(self, sent, may_fail):
        """Wait for ``sent`` and fold the answers into the model (checking reads)."""
        self.rig.dev.wait([h for h, *_ in sent], timeout=TIMEOUT)
        for handle, op, first, count, extra in sent:
            if not handle.done:
                raise AssertionError("%s of %d sectors at %d never finished" % (op, count, first))
            try:
                data = handle.result(0)
            except BlockIOError:
                if not may_fail:
                    raise Violation("request failed", "%s of %d sectors at %d failed: %s"
                                    % (op, count, first, handle.error))
                if op == "write":
                    self.model.write_unanswered(extra, first, count)
                    self.unanswered += 1
                continue
            if op == "write":
                self.model.write_answered(extra, first, count)
            elif op == "read":
                self.model.check(data, first, "a read answered OKAY")
            else:
                self.model.flush_answered(extra)

    def round(self):
        self.account(self.submit(self.plan()), may_fail=False)


MODES = ("live", "reattach", "powercut")


def run(seed, iterations, mode="live", serve_options=(), log=print, sectors=4096,
        lying_disk=False):
    """``iterations`` kills under the workload; a summary dict.  A broken
    contract raises :class:`Violation` naming the seed and the iteration.
    ``lying_disk`` (powercut only): flushes that sync nothing, which must fail."""
    rng = random.Random(seed)
    model = DiskModel(sectors)
    started = time.monotonic()
    if mode != "live":
        serve_options = list(serve_options) + ["--no-live-restart"]
    disk = ("lying" if lying_disk else "volatile") if mode == "powercut" else None
    with CrashRig(sectors, serve_options, disk=disk) as rig:
        work = Workload(rig, rng, model)
        for i in range(iterations):
            try:
                _iteration(rig, work, rng, mode)
            except (AssertionError, BlkifError) as exc:  # Violation is an AssertionError
                raise Violation(getattr(exc, "clause", "harness"),
                                "seed %d, iteration %d (mode %s): %s"
                                % (seed, i, mode, exc)) from exc
            if log and (i + 1) % 10 == 0:
                log("%d/%d kills, %d writes answered, %d unsure, %d flushes answered"
                    % (i + 1, iterations, model.writes_answered, work.unanswered,
                       model.flushes_answered))
        rig.detach()
        rig.sandbox.stop_cleanly()  # every process exits 0, the killed workers aside
        lost = rig.disk.counters()["sectors_lost"] if rig.disk else None
    return {"seed": seed, "mode": mode, "kills": iterations, "vbds": rig.domid,
            "writes_answered": model.writes_answered, "writes_unsure": work.unanswered,
            "flushes_answered": model.flushes_answered, "sectors": sectors,
            "sectors_lost_to_cuts": lost, "seconds": round(time.monotonic() - started, 1)}


def _iteration(rig, work, rng, mode):
    if rig.kills_here >= KILLS_PER_VBD:
        rig.rotate()
    for _ in range(rng.randint(0, 3)):
        work.round()
    if rng.random() < 0.2:  # between rounds, nothing in flight
        rig.kill_worker()
        sent = []
    else:
        sent = work.submit(work.plan())
        time.sleep(rng.choice((0.0, rng.random() * 0.0005, rng.random() * 0.003)))
        rig.kill_worker()
    if mode == "powercut":
        rig.disk.cut(rng.randrange(1 << 32))
    work.account(sent, may_fail=mode != "live")
    if mode == "live":
        if not rig.dev.connected:
            raise Violation("live restart", "the device disconnected")
        work.model.check(rig.image_bytes(), 0, "the image")
    else:
        deadline = time.monotonic() + TIMEOUT
        while rig.dev.connected and time.monotonic() < deadline:
            rig.dev.poll(0.05)  # the frontend sees its backend go
        rig.dev.wait_connected(TIMEOUT)
        if mode == "powercut":
            work.model.power_cut(rig.disk.durable())
        else:
            work.model.settle(rig.image_bytes())
    _read_back(rig.dev, work.model)


def _read_back(dev, model, chunk=2048):
    """The whole disk through the device, checked against the model."""
    handles = [(first, dev.submit_read(first * SECTOR, min(chunk, model.sectors - first) * SECTOR))
               for first in range(0, model.sectors, chunk)]
    for first, handle in handles:
        model.check(handle.result(), first, "the disk read back after the kill")
