"""A simulated Xen host in processes, for ``blkif demo`` and ``blkif bench``.

:class:`Sandbox` plays the toolstack (dom0): in a working directory of its
own it starts our xenstored (``python -m xenstore serve``), the sim
hypervisor (``python -m blkif.platform.sim run``) and the backend service
(``blkif serve --platform sim``), each a process, then creates VBDs on image
files and starts guest domains.  A guest is ``python -m blkif.sandbox``: a
process that opens xenstore and the platform as domain N and does what it is
told, one job at a time, over a JSON-lines pipe:

- parent to guest, one line per job: ``{"job": "attach", "params": {...}}``,
  ``"detach"``, ``"call"`` (a ``guest_*`` function of :data:`GUEST_MODULES`,
  which gets the guest, its params and an ``emit`` for events), ``"quit"``;
- guest to parent: any number of ``{"event": {...}}`` (progress), then one
  ``{"result": ...}`` or ``{"error": "one line", "kind": "ExceptionName"}``.

Every child runs in a process group of its own, so a Ctrl-C reaches only us
and we stop them in order (guests detach, SIGTERM the service so it closes
its VBDs, then the hypervisor and xenstored), each within a bounded time,
SIGKILL after.  Should we be killed outright, the kernel sends each child
SIGTERM (``PR_SET_PDEATHSIG``).  They stay in our session: the kernel's
autogroup (``kernel.sched_autogroup_enabled``) makes each session a
scheduling group of its own, so a session per process would weigh every
guest as much as the whole service, and a guest made SCHED_IDLE would still
take its group's full share.  The working directory goes last, unless it
was the caller's.
"""
import argparse
import contextlib
import ctypes
import importlib
import json
import logging
import os
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

from blkif.errors import BlkifError, UsageError

# what a guest may be asked to call
GUEST_MODULES = ("blkif.demo", "blkif.bench", "blkif.conformance.frontend.guest", "blkif.soak")
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0  # per process, before SIGKILL
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)  # loaded before any fork


class SandboxError(BlkifError):
    """A process of the sandbox failed, or a job in a guest did."""


class GuestError(SandboxError):
    """A job failed inside a guest; ``kind`` is the exception's class name."""

    def __init__(self, message, kind):
        super().__init__(message)
        self.kind = kind


def _die_with_parent():
    """In a child before exec: SIGTERM when the parent dies (survives exec)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _last_line(path):
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _can_connect(path, kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_UNIX, kind) as probe:
        try:
            probe.connect(path)
            return True
        except OSError:
            return False


def _stop_process(proc, timeout=STOP_TIMEOUT, sig=signal.SIGTERM):
    """``sig``, wait up to ``timeout`` s, then SIGKILL; the exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class Sandbox:
    """Xenstored, the sim hypervisor and ``blkif serve`` in ``workdir``.

    ``serve_options`` are extra ``blkif serve`` arguments (its offer).  Use
    it as a context manager: the processes are stopped and a temporary
    working directory removed however the block ends.  :meth:`stop` stops
    the processes early (the files stay until the block ends) and fills
    :attr:`exit_status`.
    """

    def __init__(self, workdir=None, serve_options=()):
        self._own_dir = workdir is None
        self.dir = workdir
        self.serve_options = list(serve_options)
        self.procs = {}  # name -> Popen, in start order
        self.guests = []
        self.exit_status = {}  # name -> exit status, once stopped
        self.dom0 = None

    def path(self, name):
        return os.path.join(self.dir, name)

    # -- starting -----------------------------------------------------------

    def start(self):
        if self._own_dir:
            self.dir = tempfile.mkdtemp(prefix="blkif-sandbox-")
        else:
            os.makedirs(self.dir, exist_ok=True)
        self.xenstore = self.path("xenstored.sock")
        self.sim_path = self.path("sim")
        self.state_dir = self.path("state")
        os.makedirs(self.sim_path, exist_ok=True)
        py = [sys.executable, "-m"]
        # All three start before we open xenstore (whose client runs a
        # thread): a preexec_fn is only safe in a process with one thread.
        self._spawn("xenstored", py + ["xenstore", "serve", "--socket", self.xenstore,
                                       "--log-level", "WARNING"],
                    lambda: _can_connect(self.xenstore))
        sim_socket = os.path.join(self.sim_path, "hypervisor.sock")
        self._spawn("hypervisor", py + ["blkif.platform.sim", "run", self.sim_path],
                    lambda: _can_connect(sim_socket, socket.SOCK_SEQPACKET))
        self._spawn("serve", py + ["blkif", "-v", "serve", "--platform", "sim",
                                   "--sim-path", self.sim_path, "--xenstore", self.xenstore,
                                   "--state-dir", self.state_dir, "--grace", "5"]
                    + self.serve_options, self._serving)
        from xenstore import Xenstore
        self.dom0 = Xenstore.open(self.xenstore)
        return self

    def _spawn(self, name, argv, ready):
        logfile = self.path(name + ".log")
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    process_group=0, preexec_fn=_die_with_parent)
        self.procs[name] = proc
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            if proc.poll() is not None:
                raise SandboxError("%s exited with status %d while starting: %s"
                                   % (name, proc.returncode, _last_line(logfile)))
            if time.monotonic() > deadline:
                raise SandboxError("%s did not start within %.0f s" % (name, START_TIMEOUT))
            time.sleep(0.01)

    def _serving(self):
        """``blkif serve`` has written its status: its handlers are in place."""
        try:
            with open(os.path.join(self.state_dir, "service.json")) as f:
                return json.load(f).get("pid") == self.procs["serve"].pid
        except (OSError, ValueError):
            return False

    def workers(self):
        """{(domid, devid): pid} of the service's running workers, from its
        status file ({} while it is being rewritten)."""
        try:
            with open(os.path.join(self.state_dir, "service.json")) as f:
                status = json.load(f)
        except (OSError, ValueError):
            return {}
        return {(w["domid"], w["devid"]): w["pid"] for w in status.get("workers", ())
                if w.get("status") == "running"}

    # -- the toolstack ------------------------------------------------------

    def make_image(self, name, size, fill):
        """Image file ``name`` of ``size`` bytes, ``fill(offset, n)`` giving its
        contents chunk by chunk (None: sparse zeros); returns its path."""
        path = self.path(name)
        with open(path, "wb") as f:
            if fill is None:
                f.truncate(size)
            else:
                for offset in range(0, size, 1 << 20):
                    f.write(fill(offset, min(1 << 20, size - offset)))
        return path

    def add_vbd(self, domid, vdev, image, mode="w"):
        """Make ``domid`` a guest (first time) and give it VBD ``vdev`` on ``image``."""
        from blkif import toolstack
        if not self.dom0.is_domain_introduced(domid):
            toolstack.introduce(self.dom0, domid)
        return toolstack.create(self.dom0, domid, vdev, image, mode)

    def start_guest(self, domid):
        """Start domain ``domid``'s process; a :class:`Guest`."""
        guest = spawn_guest(domid, self.path("guest-%d.log" % domid), "--xenstore",
                            self.xenstore, "--sim-path", self.sim_path)
        self.procs["guest-%d" % domid] = guest.proc
        self.guests.append(guest)
        return guest

    # -- stopping -----------------------------------------------------------

    def stop(self):
        """Stop every process, last started first; idempotent.

        Guests detach and quit; the service gets SIGTERM (its workers close
        their VBDs and flush); then the hypervisor and xenstored.
        """
        with _signals_ignored():
            for guest in self.guests:
                guest.quit()
            if self.dom0 is not None:
                self.dom0.close()
                self.dom0 = None
            for name, proc in reversed(list(self.procs.items())):
                if name not in self.exit_status:
                    self.exit_status[name] = _stop_process(proc)

    def stop_cleanly(self):
        """:meth:`stop`, then SandboxError naming each process that did not
        exit with status 0."""
        self.stop()
        failed = self.failures()
        if failed:
            raise SandboxError("not stopped cleanly: " + "; ".join(failed))

    def failures(self):
        """"name exited with ..." for each process that did not stop cleanly."""
        out = []
        for name, code in self.exit_status.items():
            if code != 0:
                how = ("killed by %s" % signal.Signals(-code).name if code < 0
                       else "exit status %d" % code)
                out.append("%s: %s (%s)" % (name, how, _last_line(self.path(name + ".log"))))
        return out

    def cleanup(self):
        self.stop()
        if self._own_dir and self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        self._handlers = _install(_raise_interrupt, STOP_SIGNALS[1:])
        try:
            return self.start()
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc):
        try:
            self.cleanup()
        finally:
            _restore(self._handlers)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt("stopped by %s" % signal.Signals(signum).name)


def _install(handler, signals):
    """Set ``handler`` for ``signals`` (main thread only); the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, handler) for signum in signals}


def _restore(previous):
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@contextlib.contextmanager
def _signals_ignored():
    """Stop signals ignored inside: an orderly stop is not cut short."""
    previous = _install(signal.SIG_IGN, STOP_SIGNALS)
    try:
        yield
    finally:
        _restore(previous)


def spawn_guest(domid, logfile, *options):
    """A guest process (``guest_main`` with ``options``) as domain ``domid``,
    its stderr appended to ``logfile``; its :class:`Guest`."""
    with open(logfile, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "blkif.sandbox", "--domid", str(domid),
             "--parent", str(os.getpid()), *options],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, process_group=0)
    return Guest(domid, proc, logfile)


class Guest:
    """The parent's handle on a guest domain's process."""

    def __init__(self, domid, proc, logfile):
        self.domid, self.proc, self.logfile = domid, proc, logfile
        self.busy = False  # a job was sent and has not answered
        self._buf = b""

    def call(self, job, params=None, on_event=None, timeout=60.0):
        """Run ``job`` in the guest; its result.  ``on_event(event)`` gets each
        event; no line for ``timeout`` s is an error, as is the guest dying."""
        self._send({"job": job, "params": params or {}})
        self.busy = True
        while True:
            message = self._receive(timeout)
            if "event" in message:
                if on_event is not None:
                    on_event(message["event"])
                continue
            self.busy = False
            if "result" in message:
                return message["result"]
            raise GuestError(message.get("error", "bad reply %r" % message),
                             message.get("kind", ""))

    def _send(self, message):
        try:
            self.proc.stdin.write(json.dumps(message).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise self._died() from None

    def _receive(self, timeout):
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise SandboxError("guest domain %d sent nothing for %.0f s"
                                   % (self.domid, timeout))
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise self._died()
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def _died(self):
        code = self.proc.wait()
        return SandboxError("guest domain %d exited with status %d: %s"
                            % (self.domid, code, _last_line(self.logfile)))

    def quit(self, timeout=STOP_TIMEOUT):
        """Ask the guest to detach and exit (SIGTERM if it is busy with a job:
        it stops the job and detaches); SIGKILL if it won't."""
        if self.proc.poll() is None and self.busy:
            _stop_process(self.proc, timeout)
        elif self.proc.poll() is None:
            try:
                self.proc.stdin.write(b'{"job": "quit"}\n')
                self.proc.stdin.close()
            except (BrokenPipeError, ValueError):
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _stop_process(self.proc, 5.0)
        self.proc.stdout.close()
        return self.proc.returncode


# -- command lines (demo and bench) ------------------------------------------

def parse_size(text):
    """``64M``, ``1G``, ``4096K`` or bytes; whole 4 KiB pages, 4 MiB..1 GiB."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = units.get(text[-1:], 1)
    try:
        value = int(text[:-1] if text[-1:] in units else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a size (try 64M)" % text) from None
    if value % 4096 or not 4 << 20 <= value <= 1 << 30:
        raise argparse.ArgumentTypeError("%d bytes is not 4 MiB..1 GiB in whole 4 KiB "
                                         "pages" % value)
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number" % text) from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError("%r is not in (0, 3600] seconds" % text)
    return value


def add_arguments(parser):
    """What the backend offers and the frontend asks for (demo and bench)."""
    parser.add_argument("--queues", type=int, metavar="N",
                        help="queues offered and used, 1..16 (default: the service's "
                             "offer, one per CPU)")
    parser.add_argument("--ring-page-order", type=int, metavar="N",
                        help="ring pages 2**N per queue, 0..4 (default 4)")
    parser.add_argument("--indirect", type=int, metavar="N",
                        help="indirect segments per request, 0..4096 (0: direct "
                             "requests only; default 256)")
    parser.add_argument("--no-persistent", action="store_true",
                        help="no persistent grants (the backend maps per request)")
    parser.add_argument("--abi", choices=("x86_64", "x86_32", "arm"),
                        help="ring layout the frontend asks for (default: native)")
    parser.add_argument("--engine", choices=("c", "python"),
                        help="the backend's datapath (blkif serve --engine; default c)")
    parser.add_argument("--no-live-restart", action="store_true",
                        help="no journal of the connections (blkif serve "
                             "--no-live-restart)")
    parser.add_argument("--bounce-buffer", type=int, metavar="MIB",
                        help="the C engine's bounce buffer per ring (blkif serve "
                             "--bounce-buffer)")
    parser.add_argument("--workdir", metavar="DIR",
                        help="keep the processes' logs, sockets and image here "
                             "(default: a temporary directory, removed)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


def setup(args):
    """(``blkif serve`` options, frontend options) from the command line.

    Each limit the user gives is both the backend's offer and the frontend's
    request, so what is negotiated is what was asked for."""
    serve, front = [], {}
    for name, flag, option, low, high in (
            ("queues", "--max-queues", "max_queues", 1, 16),
            ("ring_page_order", "--max-ring-page-order", "max_ring_page_order", 0, 4),
            ("indirect", "--max-indirect-segments", "max_indirect_segments", 0, 4096)):
        value = getattr(args, name)
        if value is not None:
            if not low <= value <= high:
                raise UsageError("--%s %d is not in %d..%d"
                                 % (name.replace("_", "-"), value, low, high))
            serve += [flag, str(value)]
            front[option] = value
    if args.no_persistent:
        serve.append("--no-persistent")
        front["persistent"] = False
    if args.abi:
        front["abi"] = args.abi
    if args.engine:
        serve += ["--engine", args.engine]
    if args.no_live_restart:
        serve.append("--no-live-restart")
    if args.bounce_buffer is not None:
        serve += ["--bounce-buffer", str(args.bounce_buffer)]
    return serve, front


def percentile(sorted_values, p):
    """The nearest-rank ``p``-th percentile of ``sorted_values`` (0 if empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * p // 100))
    return sorted_values[int(rank) - 1]


class Progress:
    """Progress on ``stream`` (stderr): a bar redrawn in place on a terminal;
    elsewhere a line when a phase starts and ``steps - 1`` more as it goes
    (at 25%, 50%, 75% for 4).  ``enabled=False`` prints nothing."""

    WIDTH = 30

    def __init__(self, stream=None, enabled=True, steps=4):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.steps = steps
        self._label, self._step, self._drawn, self._last = None, 0, False, 0.0

    def update(self, label, fraction, detail=""):
        if not self.enabled:
            return
        fraction = min(max(fraction, 0.0), 1.0)
        if label != self._label:
            self.end()
            self._label, self._step = label, 0
            if not self.tty:
                self.stream.write("%s ...\n" % label)
        if self.tty:
            now = time.monotonic()
            if now - self._last < 0.1 and fraction < 1.0:
                return
            self._last = now
            filled = int(fraction * self.WIDTH)
            self.stream.write("\r\x1b[K%-20s [%s%s] %3d%%  %s" % (
                label, "#" * filled, "." * (self.WIDTH - filled), fraction * 100, detail))
            self._drawn = True
        else:
            step = int(fraction * self.steps)
            if step <= self._step or step >= self.steps:
                return
            self._step = step
            self.stream.write("%s: %d%%%s\n" % (label, 100 * step // self.steps,
                                                "  " + detail if detail else ""))
        self.stream.flush()

    def event(self, event):
        """A guest's progress event: ``label``, ``fraction``, ``detail``."""
        self.update(event["label"], event["fraction"], event.get("detail", ""))

    def note(self, text):
        """A line of its own (the bar, if any, ends first)."""
        if self.enabled:
            self.end()
            self.stream.write(text + "\n")
            self.stream.flush()

    def end(self):
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
        self._label = None


# -- the guest's side -------------------------------------------------------

# where a guest's main thread waits for events: nothing is half done there
_WAITS = frozenset(getattr(selectors, name).select.__code__
                   for name in ("SelectSelector", "PollSelector", "EpollSelector")
                   if hasattr(selectors, name))


class Interruption:
    """SIGTERM in a guest process, taken only where it cannot leave a
    device's bookkeeping half done (a response taken off the ring but not
    yet handed to its transfer, which the detach would then wait for).

    Between jobs, or while a job waits for events in a selector, the handler
    raises KeyboardInterrupt at once.  Anywhere else inside a job it notes
    the request, and the job stops at its next :meth:`checkpoint`: each
    progress event is one, and long loops call it.
    """

    def __init__(self):
        self.requested = None  # the signal's name, once one came
        self.in_job = False

    def handler(self, signum, frame):
        self.requested = signal.Signals(signum).name
        if not self.in_job or (frame is not None and frame.f_code in _WAITS):
            self.checkpoint()

    def checkpoint(self):
        """Raise KeyboardInterrupt if a stop was asked for."""
        if self.requested:
            raise KeyboardInterrupt("stopped by " + self.requested)

    @contextlib.contextmanager
    def job(self):
        self.checkpoint()
        self.in_job = True
        try:
            yield
        finally:
            self.in_job = False


class GuestDomain:
    """What a guest process holds: xenstore and the platform as domain
    ``domid``, the device it attached (``dev``), and ``checkpoint()``, which
    a long job calls between steps: a stop asked for takes effect there."""

    def __init__(self, xs, platform, domid, checkpoint=lambda: None):
        self.xs, self.platform, self.domid = xs, platform, domid
        self.checkpoint = checkpoint
        self.dev = None

    def job_attach(self, params, emit):
        from blkif.frontend import BlockDevice
        self.job_detach({}, emit)
        self.dev = BlockDevice.attach(self.xs, self.platform, self.domid,
                                      params.get("vdev", "xvda"),
                                      frontend_options(params.get("options", {})))
        return dict(self.dev.negotiated, size=self.dev.size)

    def job_detach(self, params, emit):
        if self.dev is not None:
            self.dev.detach()  # idempotent: an interrupted detach is taken up again
            self.dev = None
        return {}

    def job_call(self, params, emit):
        module_name, _, name = params["function"].partition(":")
        if module_name not in GUEST_MODULES or not name.startswith("guest_"):
            raise BlkifError("a guest does not run %r" % params["function"])
        function = getattr(importlib.import_module(module_name), name)
        return function(self, params.get("params", {}), emit)


def frontend_options(values):
    """FrontendOptions from JSON values (``abi`` by its short name)."""
    from blkif.abi import ABI_NAMES
    from blkif.frontend import FrontendOptions
    values = dict(values)
    if "abi" in values:
        values["abi"] = ABI_NAMES[values["abi"]]
    return FrontendOptions(**values)


def guest_main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m blkif.sandbox",
                                     description="a guest domain of a blkif sandbox")
    parser.add_argument("--platform", choices=("sim", "xen"), default="sim",
                        help="xen: a process of a real domain (dom0 devices, its xenstore)")
    parser.add_argument("--xenstore", help="the sandbox's xenstored (sim)")
    parser.add_argument("--sim-path", help="the sim hypervisor's directory (sim)")
    parser.add_argument("--domid", type=int, required=True)
    parser.add_argument("--parent", type=int, default=0)
    args = parser.parse_args(argv)
    if args.platform == "sim" and not (args.xenstore and args.sim_path):
        parser.error("--platform sim needs --xenstore and --sim-path")
    _die_with_parent()
    if args.parent and os.getppid() != args.parent:
        return 1  # the parent died before we could ask to follow it
    stop = Interruption()
    signal.signal(signal.SIGTERM, stop.handler)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s guest-" + str(args.domid)
                               + " %(levelname)s %(name)s: %(message)s")
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol

    def send(message):
        out.write(json.dumps(message).encode() + b"\n")
        out.flush()

    def emit(event):
        stop.checkpoint()
        send({"event": event})

    from blkif.platform import open_platform
    from xenstore import Xenstore, XenstoreError, domain_socket_path
    if args.platform == "xen":
        store, platform = Xenstore.open(), open_platform("xen", domid=args.domid)
    else:
        store = Xenstore.open(domain_socket_path(args.xenstore, args.domid))
        platform = open_platform("sim", domid=args.domid, path=args.sim_path)
    with store as xs, platform:
        guest = GuestDomain(xs, platform, args.domid, stop.checkpoint)
        try:
            for line in sys.stdin.buffer:
                command = json.loads(line)
                if command["job"] == "quit":
                    break
                handler = getattr(guest, "job_" + command["job"], None)
                try:
                    if handler is None:
                        raise BlkifError("no job %r" % command["job"])
                    with stop.job():
                        result = handler(command.get("params", {}), emit)
                except (BlkifError, XenstoreError, OSError) as exc:
                    send({"error": str(exc), "kind": type(exc).__name__})
                except Exception as exc:  # a bug: say where, keep serving
                    traceback.print_exc()
                    send({"error": "internal error: %s: %s" % (type(exc).__name__, exc),
                          "kind": type(exc).__name__})
                else:
                    send({"result": result})
        except KeyboardInterrupt:  # SIGTERM: stop the job, detach, exit
            pass
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the detach finish
            guest.job_detach({}, None)
    return 0


if __name__ == "__main__":
    sys.exit(guest_main())
