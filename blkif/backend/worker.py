"""One VBD's worker process: ``python -m blkif.backend.worker [options] PATH``.

The service starts one per VBD, so disks do not contend for one interpreter
and a guest that breaks its VBD (or this process) cannot touch another's.

Each connected ring is served on a thread of its own (``blkif.backend.engine``
in C, or the Python reference with ``--engine python``).  The main thread
waits on a wake-up pipe, written by xenstore watch callbacks, signals and a
ring thread whose frontend broke its ring; each wake-up re-reads both states
(:meth:`Vbd.changed`).  About once a second the worker rewrites its status
file (or, unchanged, touches it: the supervisor's heartbeat), lets the VBD
watch its storage (:meth:`Vbd.tick`: a storage daemon to restart, an NBD
connection to reopen) and checks that its parent is alive.  Each tick comes
0.5-1.5 s after the last, at random: workers started together (a host
booting its guests, a service restarted) would otherwise tick together for
good, their Python work in one burst every second on every core.

On every tick, and at once on SIGHUP, the worker checks whether the backing
store grew and publishes the new size (:meth:`Vbd.check_size`).

SIGTERM or SIGINT: serve what is on the rings, switch Closing, keep serving
until the frontend closes or ``--grace`` seconds pass, then unmap, unbind,
flush the store, switch Closed and exit 0.  SIGUSR1 (an upgrade), or the
service dying: detach instead (:meth:`Vbd.detach`): answer what is in flight,
keep the journal and leave the VBD Connected for the next worker.
Exit status 3 means the VBD cannot be served as configured (e.g. its backing
store cannot be opened); the error node says why and restarting won't help.
"""
import argparse
import gc
import logging
import os
import random
import select
import signal
import sys
import time

from blkif import systemd
from blkif.backend import status
from blkif.backend.engine import MAX_PERSISTENT_GRANTS
from blkif.backend.vbd import BackendOptions, Vbd
from blkif.errors import BlkifError, RemoteProtocolError, UsageError
from blkif.negotiate import MAX_QUEUES
from blkif.platform import PlatformError, open_platform
from blkif.wakeup import Wakeup
from blkif.abi.constants import BLKIF_MAX_INDIRECT_SEGMENTS, XENBUS_MAX_RING_GRANT_ORDER
from xenstore import XenbusState, Xenstore, XenstoreError

log = logging.getLogger(__name__)

EXIT_UNSERVABLE = 3
TICK = 1.0  # on average; each 0.5-1.5 TICK after the last
HEARTBEAT_MAX = 1.5 * TICK  # the longest a healthy worker leaves its status file
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
DETACH_SIGNAL = signal.SIGUSR1
HANDLED_SIGNALS = STOP_SIGNALS + (signal.SIGHUP, DETACH_SIGNAL)


def _bounded(low, high):
    def parse(text):
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a number" % text) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError("%d is not in %d..%d" % (value, low, high))
        return value
    return parse


# (flag, argparse keywords): shared by ``blkif serve`` and the worker it starts.
OPTIONS = (
    ("--platform", dict(choices=("xen", "sim"), default="xen",
                        help="xen: /dev/xen devices (dom0); sim: the simulated hypervisor")),
    ("--sim-path", dict(metavar="DIR", help="simulated hypervisor directory (default $BLKIF_SIM)")),
    ("--xenstore", dict(metavar="PATH",
                        help="xenstored socket (default: $XENSTORED_PATH or the system's)")),
    ("--backend-domid", dict(type=_bounded(0, 0x7FEF), default=0, metavar="N",
                             help="the domain we serve as (default 0)")),
    ("--max-indirect-segments", dict(type=_bounded(0, BLKIF_MAX_INDIRECT_SEGMENTS), default=256,
                                     metavar="N",
                                     help="feature-max-indirect-segments (default 256, "
                                          "0 disables indirect requests)")),
    ("--max-ring-page-order", dict(type=_bounded(0, XENBUS_MAX_RING_GRANT_ORDER), default=4,
                                   metavar="N", help="max-ring-page-order (default 4)")),
    ("--max-queues", dict(type=_bounded(1, MAX_QUEUES), default=BackendOptions.max_queues,
                          metavar="N", help="multi-queue-max-queues (default: one per CPU)")),
    ("--no-persistent", dict(action="store_true", help="do not offer persistent grants")),
    ("--max-persistent-grants", dict(type=_bounded(0, 1 << 20), default=MAX_PERSISTENT_GRANTS,
                                     metavar="N",
                                     help="grants kept mapped per ring (default %d, as Linux's "
                                          "max_persistent_grants; each pins a page of dom0 "
                                          "memory)" % MAX_PERSISTENT_GRANTS)),
    ("--direct", dict(action="store_true", help="open backing stores with O_DIRECT")),
    ("--bounce-buffer", dict(type=_bounded(0, 1024), default=0, metavar="MIB",
                             help="per ring, MiB of the C engine's own memory that transfers "
                                  "are copied through instead of doing O_DIRECT on granted "
                                  "pages, which a PV dom0 pins one by one (default 0: none)")),
    ("--engine", dict(choices=("c", "python"), default="c",
                      help="the datapath: c (the C engine, default) or python (the "
                           "readable reference, one request at a time)")),
    ("--io", dict(choices=("io_uring", "threads"), default="io_uring",
                  help="the C engine's I/O: io_uring (default; falls back to threads "
                       "where the kernel refuses it) or a pool of threads")),
    ("--state-dir", dict(metavar="DIR", default=None,
                         help="status files for `blkif stats` (default: %s)"
                         % status.default_state_dir())),
    ("--no-live-restart", dict(action="store_true",
                               help="do not journal connections: a worker that dies closes "
                                    "its VBD's connection instead of leaving it to its "
                                    "successor (live restart needs the C engine)")),
    ("--grace", dict(type=float, default=5.0, metavar="SECONDS",
                     help="on stop, how long a connected frontend has to close (default 5)")),
)


def add_options(parser):
    for flag, kwargs in OPTIONS:
        parser.add_argument(flag, **kwargs)


def option_argv(args):
    """``args`` turned back into command-line options (for the worker's argv)."""
    argv = []
    for flag, kwargs in OPTIONS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if kwargs.get("action") == "store_true":
            argv += [flag] if value else []
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def backend_options(args):
    return BackendOptions(
        max_indirect_segments=args.max_indirect_segments,
        max_ring_page_order=args.max_ring_page_order,
        max_queues=args.max_queues,
        persistent=not args.no_persistent,
        max_persistent_grants=args.max_persistent_grants,
        direct=args.direct,
        bounce_mib=args.bounce_buffer,
        engine=args.engine,
        io=args.io,
        run_dir=args.state_dir or status.default_state_dir(),
        journal_dir=None if args.no_live_restart else os.path.join(
            args.state_dir or status.default_state_dir(), "journal"),
    )


def open_backend_platform(args):
    options = {"domid": args.backend_domid}
    if args.platform == "sim" and args.sim_path:
        options["path"] = args.sim_path
    return open_platform(args.platform, **options)


class Worker:
    """Runs one :class:`Vbd` until it is removed or the worker is told to stop."""

    def __init__(self, vbd, state_dir, grace):
        self.vbd = vbd
        self.grace = grace
        self.status_file = status.vbd_file(state_dir, vbd.domid, vbd.devid) if state_dir else None
        self.wakeup = Wakeup()  # xenstore watches, signals and failing rings
        vbd.wake = self.wakeup.wake
        self.stopping = False
        self.detaching = False
        self.parent = os.getppid()
        self._next_tick = 0.0
        self._status_text = None  # what the status file holds

    def _on_signal(self, signum, _frame):
        if signum == signal.SIGHUP:
            self._next_tick = 0.0  # check the store's size now
        else:
            self.stopping = True
            self.detaching = self.detaching or signum == DETACH_SIGNAL
        self.wakeup.wake()

    def _backend_event(self, _event):
        self.vbd.backend_changed = True  # before the wake-up, which reads it
        self.wakeup.wake()

    def run(self):
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, self._on_signal)
        xs = self.vbd.xs
        watches = [xs.watch(self.vbd.path, "backend", callback=self._backend_event)]
        try:
            self.vbd.start()
            watches.append(xs.watch(self.vbd.frontend + "/state", "frontend",
                                    callback=self.wakeup.wake))
            while not self.stopping and not self.vbd.gone:
                self._step(max(0.0, self._next_tick - time.monotonic()))
            if self.detaching:
                self.vbd.detach()
            else:
                self._stop()
        finally:
            for watch in watches:
                watch.close()
            self.vbd.shutdown()
            self._write_status()
            for signum in HANDLED_SIGNALS:
                # Done: a late SIGTERM must not turn exit 0 into "killed" (the
                # interpreter's exit puts back the default handlers, not SIG_IGN).
                signal.signal(signum, signal.SIG_IGN)

    def _step(self, timeout):
        """Wait for one wake-up (at most ``timeout`` s) and act on it."""
        if select.select([self.wakeup], [], [], timeout)[0]:
            self.wakeup.drain()
            self._guarded(self.vbd.changed)
        now = time.monotonic()
        if now >= self._next_tick:
            self._next_tick = now + random.uniform(0.5 * TICK, HEARTBEAT_MAX)
            self._guarded(self.vbd.tick)
            if not self.stopping:
                self._guarded(self.vbd.check_size)
            self._write_status()
            if os.getppid() != self.parent:
                log.warning("%s: the service is gone; detaching for its successor",
                            self.vbd.label)
                self.stopping = self.detaching = True

    def _guarded(self, action):
        """Run ``action``; a broken frontend closes this VBD, never the worker."""
        try:
            action()
        except (RemoteProtocolError, PlatformError) as exc:
            self.vbd.fatal(str(exc))

    def _stop(self):
        """Closing, and serve until the frontend has closed or the grace is over."""
        vbd = self.vbd
        if vbd.gone or vbd.state != XenbusState.Connected:
            return
        log.info("%s: stopping: waiting up to %.1f s for the frontend to close",
                 vbd.label, self.grace)
        vbd._switch(XenbusState.Closing)  # the rings keep serving meanwhile
        deadline = time.monotonic() + self.grace
        while vbd.servers and time.monotonic() < deadline:
            front = vbd.xs.read_state(vbd.frontend + "/state")
            if front in (XenbusState.Closed, XenbusState.Unknown):
                break
            self._step(max(0.0, min(0.1, deadline - time.monotonic())))

    def _write_status(self):
        if not self.status_file:
            return
        state = self.vbd.status()
        state["pid"] = os.getpid()
        try:
            self._status_text = status.write_status(self.status_file, state,
                                                    self._status_text)
        except OSError as exc:
            log.warning("%s: cannot write %s: %s", self.vbd.label, self.status_file,
                        exc.strerror)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="blkif-worker", description=__doc__.split("\n")[0])
    add_options(parser)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("path", help="the VBD's backend directory in xenstore; - to read it "
                                     "from stdin (the service's spare worker: imports done, "
                                     "it waits for its VBD)")
    args = parser.parse_args(argv)
    # Everything imported lives as long as we do: the collector's full passes
    # need not walk it every few seconds (as long-lived servers do).
    gc.freeze()
    if args.path == "-":
        args.path = sys.stdin.readline().strip()
        if not args.path:
            return 0  # the service stopped before it needed us
    label = args.path
    systemd.setup_logging((logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
                          "%(levelname)s blkif-worker[%(process)d]: %(message)s")
    try:
        with Xenstore.open(args.xenstore) as xs, open_backend_platform(args) as platform:
            vbd = Vbd(xs, platform, args.path, backend_options(args))
            worker = Worker(vbd, args.state_dir or status.default_state_dir(), args.grace)
            try:
                worker.run()
            except (BlkifError, OSError) as exc:
                if vbd.store is None:  # never started: tell the toolstack why
                    vbd.fatal("cannot serve: %s" % exc)
                    print("blkif-worker: %s: %s" % (label, exc), file=sys.stderr)
                    return EXIT_UNSERVABLE
                raise
    except UsageError as exc:
        print("blkif-worker: %s: %s" % (label, exc), file=sys.stderr)
        return 2
    except (BlkifError, XenstoreError, OSError) as exc:
        print("blkif-worker: %s: %s" % (label, exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
