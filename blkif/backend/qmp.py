"""A QMP client for the commands a VBD sends its qemu-storage-daemon.

QMP (QEMU's machine protocol) is JSON lines on a socket: the daemon greets,
the client sends ``qmp_capabilities``, then each ``{"execute": ...}`` gets
``{"return": ...}`` or ``{"error": {"class", "desc"}}``, with asynchronous
``{"event": ...}`` lines in between, which we skip.  One command at a time.
"""
import json
import socket

from blkif.backend.backing import StoreError

TIMEOUT = 10.0


class QmpError(StoreError):
    """QEMU refused a command (its ``desc``), or the socket failed."""


class Qmp:
    """A connected QMP session on the Unix socket ``path``."""

    def __init__(self, path, timeout=TIMEOUT):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
            self._file = self._sock.makefile("rb")
            if "QMP" not in self._read():
                raise QmpError("%s: no QMP greeting" % path)
            self.execute("qmp_capabilities")
        except OSError as exc:
            self.close()
            raise QmpError("QMP on %s: %s" % (path, exc)) from None
        except QmpError:
            self.close()
            raise

    def _read(self):
        line = self._file.readline()
        if not line:
            raise QmpError("QMP on %s: the daemon closed the connection" % self.path)
        try:
            return json.loads(line)
        except ValueError:
            raise QmpError("QMP on %s: not JSON: %r" % (self.path, line[:80])) from None

    def execute(self, command, **arguments):
        """Run ``command``; its return value, or QmpError with QEMU's reason."""
        message = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(message).encode() + b"\n")
            while True:
                reply = self._read()
                if "return" in reply:
                    return reply["return"]
                if "error" in reply:
                    raise QmpError("%s: %s" % (command, reply["error"].get("desc", reply)))
        except OSError as exc:
            raise QmpError("QMP on %s: %s: %s" % (self.path, command, exc)) from None

    def close(self):
        if getattr(self, "_file", None) is not None:
            self._file.close()
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
