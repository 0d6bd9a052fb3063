"""A VBD's storage as its ``params`` names it, opened and kept alive.

:class:`Storage` opens the store that a parsed ``params``
(``blkif.backend.params``) needs: a raw file or device as :class:`Store` (served by
the C engine), an image through its own :class:`StorageDaemon` and an
:class:`NbdStore` on the daemon's socket, an NBD URI as an :class:`NbdStore`.
Opening fails with StoreError (one line: the daemon's own message for a bad
image); :attr:`Target.kind` tells the VBD whether to give up (a file, as
ever) or to try again later (an image or NBD export may come back).

Afterwards the worker calls :meth:`Storage.tick` every second: a daemon that
died is logged and started again (back-off doubling to MAX_RESTART_DELAY),
and while no ring owns the NBD connection the tick notices it closing and
reconnects it; while rings are connected, their server does that.
:attr:`Storage.error` is the current failure (None when healthy).
"""
import logging
import os
import time

from blkif.backend.backing import Store, StoreError
from blkif.backend.nbd_store import NbdStore
from blkif.backend.storage_daemon import StorageDaemon

log = logging.getLogger(__name__)

FIRST_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0


class Storage:
    """The store behind one VBD; ``name`` (``vbd-<domid>-<devid>``) names its socket."""

    def __init__(self, target, writable=True, direct=False, run_dir=None, name="", label=""):
        self.target = target
        self.label = label
        self.daemon = None
        self.error = None
        self._restart_delay = FIRST_RESTART_DELAY
        self._restart_at = 0.0
        target = self.target
        if target.kind == "file":
            self.store = Store(target.path, writable=writable, direct=direct)
            return
        if target.kind == "nbd":
            self.store = NbdStore(target.uri, writable=writable)
            return
        if run_dir is None:
            raise StoreError("no run directory for the storage daemon's socket")
        os.makedirs(run_dir, exist_ok=True)
        self.daemon = StorageDaemon(target.path, target.driver,
                                    os.path.join(run_dir, name + ".nbd"),
                                    writable=writable, direct=direct, label=label)
        self.daemon.start()
        try:
            self.store = NbdStore(self.daemon.uri, writable=writable, name=target.path)
        except BaseException:
            self.daemon.stop()
            raise

    @property
    def is_nbd(self):
        return isinstance(self.store, NbdStore)

    def tick(self, idle):
        """Watch the daemon; with ``idle`` (no ring owns the store) the connection too."""
        now = time.monotonic()
        daemon = self.daemon
        if daemon is not None:
            why = daemon.poll()
            if why:
                log.error("%s: %s; starting it again", self.label, why)
                self.error = why
                self._restart_at = now + self._restart_delay
            if daemon.proc is None and now >= self._restart_at:
                self._restart_daemon(now)
        if idle and self.is_nbd:
            store = self.store
            store.probe()
            if store.down is not None and self.error is None:
                log.error("%s: %s", self.label, store.down)
                self.error = store.down
            if store.down is not None and (daemon is None or daemon.proc is not None):
                try:
                    store.reconnect()
                except StoreError as exc:
                    log.debug("%s: %s", self.label, exc)
                    return
                log.info("%s: storage is back: %s", self.label, store.path)
                self.error = None

    def grow(self, size):
        """Grow an image to ``size`` bytes under its daemon (online resize),
        or take the size an NBD export was grown to on its server; the caller
        holds the rings' I/O back meanwhile.  The store then has the new size.
        StoreError if QEMU refused, or the export is smaller than ``size``."""
        if self.target.kind == "nbd":
            self.store.reopen()
            if self.store.size < size:
                raise StoreError("the export has %d bytes, not %d: grow it on its server "
                                 "first" % (self.store.size, size))
            return
        if self.daemon is None:
            raise StoreError("%s is not an image served by qemu-storage-daemon" % self.target)
        self.store.close()  # the export goes: no connection may hold it
        try:
            self.daemon.grow(size)
        except StoreError as exc:
            try:
                self.store.reopen()
            except StoreError:
                pass  # down: the ring server retries, the tick restarts the daemon
            raise exc
        self.store.reopen()

    def _restart_daemon(self, now):
        try:
            self.daemon.start()
        except StoreError as exc:
            self._restart_delay = min(self._restart_delay * 2, MAX_RESTART_DELAY)
            self._restart_at = now + self._restart_delay
            log.error("%s: %s; next try in %.1f s", self.label, exc, self._restart_delay)
            self.error = str(exc)
            return
        log.info("%s: qemu-storage-daemon started again (start %d)", self.label,
                 self.daemon.starts)
        self._restart_delay = FIRST_RESTART_DELAY

    def status(self):
        """What ``blkif stats`` shows of the storage."""
        out = {"kind": self.target.kind, "target": str(self.target), "error": self.error}
        if self.daemon is not None:
            out["daemon_pid"] = self.daemon.pid
            out["daemon_starts"] = self.daemon.starts
        return out

    def close(self):
        self.store.close()
        if self.daemon is not None:
            self.daemon.stop()
