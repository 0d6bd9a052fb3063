"""A backing store on an NBD server, through libnbd (Debian's python3-libnbd).

:class:`NbdStore` holds one libnbd handle connected to an NBD URI: a remote
server, or the VBD's own qemu-storage-daemon (``storage_daemon``).  What the
export says decides the disk: its size, read-only exports give a read-only
disk, TRIM support gives ``feature-discard``, and FLUSH is sent only where
the server has a write cache to flush (no ``can_flush``: writes are durable
when answered, NBD's rule).

I/O is asynchronous: ``submit_*`` queue a command and return at once, and
``done(errno)`` is called from :meth:`progress` (or from a ``submit_*``)
when its reply arrives; the caller polls :meth:`fileno` for
:meth:`direction`.  One thread owns a store: the ring server of its VBD
(``nbd_ring``, the Python engine), or the worker's main thread while no ring
is connected.  The C engine keeps a connection of its own to the export
(``csrc/nbd_link.c``, the same rules); meanwhile the store closes its own
(:meth:`lend`), since a server may take one client only.

A connection that dies (server gone, daemon killed) makes :attr:`down` say
why; commands then in flight complete with an error, new ones are refused
(``done(ENOTCONN)``), and :meth:`reconnect` tries again (bounded by
CONNECT_TIMEOUT).  A server that comes back with another size is refused.
If writes were answered that no FLUSH had covered when the connection died,
the first FLUSH after it fails (EIO): they may be lost, and the guest must
hear it (QEMU's file-posix makes a failed fsync sticky for the same reason).
"""
import errno
import logging
import os
import select
import time

from blkif.abi.constants import SECTOR_SIZE
from blkif.backend.backing import StoreError

try:
    import nbd
except ImportError:  # reported when an NBD-backed VBD is opened
    nbd = None

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2.0
FLUSH_TIMEOUT = 30.0
DISCARD_GRANULARITY = 4096


class NbdStore:
    """An open NBD export.  ``uri`` is an NBD URI; ``name`` what logs call it.

    ``writable=False`` (``mode=r``), or a read-only export, gives a read-only
    store.  Raises StoreError if the server cannot be reached or spoken to.
    """

    fd = None  # no descriptor: the C engine connects by ``uri``

    def __init__(self, uri, writable=True, name=None):
        if nbd is None:
            raise StoreError("the nbd module (Debian python3-libnbd) is not importable")
        self.uri = uri
        self.path = name or uri
        self.handle = None
        self.down = None  # why the connection is gone, or None
        self.lent = False  # closed while the C engine holds a connection of its own
        self.size = None
        self._resized = False  # the next connection may bring another size (reopen)
        self._writes_done = 0  # writes answered OK so far
        self._writes_flushed = 0  # how many of them a FLUSH answered OK covers
        self._lost_writes = False  # the next FLUSH must fail: see _lost
        self._connect()
        self.sectors = self.size // SECTOR_SIZE  # as published; current_size() is the export's
        h = self.handle
        self.writable = writable and not h.is_read_only()
        self.can_flush = h.can_flush()
        self.discard_supported = self.writable and h.can_trim()
        minimum = h.get_block_size(nbd.SIZE_MINIMUM) or 1
        self.discard_granularity = max(DISCARD_GRANULARITY, minimum)
        self.discard_alignment = 0
        self.discard_secure = False  # NBD has no secure erase
        self.logical_block_size = SECTOR_SIZE
        self.physical_block_size = SECTOR_SIZE

    def current_size(self):
        """The export's size: fixed for a connection (NBD tells no growth;
        a server that comes back bigger is refused, unless :meth:`reopen`ed
        after growing an image on purpose)."""
        return self.size

    def _connect_again(self):
        """:meth:`_connect` right after this worker closed a connection, tried
        again for up to CONNECT_TIMEOUT: a server that takes one client may
        not have seen the last one go yet."""
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while True:
            try:
                self._connect()
                return
            except StoreError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _connect(self):
        h = nbd.NBD()  # freed (connection closed) when the last reference goes
        try:
            h.aio_connect_uri(self.uri)
            deadline = time.monotonic() + CONNECT_TIMEOUT
            while h.aio_is_connecting():
                if time.monotonic() > deadline:
                    raise StoreError("cannot connect to %s: timed out" % self.path)
                self._wait(h, min(0.2, max(0.0, deadline - time.monotonic())))
            if not h.aio_is_ready():
                raise StoreError("cannot connect to %s: the handshake failed" % self.path)
            size = h.get_size()
        except nbd.Error as exc:
            raise StoreError("cannot connect to %s: %s" % (self.path, _reason(exc))) from None
        if self.size is not None and size != self.size and not self._resized:
            raise StoreError("%s came back with %d bytes instead of %d; refusing it"
                             % (self.path, size, self.size))
        self.handle, self.size, self.down, self._resized = h, size, None, False

    @staticmethod
    def _wait(h, timeout):
        """One round of libnbd's state machine, waiting at most ``timeout`` s."""
        poll = select.poll()
        poll.register(h.aio_get_fd(), _events(h))
        for _, revents in poll.poll(timeout * 1000):
            _notify(h, revents)

    def reconnect(self):
        """Connect again after :attr:`down`; StoreError while the server is away."""
        self._connect()
        log.info("reconnected to %s", self.path)

    def reopen(self):
        """Connect again to an export whose size changed on purpose (an online
        resize of its image): the new size is taken.  StoreError if it cannot
        be; then :attr:`down` says so, and the next :meth:`reconnect` (the ring
        server's retries) takes the new size."""
        self.handle, self._resized = None, True
        try:
            self._connect_again()
        except StoreError as exc:
            self.down = str(exc)
            raise

    def lend(self):
        """Close this connection while the C engine holds its own (which
        flushes and closes it when done); :meth:`take_back` after."""
        self.handle, self.lent = None, True

    def take_back(self):
        """Connect again once the engine closed its connection.  StoreError
        if the server is away; :attr:`down` then says why, and the worker's
        tick reconnects."""
        self.lent = False
        try:
            self._connect_again()
        except StoreError as exc:
            self.down = str(exc)
            raise

    # -- the ring server's asynchronous interface ---------------------------

    def fileno(self):
        return self.handle.aio_get_fd()

    def events(self):
        """The poll events the connection waits for now."""
        return _events(self.handle)

    def progress(self, revents):
        """After poll: let libnbd read/write; completions run from here."""
        try:
            _notify(self.handle, revents)
        except nbd.Error as exc:
            self._lost(_reason(exc))
        self._check()

    def probe(self):
        """With nothing in flight: notice a connection the server closed."""
        if self.down is not None or self.lent:
            return
        poll = select.poll()
        poll.register(self.fileno(), select.POLLIN)
        for _, revents in poll.poll(0):
            self.progress(revents)
        self._check()

    def _check(self):
        if self.down is None and (self.handle.aio_is_dead() or self.handle.aio_is_closed()):
            self._lost("the server closed the connection")

    def _lost(self, why):
        """The connection is gone.  Writes the server answered but no FLUSH
        covered may have been lost with it (a daemon's caches, a crashed
        host), so the next FLUSH fails: the guest learns it, as from a disk."""
        if self.down is None:
            self.down = "lost the connection to %s: %s" % (self.path, why)
            if self.can_flush and self._writes_done > self._writes_flushed:
                self._lost_writes = True

    def submit_read(self, buf, offset, done):
        """Read ``len(buf)`` bytes into ``buf`` (kept alive until ``done``)."""
        self._submit(done, lambda cb: self.handle.aio_pread(
            nbd.Buffer.from_buffer(buf), offset, completion=cb))

    def submit_write(self, buf, offset, done):
        def written(err):
            self._writes_done += not err
            done(err)
        self._submit(written, lambda cb: self.handle.aio_pwrite(
            nbd.Buffer.from_buffer(buf), offset, completion=cb))

    def submit_flush(self, done):
        """FLUSH; it covers every write answered before it (NBD's rule)."""
        if not self.can_flush:  # no write cache: every answered write is durable
            done(0)
            return
        if self._lost_writes and self.down is None:
            self._lost_writes = False
            log.error("%s: writes answered before the connection was lost may not be on "
                      "disk; failing this flush", self.path)
            done(errno.EIO)
            return
        covers = self._writes_done

        def flushed(err):
            if not err:
                self._writes_flushed = max(self._writes_flushed, covers)
            done(err)
        self._submit(flushed, lambda cb: self.handle.aio_flush(completion=cb))

    def submit_trim(self, offset, length, done):
        if not self.discard_supported:
            done(errno.EOPNOTSUPP)
            return
        self._submit(done, lambda cb: self.handle.aio_trim(length, offset, completion=cb))

    def _submit(self, done, issue):
        if self.down is not None:
            done(errno.ENOTCONN)
            return

        def completion(err):
            done(err.value)
            return 1  # retire the command

        try:
            issue(completion)
        except nbd.Error as exc:
            self._check()
            done(exc.errnum or errno.EIO)

    # -- synchronous, for the worker's main thread -------------------------

    def flush(self):
        """FLUSH and wait for it (at most FLUSH_TIMEOUT); OSError if it failed."""
        result = []
        self.submit_flush(result.append)
        deadline = time.monotonic() + FLUSH_TIMEOUT
        while not result:
            if self.down is not None or time.monotonic() > deadline:
                raise OSError(errno.EIO, self.down or "flush timed out")
            try:
                self._wait(self.handle, 0.2)
            except nbd.Error as exc:
                self._lost(_reason(exc))
            self._check()
        if result[0]:
            raise OSError(result[0], "NBD flush failed: %s" % os.strerror(result[0]))

    def close(self):
        self.handle = None  # libnbd closes the connection with the handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _events(h):
    """poll(2) events for the direction libnbd waits in."""
    direction = h.aio_get_direction()
    return ((select.POLLIN if direction & nbd.AIO_DIRECTION_READ else 0)
            | (select.POLLOUT if direction & nbd.AIO_DIRECTION_WRITE else 0))


def _notify(h, revents):
    """Tell libnbd what poll(2) saw (reading first: a reply may change what it wants)."""
    if revents & (select.POLLIN | select.POLLHUP | select.POLLERR):
        h.aio_notify_read()
    elif revents & select.POLLOUT:
        h.aio_notify_write()


def _reason(exc):
    """libnbd's message without the function name it starts with."""
    return str(exc).split(": ", 1)[-1]
