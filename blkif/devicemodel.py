"""``blkif-device-model``: what libxl starts as a PV guest's device model, so
that the guest's ``backendtype=qdisk`` disks are served by ``blkif serve``.

An xl config names it with ``device_model_override=`` (docs/operations.md).
libxl execs it with QEMU's arguments and waits, as it does for QEMU, until

- it listens on the QMP socket(s) of its argv (``-chardev socket,id=ID,
  path=P,server=on`` used by ``-mon chardev=ID,mode=control``),
- ``/local/domain/0/device-model/<domid>/state`` says ``running``,
- each QMP client is greeted and its commands answered: ``qmp_capabilities``
  and ``query-chardev`` (all libxl 4.17 sends a PV guest's model), ``quit``;
  any other command gets QMP's CommandNotFound error.

It serves no device itself: ``blkif serve`` watches ``backend/qdisk`` and
serves those VBDs (``--types``).  So it first checks that a service serving
qdisk runs (its ``service.json``); without one it exits 1 with a line saying
so (in ``/var/log/xen/qemu-dm-<name>.log``) and ``xl create`` fails with
"device model did not start" instead of a guest that waits for its disks
forever.  It then lives as long as the domain: ``xl destroy`` sends it
SIGHUP; SIGTERM, SIGINT, or the domain's xenstore home going away end it too.
QEMU's other PV backends (vfb, vkbd, 9pfs, a console on QEMU) are not there.
"""
import json
import logging
import os
import selectors
import signal
import socket
import sys

from blkif import __version__
from blkif.backend import status
from blkif.errors import BlkifError, UsageError
from blkif.wakeup import Wakeup
from xenstore import Xenstore, XenstoreError

log = logging.getLogger("blkif.device-model")

DOMAIN_CHECK_SECONDS = 2.0
# The QEMU version we greet with: libxl reads it; 7.2 is Debian 12's QEMU.
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}
STOP_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)


def parse_qemu_argv(argv):
    """(domid, [QMP socket paths]) from QEMU's argv as libxl writes it.

    UsageError if there is no ``-xen-domid`` or no QMP control socket."""
    domid = None
    chardevs = {}  # id -> path of a server socket
    monitors = []  # ids of the chardevs with a QMP monitor (mode=control)
    args = iter(argv)
    for arg in args:
        if arg not in ("-xen-domid", "-chardev", "-mon"):
            continue
        value = next(args, None)
        if value is None:
            raise UsageError("%s needs a value" % arg)
        if arg == "-xen-domid":
            if not value.isdigit():
                raise UsageError("-xen-domid %r is not a domain id" % value)
            domid = int(value)
            continue
        kind, _, rest = value.partition(",")
        if arg == "-mon":
            rest = value  # no backend name first: chardev=ID,mode=control
        options = dict(item.partition("=")[::2] for item in rest.split(",") if item)
        if arg == "-mon" and options.get("mode") == "control":
            monitors.append(options.get("chardev"))
        elif kind == "socket" and "path" in options and options.get("server") in ("on", ""):
            chardevs[options.get("id")] = options["path"]
    if domid is None:
        raise UsageError("no -xen-domid: libxl starts a device model with one")
    paths = [chardevs[m] for m in monitors if m in chardevs]
    if not paths:
        raise UsageError("no QMP socket (-chardev socket,...,server=on with "
                         "-mon chardev=...,mode=control): libxl could not talk to us")
    return domid, paths


def greeting():
    return {"QMP": {"version": {"qemu": QEMU_VERSION,
                                "package": "blkif-device-model %s" % __version__},
                    "capabilities": []}}


def answer(command):
    """The reply to one QMP command (a dict), and whether it was ``quit``."""
    name = command.get("execute") if isinstance(command, dict) else None
    if name == "qmp_capabilities" or name == "quit":
        reply = {"return": {}}
    elif name == "query-chardev":
        reply = {"return": []}
    elif name is None:
        reply = {"error": {"class": "GenericError", "desc": "not a QMP command"}}
    else:
        reply = {"error": {"class": "CommandNotFound",
                           "desc": "The command %s has not been found" % name}}
    if isinstance(command, dict) and "id" in command:
        reply["id"] = command["id"]
    return reply, name == "quit"


class QmpClient:
    """One QMP connection: bytes in, replies out (JSON objects, CRLF-separated)."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = ""
        self.decoder = json.JSONDecoder()
        self.send(greeting())

    def send(self, message):
        self.sock.sendall(json.dumps(message).encode() + b"\r\n")

    def received(self, data):
        """Answer every complete command in ``data``; True once told to quit."""
        self.buffer += data.decode("utf-8", "replace")
        quit_asked = False
        while True:
            text = self.buffer.lstrip()
            if not text:
                self.buffer = ""
                return quit_asked
            try:
                command, end = self.decoder.raw_decode(text)
            except ValueError:
                if len(text) > 65536:  # no command is this long: drop the garbage
                    self.buffer = ""
                    self.send({"error": {"class": "GenericError", "desc": "bad JSON"}})
                else:
                    self.buffer = text
                return quit_asked
            self.buffer = text[end:]
            reply, quits = answer(command)
            log.info("QMP %s", command.get("execute") if isinstance(command, dict) else "?")
            self.send(reply)
            quit_asked = quit_asked or quits


def check_service(state_dir):
    """BlkifError unless a ``blkif serve`` serving qdisk VBDs runs."""
    service = None
    try:
        with open(os.path.join(state_dir, "service.json")) as f:
            service = json.load(f)
    except (OSError, ValueError):
        pass
    hint = "start it (systemctl start blkif) before guests with backendtype=qdisk disks"
    if not service or service.get("state") != "running" or not _alive(service.get("pid")):
        raise BlkifError("no blkif serve is running (state directory %s): %s"
                         % (state_dir, hint))
    if "qdisk" not in service.get("types", ()):
        raise BlkifError("blkif serve (pid %s) does not serve qdisk VBDs (its --types is %s): "
                         "restart it with qdisk in --types"
                         % (service.get("pid"), ",".join(service.get("types", ()))))


def _alive(pid):
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


class DeviceModel:
    def __init__(self, domid, qmp_paths, xenstore=None, dm_domid=0):
        self.domid = domid
        self.qmp_paths = qmp_paths
        self.xenstore = xenstore
        self.state_node = "/local/domain/%d/device-model/%d/state" % (dm_domid, domid)
        self.home = "/local/domain/%d" % domid
        self.wakeup = Wakeup()
        self.selector = selectors.DefaultSelector()
        self.stop_reason = None

    def _on_signal(self, signum, _frame):
        self.stop_reason = signal.Signals(signum).name
        self.wakeup.wake()

    def run(self):
        handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            for path in self.qmp_paths:
                self._listen(path)
            with Xenstore.open(self.xenstore) as xs:
                xs.write(self.state_node, "running")
                log.info("domain %d: device model running; QMP on %s; its qdisk VBDs are "
                         "blkif serve's", self.domid, ", ".join(self.qmp_paths))
                self._loop(xs)
            log.info("domain %d: device model stopping (%s)", self.domid, self.stop_reason)
            return 0
        finally:
            for key in list(self.selector.get_map().values()):
                if key.data != "wakeup":
                    key.fileobj.close()
            self.selector.close()
            self.wakeup.close()
            for path in self.qmp_paths:
                _unlink(path)
            for signum, handler in handlers.items():
                signal.signal(signum, handler)

    def _listen(self, path):
        _unlink(path)  # a socket left by a device model that died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise BlkifError("cannot listen on %s: %s" % (path, exc.strerror)) from None
        sock.listen(4)
        self.selector.register(sock, selectors.EVENT_READ, None)

    def _loop(self, xs):
        self.selector.register(self.wakeup.fileno(), selectors.EVENT_READ, "wakeup")
        while self.stop_reason is None:
            for key, _ in self.selector.select(DOMAIN_CHECK_SECONDS):
                if key.data == "wakeup":
                    self.wakeup.drain()
                elif key.data is None:
                    conn, _ = key.fileobj.accept()
                    self.selector.register(conn, selectors.EVENT_READ, QmpClient(conn))
                else:
                    self._serve(key.fileobj, key.data)
            if self.stop_reason is None and not xs.exists(self.home):
                self.stop_reason = "domain %d is gone" % self.domid

    def _serve(self, conn, client):
        try:
            data = conn.recv(65536)
            quit_asked = bool(data) and client.received(data)
        except OSError:
            data, quit_asked = b"", False
        if not data:
            self.selector.unregister(conn)
            conn.close()
        if quit_asked:
            self.stop_reason = "QMP quit"


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def main(argv=None):
    """Entry point: QEMU's argv in, exit status out (one line on stderr on error)."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if argv in (["-h"], ["--help"]):
        try:
            print("usage: blkif-device-model QEMU-ARGS... (as libxl starts a device model)\n")
            print(__doc__.replace("``", "`"))
        except BrokenPipeError:  # ``| head``
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    try:
        domid, paths = parse_qemu_argv(argv)
        log.info("started by libxl for domain %d: %s", domid, " ".join(argv))
        check_service(status.default_state_dir())
        return DeviceModel(domid, paths).run()
    except (BlkifError, XenstoreError, OSError) as exc:
        print("blkif-device-model: error: %s" % exc, file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
