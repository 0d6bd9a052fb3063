"""One qemu-storage-daemon per image VBD, exporting the image over NBD.

Image formats (qcow2, vhd, vmdk, qed, ...) are QEMU's block drivers, run in
QEMU's own ``qemu-storage-daemon``; the VBD's worker talks NBD to it on a
private Unix socket (``<run dir>/vbd-<domid>-<devid>.nbd``).  The worker
starts it (:meth:`StorageDaemon.start`, which returns once the socket
accepts connections or raises StoreError with the daemon's own message),
polls it every tick (:meth:`poll`), starts it again when it died, and stops
it with the VBD (:meth:`stop`).  The daemon gets SIGTERM when the worker's
main thread dies (``setpriv --pdeathsig``), so a killed worker leaves none
behind (QEMU writes out its caches on SIGTERM: the writes it answered are in
the image); a successor's daemon waits until that one has let go of the
image's lock.  Its messages go to ``<socket>.log``.

Both nodes open with ``discard=unmap``, so a TRIM punches holes in the
image where the format can; ``read-only`` VBDs export read-only.
"""
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import time

from blkif.backend.backing import StoreError
from blkif.backend.qmp import Qmp, QmpError

log = logging.getLogger(__name__)

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
EXPORT = "disk"
SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1
LOCKED = "Is another process using the image"  # QEMU's image lock is held
QMP = ".qmp"  # the monitor's socket: the export's path with this added
EXPORT_GONE_TIMEOUT = 10.0


def export_options(writable):
    """The NBD export of node ``disk`` (``--export``, QMP ``block-export-add``)."""
    return {"type": "nbd", "id": "export", "node-name": EXPORT, "name": EXPORT,
            "writable": writable}


def daemon_argv(image, driver, socket_path, writable, direct=False, device=False):
    """qemu-storage-daemon's arguments for one image exported as ``disk``, with
    a QMP monitor on ``<socket_path>.qmp``."""
    protocol = {
        "driver": "host_device" if device else "file", "node-name": "file",
        "filename": image, "discard": "unmap", "read-only": not writable,
        "cache": {"direct": direct, "no-flush": False},
    }
    fmt = {"driver": driver, "node-name": EXPORT, "file": "file", "discard": "unmap",
           "read-only": not writable}
    server = {"addr": {"type": "unix", "path": socket_path}}
    return ["qemu-storage-daemon",
            "--blockdev", json.dumps(protocol), "--blockdev", json.dumps(fmt),
            "--nbd-server", json.dumps(server), "--export", json.dumps(export_options(writable)),
            "--chardev", "socket,id=qmp,path=%s%s,server=on,wait=off" % (socket_path, QMP),
            "--monitor", "chardev=qmp"]


class StorageDaemon:
    """A qemu-storage-daemon serving ``image`` (QEMU driver ``driver``) on ``socket_path``."""

    def __init__(self, image, driver, socket_path, writable=True, direct=False, label=""):
        if len(socket_path.encode()) + len(QMP) > SUN_PATH_MAX:
            raise StoreError("socket path %s is too long for a Unix socket; use a shorter "
                             "--state-dir" % socket_path)
        self.image, self.driver, self.socket_path = image, driver, socket_path
        self.writable, self.direct, self.label = writable, direct, label
        self.log_path = socket_path + ".log"
        self.uri = "nbd+unix:///%s?socket=%s" % (EXPORT, socket_path)
        self.proc = None
        self.starts = 0

    def start(self):
        """Start the daemon and wait until its socket accepts connections."""
        exe = shutil.which("qemu-storage-daemon")
        if exe is None:
            raise StoreError("qemu-storage-daemon is not installed (Debian: qemu-system-common)")
        try:
            device = stat.S_ISBLK(os.stat(self.image).st_mode)
        except OSError as exc:
            raise StoreError("cannot open image %s: %s" % (self.image, exc.strerror)) from None
        argv = daemon_argv(self.image, self.driver, self.socket_path, self.writable,
                           self.direct, device)
        argv[0] = exe
        setpriv = shutil.which("setpriv")
        if setpriv:  # die with the worker's main thread
            argv = [setpriv, "--pdeathsig", "TERM", "--"] + argv
        deadline = time.monotonic() + START_TIMEOUT
        self.starts += 1
        self._spawn(argv)
        while not self._accepts():
            if self.proc.poll() is not None:
                message = self._last_message() or "exit status %d" % self.proc.returncode
                self.proc = None
                if LOCKED in message and time.monotonic() < deadline:
                    # A killed worker's daemon is still writing out its caches
                    # (it got SIGTERM with its worker): wait for it.
                    time.sleep(0.05)
                    self._spawn(argv)
                    continue
                raise StoreError("qemu-storage-daemon cannot serve %s: %s" % (self.image, message))
            if time.monotonic() > deadline:
                self.stop()
                raise StoreError("qemu-storage-daemon for %s did not listen within %.0f s"
                                 % (self.image, START_TIMEOUT))
            time.sleep(0.02)
        log.info("%s: qemu-storage-daemon pid %d serves %s (%s) on %s", self.label,
                 self.proc.pid, self.image, self.driver, self.socket_path)

    def _remove_sockets(self):
        for path in (self.socket_path, self.socket_path + QMP):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _spawn(self, argv):
        self._remove_sockets()
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=logf, start_new_session=True)

    def _accepts(self):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(self.socket_path)
            except OSError:
                return False
        return True

    def _last_message(self):
        """The daemon's last line of output (its error message), without its argv."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
                lines = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        if not lines:
            return ""
        last = lines[-1]
        # "qemu-storage-daemon: --blockdev {...}: Could not open ...": keep the reason.
        return last.rsplit("}: ", 1)[-1]

    def poll(self):
        """None while running; else why it stopped (and forget it)."""
        if self.proc is None or self.proc.poll() is None:
            return None
        code = self.proc.returncode
        self.proc = None
        why = ("killed by %s" % signal.Signals(-code).name if code < 0
               else "exit status %d" % code)
        message = self._last_message()
        return "qemu-storage-daemon for %s stopped (%s)%s" % (
            self.image, why, ": " + message if message and code > 0 else "")

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def grow(self, size):
        """Grow the image to ``size`` bytes while the daemon serves it (online
        resize).  The export holds its node at a fixed size (it unshares
        'resize'), so it is removed (the caller has closed its NBD connection
        and holds its I/O back), the node resized and the export added again.

        QmpError says what QEMU refused.  If the export could not be put
        back, the daemon is stopped too: :class:`Storage` starts it again,
        exported from its command line, at whatever size the image has."""
        qmp, exported, refused = Qmp(self.socket_path + QMP), True, None
        try:
            qmp.execute("block-export-del", id="export", mode="hard")  # no client is left
            exported = False
            deadline = time.monotonic() + EXPORT_GONE_TIMEOUT
            while any(e["id"] == "export" for e in qmp.execute("query-block-exports")):
                if time.monotonic() > deadline:
                    raise QmpError("the export of %s was not removed within %.0f s"
                                   % (self.image, EXPORT_GONE_TIMEOUT))
                time.sleep(0.01)
            try:
                qmp.execute("block_resize", **{"node-name": EXPORT, "size": size})
            except QmpError as exc:
                refused = exc
            qmp.execute("block-export-add", **export_options(self.writable))
            exported = True
        finally:
            qmp.close()
            if not exported:
                log.error("%s: the export of %s could not be put back; restarting "
                          "qemu-storage-daemon", self.label, self.image)
                self.stop()
        if refused is not None:
            raise refused
        log.info("%s: %s grown to %d bytes under its qemu-storage-daemon", self.label,
                 self.image, size)

    def stop(self):
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; removes the sockets."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("%s: qemu-storage-daemon ignored SIGTERM; killing it", self.label)
                proc.kill()
                proc.wait()
        self._remove_sockets()
