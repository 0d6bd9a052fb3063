"""Running under systemd: the notify protocol and logs for journald.

``notify("READY=1")`` sends the fields as one datagram to the unix socket
named by ``$NOTIFY_SOCKET`` (``sd_notify(3)``; a leading ``@`` names an
abstract socket); without one it does nothing, so the service runs the same
from a shell.  :class:`Watchdog` sends ``WATCHDOG=1`` at half the
``$WATCHDOG_USEC`` interval when systemd asks for it (``WatchdogSec=``).

:func:`setup_logging` writes plain lines with a timestamp, except when
stderr is the journal's stream (``$JOURNAL_STREAM`` names its device and
inode, ``systemd.exec(5)``): the journal stamps each line itself, so the line
carries only a ``<N>`` syslog priority prefix, which journald turns into the
entry's priority (``journalctl -p err`` works).
"""
import logging
import os
import socket
import sys
import time

log = logging.getLogger(__name__)

# logging level -> syslog priority (sd-daemon.h SD_DEBUG ... SD_CRIT)
PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
              (logging.INFO, 6))


def notify(*fields):
    """Send ``fields`` ("READY=1", "STATUS=...") to systemd; False without
    ``$NOTIFY_SOCKET``.  A socket that cannot be reached is logged, not raised."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path[0] == "@":
        path = "\0" + path[1:]
    elif path[0] != "/":
        log.warning("NOTIFY_SOCKET=%s: only unix sockets are supported", path)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode(), path)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", path.lstrip("\0"), exc.strerror)
        return False
    return True


class Watchdog:
    """``WATCHDOG=1`` at half systemd's interval; call :meth:`kick` at least that often."""

    def __init__(self):
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())
        self.interval = int(usec) / 2e6 if usec.isdigit() and int(usec) and ours else None
        self._next = 0.0

    def kick(self):
        if self.interval is None:
            return
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.interval
            notify("WATCHDOG=1")


def under_journald(stream=None):
    """Is ``stream`` (default stderr) the journal's stream?"""
    stream = stream or sys.stderr
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return want == "%d:%d" % (st.st_dev, st.st_ino)


class JournalFormatter(logging.Formatter):
    """``<N>`` priority prefix, no timestamp (journald adds its own)."""

    def format(self, record):
        priority = next((p for level, p in PRIORITIES if record.levelno >= level), 7)
        return "<%d>%s" % (priority, super().format(record))


def setup_logging(level, fmt):
    """Log at ``level`` to stderr: ``"%(asctime)s " + fmt`` in a terminal or a
    file, ``fmt`` with a priority prefix under journald.  Like
    ``logging.basicConfig``, it does nothing if logging is already set up."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    if under_journald():
        handler.setFormatter(JournalFormatter(fmt))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s " + fmt))
    root.addHandler(handler)
    root.setLevel(level)
