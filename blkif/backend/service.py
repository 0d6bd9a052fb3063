"""The backend service, ``blkif serve``: a supervisor of per-VBD workers.

It watches ``/local/domain/<backend>/backend/<type>`` for each type it
serves (``--types``: ``vbd``, the xenbus type of kernel blkback and libxl's
``phy`` disks; ``qdisk``, QEMU's, which libxl gives ``backendtype=qdisk``
disks) and keeps one worker process (``blkif.backend.worker``) per VBD
directory found there: started when the directory appears, sent SIGTERM when
it goes.  The default, ``auto``, serves both unless Linux xen-blkback is
loaded: then ``vbd`` is the kernel's and only ``qdisk`` is ours, so the two
backends run side by side and never claim the same VBD.  A worker that dies
is that VBD's failure alone: it is logged, and the worker restarted after a
back-off that doubles with each crash; more than ``MAX_CRASHES`` crashes
within ``CRASH_WINDOW`` seconds (or exit status 3, "cannot be served as
configured") marks the VBD failed instead of feeding a crash loop.  A
worker rewrites its status file every second; one silent for
``--hung-timeout`` seconds is killed as hung and restarted like a crash.
A worker SIGKILLed by someone else did not crash: it is restarted at once,
and its successor carries on its connection (live restart, docs/reliability.md).

One spare worker is kept started ahead of need: its interpreter is up and its
modules imported, and it waits on stdin for a VBD path.  A new VBD goes to
the spare (and a new spare is started), so it reaches InitWait at once:
libxl gives a backend 10 s for that, and starting a cold Python took 11-14 s
on a loaded dom0 (the lab's emulated one).  Run as root, the service starts
the spare SCHED_IDLE and makes it SCHED_OTHER when it takes a VBD: its
start-up (a fifth of a CPU second) then uses only CPU time no serving worker
wants, instead of delaying every VBD's requests each time one is created.

Signal handlers only record what happened and wake the loop (SIGCHLD
included); the loop reaps, rescans and acts.  SIGTERM/SIGINT stop every
worker in order: SIGTERM, their ``--grace`` to let frontends close, then
SIGKILL for any still running.  SIGUSR1 stops for an upgrade instead: each
worker detaches (answers what is in flight, keeps its journal), every VBD
stays Connected, and the next ``blkif serve`` carries the connections on.
SIGHUP is passed on to every running worker, which re-checks the size of its
backing store at once (online resize).
``service.json`` in the state directory holds the workers and the last exits
(``blkif stats``); ``--metrics ADDRESS`` serves them to Prometheus.

Under systemd (``Type=notify``) the service says READY=1 once it watches
xenstore, STOPPING=1 when it starts to stop (each with a STATUS line), and
WATCHDOG=1 from its loop when the unit asks for a watchdog.
"""
import collections
import contextlib
import logging
import os
import selectors
import signal
import subprocess
import sys
import time

from blkif import systemd
from blkif.backend import status, worker
from blkif.toolstack import BACKEND_TYPES
from blkif.errors import UsageError
from blkif.wakeup import Wakeup
from xenstore import NoEntry, Xenstore

log = logging.getLogger(__name__)

CRASH_WINDOW = 60.0
MAX_CRASHES = 5
FIRST_BACKOFF = 0.25
MAX_BACKOFF = 30.0
KILL_MARGIN = 2.0  # beyond the workers' grace before SIGKILL
KERNEL_BLKBACK = "/sys/module/xen_blkback"  # present while Linux xen-blkback is loaded


class WorkerHandle:
    """The supervisor's view of one VBD's worker."""

    def __init__(self, domid, devid, path):
        self.domid, self.devid, self.path = domid, devid, path
        self.proc = None
        self.status = "starting"  # running, restarting, stopping, failed
        self.restarts = 0
        self.crashes = collections.deque()
        self.next_start = 0.0
        self.started = 0.0
        self.killed_as_hung = False
        self.last_exit = None

    @property
    def label(self):
        return "vbd %d/%d" % (self.domid, self.devid)

    def as_dict(self):
        return {"domid": self.domid, "devid": self.devid, "path": self.path,
                "pid": self.proc.pid if self.proc else None, "status": self.status,
                "restarts": self.restarts, "last_exit": self.last_exit}


def served_types(choice, platform, kernel_blkback=KERNEL_BLKBACK):
    """The backend types ``--types`` names (``auto``: see the module's doc)."""
    kernel = platform == "xen" and os.path.exists(kernel_blkback)
    if choice == "auto":
        return ("qdisk",) if kernel else BACKEND_TYPES
    types = tuple(dict.fromkeys(t.strip() for t in choice.split(",") if t.strip()))
    unknown = [t for t in types if t not in BACKEND_TYPES]
    if unknown or not types:
        raise UsageError("--types %s: give auto or a comma list of %s"
                         % (choice, ", ".join(BACKEND_TYPES)))
    if "vbd" in types and kernel:
        raise UsageError("--types %s: Linux xen-blkback is loaded and serves backend/vbd "
                         "itself; unload it (rmmod xen-blkback) or serve qdisk only" % choice)
    return types


def describe_exit(code):
    if code < 0:
        return "killed by %s" % signal.Signals(-code).name
    return "exit status %d" % code


def vbd_level(path, roots):
    """Whether a watch event on ``path`` may add or remove a VBD directory
    under one of ``roots``: the root itself, ``root/domid`` or
    ``root/domid/devid``, and any path not under a root."""
    for root in roots:
        if path == root or path.startswith(root + "/"):
            return path[len(root):].count("/") <= 2
    return True


def _set_policy(pid, policy):
    """Schedule process ``pid`` under ``policy``; a failure is only logged
    (the process is gone, or the kernel refuses)."""
    try:
        os.sched_setscheduler(pid, policy, os.sched_param(0))
    except OSError as exc:
        log.debug("cannot set the scheduling policy of worker %d: %s", pid, exc.strerror)


class Service:
    def __init__(self, args):
        self.args = args
        if args.hung_timeout < 2 * worker.HEARTBEAT_MAX:
            raise UsageError("--hung-timeout %g: a worker reports only every %g s at most; "
                             "give at least %g" % (args.hung_timeout, worker.HEARTBEAT_MAX,
                                                   2 * worker.HEARTBEAT_MAX))
        self.types = ()  # from --types, when run() starts
        self.roots = []
        self.state_dir = args.state_dir or status.default_state_dir()
        self.worker_argv = ([sys.executable, "-m", "blkif.backend.worker"]
                            + worker.option_argv(args) + ["-v"] * getattr(args, "verbose", 0))
        self.workers = {}  # (domid, devid) -> WorkerHandle
        self.spare = None  # a worker waiting on stdin for its VBD path
        self.finished = collections.deque(maxlen=32)  # final status of exited workers
        self.stopping = False
        self.detaching = False  # SIGUSR1: leave every connection to the next service
        self.recheck = False  # SIGHUP: workers re-check their store's size
        self.rescan = True  # a VBD directory may have come or gone: list them again
        self.present = {}  # (domid, devid) -> backend directory, as last listed
        self.watchdog = systemd.Watchdog()
        self.wakeup = Wakeup()  # the xenstore watch, SIGCHLD and signals
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.wakeup.fileno(), selectors.EVENT_READ)

    def _on_stop(self, signum, _frame):
        self.stopping = True
        self.wakeup.wake()

    def _on_detach(self, signum, _frame):
        self.stopping = self.detaching = True
        self.wakeup.wake()

    def _on_hangup(self, signum, _frame):
        self.recheck = True
        self.wakeup.wake()

    def run(self):
        self.types = served_types(getattr(self.args, "types", "auto"), self.args.platform)
        self.roots = ["/local/domain/%d/backend/%s" % (self.args.backend_domid, kind)
                      for kind in self.types]
        os.makedirs(self.state_dir, exist_ok=True)
        worker.open_backend_platform(self.args).close()  # fail here, not in every worker
        metrics = self._serve_metrics()
        handlers = {s: signal.signal(s, self._on_stop) for s in worker.STOP_SIGNALS}
        handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hangup)
        handlers[worker.DETACH_SIGNAL] = signal.signal(worker.DETACH_SIGNAL, self._on_detach)
        handlers[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, self.wakeup.wake)
        try:
            with Xenstore.open(self.args.xenstore) as xs:
                where = " and ".join(self.roots)
                log.info("serving VBDs under %s (state in %s)", where, self.state_dir)
                self._start_spare()
                with contextlib.ExitStack() as watches:
                    for root in self.roots:
                        watches.enter_context(
                            xs.watch(root, "blkif-serve-" + root, callback=self._on_change))
                    systemd.notify("READY=1", "STATUS=serving VBDs under %s" % where)
                    while not self.stopping:
                        self._round(xs)
                        self._write_status("running")
                        self.watchdog.kick()
            return 0
        finally:
            systemd.notify("STOPPING=1", "STATUS=stopping %d worker(s)" % len(self.workers))
            self._stop_all()
            self._write_status("stopped")
            if metrics is not None:
                metrics.shutdown()
                metrics.server_close()
            for signum, handler in handlers.items():
                signal.signal(signum, handler)

    def _on_change(self, event):
        """A watch event (on the watch's thread): only one naming a VBD
        directory or above asks for a rescan.  A VBD's own nodes (its state,
        features, its guest's frontend details) change many times while it
        connects, and listing every VBD for each would cost dom0 CPU in
        proportion to how many there are, every time one comes or goes."""
        if vbd_level(event.path, self.roots):
            self.rescan = True
            self.wakeup.wake()

    def _serve_metrics(self):
        if not self.args.metrics:
            return None
        from blkif.backend import metrics  # prometheus_client: only when asked for
        try:
            server = metrics.serve(self.args.metrics, self.state_dir)
        except OSError as exc:
            raise UsageError("--metrics %s: %s" % (self.args.metrics, exc.strerror)) from None
        log.info("metrics on http://%s:%d/metrics", *server.server_address[:2])
        return server

    def _round(self, xs):
        """Wait for a change (or the next restart), then reap, rescan, act."""
        now = time.monotonic()
        waits = [h.next_start - now for h in self.workers.values() if h.status == "restarting"]
        timeout = max(0.0, min(waits + [1.0]))
        if self.selector.select(timeout):
            self.wakeup.drain()
        self._reap()
        if not self.stopping:
            self._scan(xs)
            self._check_hung()
        if self.recheck:
            self.recheck = False
            self._hang_up_workers()

    def _hang_up_workers(self):
        """SIGHUP to each worker that runs its VBD (its status file names it:
        its handler is installed; a worker still starting would die of it)."""
        log.info("SIGHUP: workers re-check the size of their backing stores")
        for handle in self.workers.values():
            if handle.status != "running":
                continue
            try:
                pid = status.read_vbd(self.state_dir, handle.domid, handle.devid).get("pid")
            except (OSError, ValueError):
                continue
            if pid == handle.proc.pid:
                handle.proc.send_signal(signal.SIGHUP)

    def _present(self, xs):
        """{(domid, devid): backend directory} of every VBD in our roots (the
        first root wins if a guest had one devid under two types)."""
        found = {}
        for root in self.roots:
            try:
                domids = xs.list(root)
            except NoEntry:
                continue
            for domid in filter(str.isdigit, domids):
                try:
                    devids = xs.list("%s/%s" % (root, domid))
                except NoEntry:
                    continue
                for devid in filter(str.isdigit, devids):
                    found.setdefault((int(domid), int(devid)),
                                     "%s/%s/%s" % (root, domid, devid))
        return found

    def _scan(self, xs):
        if self.rescan:
            self.rescan = False  # before listing: a change meanwhile asks again
            self.present = self._present(xs)
        present = self.present
        now = time.monotonic()
        for key in present.keys() - self.workers.keys():
            self.workers[key] = WorkerHandle(*key, present[key])
        for key, handle in list(self.workers.items()):
            if key not in present:
                if handle.status in ("starting", "restarting", "failed"):
                    self._forget(handle)  # no live worker (a dead one was reaped)
                elif handle.status == "running":
                    log.info("%s: removed; stopping its worker", handle.label)
                    handle.status = "stopping"
                    handle.proc.terminate()
            elif handle.status in ("starting", "restarting") and now >= handle.next_start:
                self._start(handle)

    def _start_spare(self):
        if self.spare is None and not self.stopping:
            self.spare = subprocess.Popen(self.worker_argv + ["-"], stdin=subprocess.PIPE)
            if os.geteuid() == 0:  # it may be made SCHED_OTHER again when taken
                _set_policy(self.spare.pid, os.SCHED_IDLE)

    def _take_spare(self, path):
        """The spare worker, told to serve ``path``; None if it died waiting."""
        spare, self.spare = self.spare, None
        if spare is None or spare.poll() is not None:
            if spare is not None:
                log.warning("spare worker %d exited (%s) before it was needed", spare.pid,
                            describe_exit(spare.returncode))
            return None
        _set_policy(spare.pid, os.SCHED_OTHER)
        try:
            spare.stdin.write(path.encode() + b"\n")
            spare.stdin.close()
        except OSError:  # it died just now: reaped as a crash of this VBD's worker
            pass
        return spare

    def _start(self, handle):
        handle.proc = self._take_spare(handle.path) or subprocess.Popen(
            self.worker_argv + [handle.path], stdin=subprocess.DEVNULL)
        self._start_spare()
        handle.status = "running"
        handle.started = time.time()
        handle.killed_as_hung = False
        log.info("%s: worker %d started", handle.label, handle.proc.pid)

    def _check_hung(self):
        """SIGKILL a worker whose status file stopped changing (its heartbeat)."""
        limit = self.args.hung_timeout
        now = time.time()
        for handle in self.workers.values():
            if handle.status != "running" or now - handle.started < limit:
                continue
            try:
                beat = os.stat(status.vbd_file(self.state_dir, handle.domid, handle.devid)).st_mtime
            except OSError:
                beat = handle.started
            if now - max(beat, handle.started) > limit:
                log.error("%s: worker %d has not reported for %.0f s; killing it as hung",
                          handle.label, handle.proc.pid, now - max(beat, handle.started))
                handle.killed_as_hung = True
                handle.proc.kill()

    def _reap(self):
        for handle in list(self.workers.values()):
            if handle.proc is None or handle.status in ("failed", "restarting"):
                continue
            code = handle.proc.poll()
            if code is None:
                continue
            handle.last_exit = describe_exit(code)
            if code == 0:
                # A worker exits 0 only when told to, or on its own once its
                # VBD is removed (it may see that before our watch does).
                handle.status = "stopping"
            self._record_final(handle)
            if handle.status == "stopping" or self.stopping:
                log.info("%s: worker %d stopped (%s)", handle.label, handle.proc.pid,
                         handle.last_exit)
                self._forget(handle)
            elif code == -signal.SIGKILL and not handle.killed_as_hung:
                log.warning("%s: worker %d %s; restarting it at once", handle.label,
                            handle.proc.pid, handle.last_exit)
                handle.status = "restarting"
                handle.restarts += 1
                handle.next_start = time.monotonic()
            elif code == worker.EXIT_UNSERVABLE:
                log.error("%s: cannot be served (see its error node); not restarting",
                          handle.label)
                handle.status = "failed"
            else:
                self._crashed(handle)

    def _crashed(self, handle):
        now = time.monotonic()
        handle.crashes.append(now)
        while handle.crashes and handle.crashes[0] < now - CRASH_WINDOW:
            handle.crashes.popleft()
        n = len(handle.crashes)
        if n > MAX_CRASHES:
            log.error("%s: worker %d %s; %d crashes in %.0f s: giving up on this VBD",
                      handle.label, handle.proc.pid, handle.last_exit, n, CRASH_WINDOW)
            handle.status = "failed"
            return
        delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (n - 1))
        log.error("%s: worker %d %s; restarting in %.2f s (crash %d of %d allowed in %.0f s)",
                  handle.label, handle.proc.pid, handle.last_exit, delay, n, MAX_CRASHES,
                  CRASH_WINDOW)
        handle.status = "restarting"
        handle.restarts += 1
        handle.next_start = now + delay

    def _record_final(self, handle):
        path = status.vbd_file(self.state_dir, handle.domid, handle.devid)
        final = {"domid": handle.domid, "devid": handle.devid, "exit": handle.last_exit}
        try:
            vbd = status.read_status(self.state_dir)["vbds"]
        except Exception:  # noqa: BLE001 - a status file is best effort
            vbd = []
        for entry in vbd:
            if (entry["domid"], entry["devid"]) == (handle.domid, handle.devid):
                final.update(rings_mapped=entry["rings_mapped"],
                             channels_bound=entry["channels_bound"],
                             persistent_grants=entry["counters"]["persistent_grants"],
                             connections=entry["connections"])
        self.finished.append(final)
        if handle.status == "stopping" and os.path.exists(path):
            os.unlink(path)

    def _forget(self, handle):
        self.workers.pop((handle.domid, handle.devid), None)

    def _stop_all(self):
        """SIGTERM every worker (SIGUSR1 to detach), wait out the grace, SIGKILL
        stragglers."""
        live = [h for h in self.workers.values() if h.proc and h.proc.poll() is None]
        if self.spare is not None:
            self.spare.stdin.close()  # it reads EOF and exits once its imports are done
            try:
                self.spare.wait(self.args.grace + KILL_MARGIN)
            except subprocess.TimeoutExpired:
                self.spare.kill()
                self.spare.wait()
            self.spare = None
        how = worker.DETACH_SIGNAL if self.detaching else signal.SIGTERM
        for handle in live:
            handle.status = "stopping"
            handle.proc.send_signal(how)
        deadline = time.monotonic() + self.args.grace + KILL_MARGIN
        for handle in live:
            try:
                handle.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("%s: worker %d ignored %s; killing it", handle.label,
                          handle.proc.pid, how.name)
                handle.proc.kill()
                handle.proc.wait()
        for handle in live:
            handle.last_exit = describe_exit(handle.proc.returncode)
            self._record_final(handle)
        if live and self.detaching:
            log.info("detached %d worker(s): their VBDs stay connected for the next "
                     "blkif serve", len(live))
        elif live:
            log.info("stopped %d worker(s)", len(live))

    def _write_status(self, state):
        try:
            status.write_status(os.path.join(self.state_dir, "service.json"), {
                "pid": os.getpid(), "state": state, "roots": self.roots,
                "types": list(self.types),
                "platform": self.args.platform,
                "workers": [h.as_dict() for h in self.workers.values()],
                "finished": list(self.finished),
            })
        except OSError as exc:
            log.warning("cannot write the service status: %s", exc.strerror)


def add_arguments(parser):
    worker.add_options(parser)
    parser.add_argument("--types", default="auto", metavar="LIST",
                        help="backend types to serve: vbd, qdisk, or both as a comma list "
                             "(default auto: both, or only qdisk while Linux xen-blkback "
                             "is loaded and serves vbd)")
    parser.add_argument("--hung-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="kill and restart a worker silent for this long (default 30)")
    parser.add_argument("--metrics", metavar="ADDRESS",
                        help="serve Prometheus metrics on HOST:PORT (or PORT: every address)")


def run(args):
    return Service(args).run()
