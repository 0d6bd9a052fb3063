"""One ring served over NBD: every request in flight at once, answered as replies come.

The Python reference of how a VBD on an NBD store (an image behind its
qemu-storage-daemon, or a remote export) is served, with ``--engine
python``; the C engine does the same through libnbd's C API
(``csrc/nbd_link.c``).  Here the ring is served in Python on the ring's
thread, as the engine would.  :class:`NbdRingServer` is the reference :class:`RingServer`
(decoding, grants, responses) with the I/O made asynchronous; one round:

- take every request on the ring and submit it as NBD commands at once
  (READ, WRITE, FLUSH, TRIM; libnbd queues them on the one connection);
- poll the port, the stop pipe and the NBD socket; completions arrive from
  libnbd as callbacks that only queue them;
- answer each completed request (reads copied into the granted pages then),
  push once, notify at most once.

Data is copied between the granted pages and a buffer per request on both
sides (a NBD command is one contiguous buffer), and the grants are mapped
only while copying, so nothing stays mapped while a command is out.
Ordering: a FLUSH covers every write answered before it (NBD servers flush
what they have replied to); a BARRIER waits until nothing is in flight, then
flush, its data, flush.  An indirect request is answered with its
``indirect_op``.

With a journal region (live restart) every request taken is kept in its own
entry until answered (:class:`~blkif.backend.journal.RingJournal`, the C
engine's format), and a server made with ``resume`` first starts again what
its killed predecessor had in flight.  An image's qemu-storage-daemon gets
SIGTERM when its worker dies and writes out its caches on the way; the
successor starts its own.

When the connection dies, what is in flight completes with an error, every
new request is answered BLKIF_RSP_ERROR, ``on_storage(message)`` tells the
VBD (error node, ``blkif stats``), and the connection is retried with a
back-off; ``on_storage(None)`` when it is back.  A broken ring (overrun) ends
the thread as in :class:`RingServer`.
"""
import collections
import errno
import logging
import select
import time

from blkif.abi.constants import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    OP_NAMES,
    SECTOR_SIZE,
)
from blkif.backend.backing import StoreError
from blkif.backend.ring_service import POLL_MS, RingServer
from blkif.errors import RemoteProtocolError
from blkif.platform import EventChannelClosed, PlatformError
from blkif.request import RequestError

log = logging.getLogger(__name__)

FIRST_RETRY = 0.2
MAX_RETRY = 5.0
DRAIN_TIMEOUT = 30.0


class _Op:
    """A request on its way: the NBD steps left, its read buffer, when it was
    taken, its journal entry."""

    __slots__ = ("req", "steps", "buf", "taken", "entry")

    def __init__(self, req, steps, taken, entry):
        self.req, self.steps, self.buf, self.taken = req, steps, None, taken
        self.entry = entry


class NbdRingServer(RingServer):
    """Serves one ring of a VBD whose store is an :class:`NbdStore`.

    As :class:`RingServer`, plus ``on_storage(message or None)``, called from
    the ring's thread when the storage goes away and when it is back.
    """

    def __init__(self, *args, on_storage=lambda message: None, **kwargs):
        super().__init__(*args, **kwargs)
        self.io_mode, self.io_note = "nbd", "libnbd, every request in flight"
        self.on_storage = on_storage
        self._done = collections.deque()  # (op, errno), queued by completions
        self._submitted = 0  # ops submitted and not yet answered
        self._held = None  # a barrier waiting for the ring to be idle
        self._reported = None  # the storage failure we told the VBD about
        self._retry_at = 0.0
        self._retry = FIRST_RETRY
        # Journal entries, one per request in flight (those a predecessor
        # left are taken until their requests are answered again).
        left = {entry for entry, _ in self._recover}
        self._free_entries = [i for i in range(self.ring.size - 1, -1, -1) if i not in left]

    # -- the loop ---------------------------------------------------------

    def _serve(self, on_error):
        try:
            self._watch_storage()
            self.service()
            while True:
                poll = select.poll()
                poll.register(self.port.fileno(), select.POLLIN)
                poll.register(self._stop.fileno(), select.POLLIN)
                store_fd = None
                if self.store.down is None:
                    store_fd = self.store.fileno()
                    poll.register(store_fd, self.store.events())
                timeout = POLL_MS if self.store.down is None else int(self._retry * 1000)
                ready = dict(poll.poll(timeout))
                if self._stop.fileno() in ready:
                    return
                if store_fd in ready:
                    self.store.progress(ready[store_fd])
                if self.port.fileno() in ready:
                    self.stats.events += 1
                    self.port.clear()
                self._watch_storage()
                self.service()
        except EventChannelClosed:
            self.failure = "the frontend closed its event channel"
        except (RemoteProtocolError, PlatformError) as exc:
            self.failure = str(exc)
        except Exception as exc:  # a bug of ours: this VBD stops, said loudly, nothing else
            log.exception("%s: ring thread failed", self.label)
            self.failure = "internal error: %r" % exc
        on_error(self.failure)

    def service(self):
        """Submit what is on the ring, answer what has completed; returns how many taken."""
        ring = self.ring
        taken = 0
        while True:
            if self._recover and self._held is None:
                taken += self._resume_taken()
            while self._held is None and not self._recover and ring.pending_requests():
                self._take_one()
                taken += 1
            if self._held is not None and not self._submitted:
                op, self._held = self._held, None
                self._start(op)
                continue
            answered = bool(self._done)
            self._answer()
            if answered:
                self.stats.batches += 1
            if ring.push_responses():  # also what a bad request got at once
                self.port.notify()
                self.stats.notifies += 1
            if self._done:  # a barrier's next step, or a command refused at once
                continue
            if self._held is not None:
                if not self._submitted:
                    continue  # the last reply came: the held barrier starts now
                break  # it starts when the last reply comes
            if not ring.final_check_for_requests():
                break
        if self.grants is not None:
            self.grants.purge()
            self.grants.clean()
        return taken

    def _watch_storage(self):
        """Report a lost connection once, and retry it with a back-off."""
        store = self.store
        if store.down is None:
            return
        if self._reported is None:
            self._reported = store.down
            log.error("%s: %s; requests fail until it is back", self.label, store.down)
            self.on_storage(store.down)
        now = time.monotonic()
        if now < self._retry_at:
            return
        try:
            store.reconnect()
        except StoreError as exc:
            self._retry = min(self._retry * 2, MAX_RETRY)
            self._retry_at = now + self._retry
            log.debug("%s: %s", self.label, exc)
            return
        log.info("%s: storage is back: %s", self.label, store.path)
        self._reported, self._retry, self._retry_at = None, FIRST_RETRY, 0.0
        self.on_storage(None)

    def drain(self, timeout=DRAIN_TIMEOUT):
        """After :meth:`stop`: submit what is queued, wait for what is in flight."""
        if self.failure is not None:
            return
        deadline = time.monotonic() + timeout
        try:
            self.service()
            while self._submitted or self._held is not None:
                if time.monotonic() > deadline:
                    log.warning("%s: %d request(s) still in flight after %.0f s", self.label,
                                self._submitted, timeout)
                    return
                if self.store.down is None:
                    poll = select.poll()
                    poll.register(self.store.fileno(), self.store.events())
                    for _, revents in poll.poll(POLL_MS):
                        self.store.progress(revents)
                self.service()
        except (RemoteProtocolError, PlatformError) as exc:
            log.warning("%s: while draining: %s", self.label, exc)

    # -- requests ---------------------------------------------------------

    def _take_one(self):
        at = self.ring.req_cons
        raw = self.decoder.copy(self.ring)
        entry = self._free_entries.pop()
        if self.journal is not None:
            self.journal.take(raw, at, entry)
        self._begin(entry)

    def _resume_taken(self):
        """Start again, in ring order, what a killed predecessor had taken and
        not answered (its journal's entries), until a barrier must wait for
        the rest: returns how many were started."""
        count = 0
        while self._recover and self._held is None:
            entry, raw = self._recover.pop(0)
            self.decoder.load(raw)
            self.stats.resumed += 1
            self._begin(entry)
            count += 1
        return count

    def _begin(self, entry):
        """Decode the request just copied (or loaded) and start it."""
        stats = self.stats
        taken = time.monotonic_ns()
        stats.requests += 1
        stats.in_flight += 1
        req = None
        try:
            req = self.decoder.decode()
            stats.ops[OP_NAMES[req.kind]] += 1
            if req.kind != req.operation:
                stats.indirect += 1
            if req.kind != BLKIF_OP_DISCARD and req.grefs is None:
                self._read_indirect(req)
        except RequestError as err:
            self._fail(err, taken, entry)
            return
        except PlatformError as exc:
            log.warning("%s: request id %d: %s", self.label, req.id, exc)
            self._answer_one(req, BLKIF_RSP_ERROR, taken, entry)
            return
        kind = req.kind
        steps = []
        if kind in (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER):
            steps.append(self._flush)
        if kind == BLKIF_OP_DISCARD:
            steps.append(self._trim)
        elif req.grefs:
            steps.append(self._read if kind == BLKIF_OP_READ else self._write)
        if kind == BLKIF_OP_WRITE_BARRIER and req.grefs:
            steps.append(self._flush)
        op = _Op(req, steps, taken, entry)
        if kind == BLKIF_OP_WRITE_BARRIER and self._submitted:
            self._held = op  # nothing more is taken until the ring is idle
        else:
            self._start(op)

    def _start(self, op):
        self._submitted += 1
        self._next(op)

    def _next(self, op):
        if not op.steps:
            self._done.append((op, 0))
            return
        step = op.steps.pop(0)
        try:
            step(op, lambda err: self._done.append((op, err)))
        except PlatformError as exc:  # a grant that cannot be mapped
            log.warning("%s: request id %d: %s", self.label, op.req.id, exc)
            self._done.append((op, errno.EFAULT))

    def _read(self, op, done):
        op.buf = bytearray(op.req.nr_sectors * SECTOR_SIZE)
        self.store.submit_read(op.buf, op.req.offset, done)

    def _write(self, op, done):
        data = bytearray(op.req.nr_sectors * SECTOR_SIZE)
        with self._segments(op.req, writable=False) as iov:
            at = 0
            for view in iov:
                data[at:at + len(view)] = view
                at += len(view)
        self.store.submit_write(data, op.req.offset, done)

    def _flush(self, op, done):
        self.store.submit_flush(done)

    def _trim(self, op, done):
        self.store.submit_trim(op.req.offset, op.req.nr_sectors * SECTOR_SIZE, done)

    def _answer(self):
        while self._done:
            op, err = self._done.popleft()
            if not err and op.steps:
                self._next(op)
                continue
            self._submitted -= 1
            req = op.req
            if not err and op.buf is not None:
                err = self._copy_out(op)
            if err:
                self._io_failed(req, err)
            elif req.kind == BLKIF_OP_READ:
                self.stats.read_bytes += req.nr_sectors * SECTOR_SIZE
            elif req.grefs:
                self.stats.write_bytes += req.nr_sectors * SECTOR_SIZE
            status = (BLKIF_RSP_OKAY if not err else
                      BLKIF_RSP_EOPNOTSUPP if err == errno.EOPNOTSUPP else BLKIF_RSP_ERROR)
            self._answer_one(req, status, op.taken, op.entry, count_error=False)

    def _put_response(self, id, operation, status, entry=None):
        """As the reference's; the request's journal entry is free again."""
        super()._put_response(id, operation, status, entry)
        self._free_entries.append(entry)

    def _copy_out(self, op):
        """A completed read's data into the granted pages; 0 or an errno."""
        try:
            with self._segments(op.req, writable=True) as iov, memoryview(op.buf) as data:
                at = 0
                for view in iov:
                    view[:] = data[at:at + len(view)]
                    at += len(view)
        except PlatformError as exc:
            log.warning("%s: request id %d: %s", self.label, op.req.id, exc)
            return errno.EFAULT
        return 0

    def _io_failed(self, req, err):
        self.stats.errors += 1
        if self.store.down is None:  # while it is down, one line said it all
            log.error("%s: %s of %d sectors at %d failed: %s", self.label,
                      OP_NAMES[req.kind], req.nr_sectors, req.sector_number,
                      errno.errorcode.get(err, err))

    def _answer_one(self, req, status, taken, entry, count_error=True):
        if count_error and status != BLKIF_RSP_OKAY:
            self.stats.errors += 1
        self._put_response(req.id, req.kind, status, entry)
        self.stats.in_flight -= 1
        self.stats.observe(time.monotonic_ns() - taken)
