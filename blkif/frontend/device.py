"""A VBD seen from the guest: the xenbus side and a block-device API
(Linux: xen-blkfront.c ``talk_to_blkback``, ``blkback_changed``,
``blkfront_connect``, ``blkfront_closing``).

How it works:

- :meth:`BlockDevice.attach` reads ``backend`` and ``backend-id`` from our
  directory and watches the backend's ``state``.  At InitWait it reads the
  offer, chooses (our options capped at the offer), grants one
  :class:`FrontQueue` per queue and writes the :class:`Connection` nodes
  together with Initialised in one transaction.  At Connected it reads the
  disk and switches Connected.
- I/O: ``submit_*`` validate the arguments, put the transfer on the least
  busy queue and return an :class:`IOHandle`; :meth:`BlockDevice.wait` and
  :meth:`IOHandle.result` drive the rings until it finishes.
- The backend goes away (Closing, Closed, its directory removed, or an event
  channel closes because its process died): every transfer in flight fails
  with :class:`BlockIOError` and we switch Closed.  The rings are released
  once the backend is Closed (it has unmapped them), or at once if it died.
  With ``reconnect`` we start over (Initialising) once the backend is Closed
  or InitWait again; the backend then goes InitWait and setup runs again.
- Online resize: the backend writes a new ``sectors`` and Connected again;
  we read the new size (:attr:`BlockDevice.size`) as blkfront does.
- :meth:`BlockDevice.detach`: Closing; when the backend is Closing, Closed;
  when it is Closed too, release the rings.

Data never leaves from or lands in the caller's memory: it is copied through
each queue's own pool of pages, zeroed when granted and used for nothing but
this device's transfers, so a backend sees only what was sent to it.  That is
Linux blkfront's bounce mode, which it turns on for ``trusted=0`` (XSA-403);
ours is always on, and ``negotiated["trusted"]`` records the toolstack's node.

Nothing runs in the background except the xenstore watch thread, which only
writes a byte to a pipe: the caller's thread runs the state machine and the
rings in :meth:`BlockDevice._poll`, a select over that pipe and the queues'
event channels.  One thread uses a device at a time.

Unlike Linux, we do not set up from Initialising when the backend is already
Connected: a backend process that died leaves Connected behind, and rings
offered to it would never be served.
"""
import contextlib
import logging
import re
import selectors
import time
from dataclasses import dataclass
from typing import Optional

from blkif.abi import NATIVE, Abi
from blkif.abi.constants import (
    BLKIF_MAX_INDIRECT_SEGMENTS,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_ERROR,
    SECTOR_SIZE,
    XENBUS_MAX_RING_GRANT_ORDER,
)
from blkif.errors import LocalProtocolError, RemoteProtocolError, UsageError
from blkif.frontend.queue import FrontQueue
from blkif.negotiate import (
    MAX_QUEUES,
    BackendOffer,
    Connection,
    DiskInfo,
    FrontendWants,
    QueueRing,
    frontend_action,
    node_reader,
)
from blkif.platform import EventChannelClosed, PlatformError
from blkif.toolstack import frontend_path, vdev_to_devid
from blkif.frontend.transfer import (
    BlockIOError,
    IOHandle,
    NotConnected,
    check_range,
    describe,
)
from blkif.wakeup import Wakeup
from xenstore import NoEntry, PermissionDenied, XenbusState, XenstoreError

log = logging.getLogger(__name__)

S = XenbusState
# Nodes of ours that describe rings: a new setup removes them before writing its own.
RING_NODES = re.compile(r"^(ring-ref\d*|event-channel|ring-page-order"
                        r"|multi-queue-num-queues|queue-\d+)$")
# Backend states from which a Closed frontend starts over (reconnect).
START_OVER_FROM = (S.Closed, S.InitWait)
MAX_FAILED_SETUPS = 3  # backend closed that many setups in a row: give up


@dataclass(frozen=True)
class FrontendOptions:
    """Our limits and behaviour; ``None`` takes what the backend offers.

    ``pool_pages`` is the data pages granted per queue: it bounds the bytes
    in flight and the indirect segments per request (a backend offering 4096
    would otherwise have each queue grant 4096 pages); ``timeout`` bounds
    connecting, reconnecting and each synchronous call; ``abi`` is the ring
    layout, written as ``protocol``.
    """

    max_ring_page_order: Optional[int] = None
    max_queues: Optional[int] = None
    max_indirect_segments: Optional[int] = None
    persistent: bool = True
    pool_pages: int = 512
    timeout: float = 30.0
    reconnect: bool = True
    abi: Abi = NATIVE

    def __post_init__(self):
        for name, top in (("max_ring_page_order", XENBUS_MAX_RING_GRANT_ORDER),
                          ("max_queues", MAX_QUEUES),
                          ("max_indirect_segments", BLKIF_MAX_INDIRECT_SEGMENTS)):
            value = getattr(self, name)
            low = 1 if name == "max_queues" else 0
            if value is not None and not low <= value <= top:
                raise UsageError("%s = %r not in %d..%d" % (name, value, low, top))
        if self.pool_pages < 1:
            raise UsageError("pool_pages = %r must be at least 1" % self.pool_pages)
        if not self.timeout > 0:
            raise UsageError("timeout = %r must be positive" % self.timeout)

    def wants(self):
        """The :class:`FrontendWants` these options stand for."""
        def pick(value, top):
            return top if value is None else value
        return FrontendWants(
            max_ring_page_order=pick(self.max_ring_page_order, XENBUS_MAX_RING_GRANT_ORDER),
            max_queues=pick(self.max_queues, MAX_QUEUES),
            # a request never uses more pages than the pool has
            max_indirect_segments=min(pick(self.max_indirect_segments,
                                           BLKIF_MAX_INDIRECT_SEGMENTS), self.pool_pages),
            persistent=self.persistent,
        )


class _FieldLog(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return "%s %s" % (self.extra["fields"], msg), kwargs


class BlockDevice:
    """One VBD of a guest; see the module comment for its life.

    Make one with :meth:`attach`; ``with`` detaches on exit.  Not thread-safe:
    one thread submits, waits and detaches.
    """

    def __init__(self, xs, platform, domid, devid, options):
        self.xs, self.platform, self.options = xs, platform, options
        self.domid, self.devid = domid, devid
        self.log = _FieldLog(log, {"fields": "domid=%d devid=%d" % (domid, devid)})
        self.path = frontend_path(domid, devid)
        try:
            self.backend = xs.read_str(self.path + "/backend")
            self.backend_id = xs.read_int(self.path + "/backend-id")
        except (NoEntry, PermissionDenied) as exc:  # EACCES: a missing node we may not see
            raise UsageError("domain %d has no VBD %d (%s)" % (domid, devid, exc)) from None
        self._backend_reader = node_reader(xs, self.backend)  # the backend's nodes
        self.state = S.Unknown          # ours, as last written
        self.backend_state = S.Unknown  # theirs, as last read
        self.queues = []
        self._retired = []  # queues closed but maybe still mapped by the backend
        self.offer = self.disk = None
        self.negotiated = {}
        self._inflight = {}  # (queue index, tag) -> IOHandle
        self._port_fds = []
        self._next_queue = 0
        self._start_over = True  # go back to Initialising after a close
        self._failed_setups = 0
        self._error = None
        self._closed = False
        self._plugged = 0  # > 0 inside plugged(): submits wait to be pushed
        self._wakeup = Wakeup()  # the watch thread only wakes the driving thread
        try:
            self._watch = xs.watch(self.backend + "/state", callback=self._wakeup.wake)
        except BaseException:
            self._wakeup.close()
            raise
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wakeup.fileno(), selectors.EVENT_READ, None)

    # -- attach and detach --------------------------------------------------

    @classmethod
    def attach(cls, xs, platform, domid, vdev, options=None):
        """Connect VBD ``vdev`` (``xvda`` or a devid) of guest ``domid``.

        ``xs`` is connected as that guest, ``platform`` opened as it.  Returns a
        Connected device.  Raises UsageError if there is no such VBD, and
        :class:`NotConnected` if the backend does not connect within
        ``options.timeout`` or breaks the protocol (``__cause__`` is then the
        RemoteProtocolError).  Nothing stays granted or watched after a failure.
        """
        devid = vdev if isinstance(vdev, int) else vdev_to_devid(vdev)
        dev = cls(xs, platform, domid, devid, options or FrontendOptions())
        try:
            dev._begin()
            dev.wait_connected()
        except BaseException:
            dev._abandon()
            raise
        return dev

    def _begin(self):
        own = self.xs.read_state(self.path + "/state")
        # Anything but a fresh VBD is a previous connection: close it first.
        self._switch(S.Initialising if own == S.Initialising else S.Closed)
        self._react()

    def detach(self, timeout=None):
        """Close cleanly: let transfers finish, Closing, Closed once the
        backend is Closing, release the rings once it is Closed.  Idempotent;
        logs (does not raise) if the backend does not answer within
        ``timeout``, and releases everything anyway."""
        if self._closed:
            return
        timeout = self.options.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self._start_over = False
        try:
            if self._inflight:
                self.wait(None, timeout)
            if self.state in (S.Initialised, S.Connected) and self._error is None:
                self._switch(S.Closing)
                self._drive(lambda: self.state == S.Closed, deadline - time.monotonic())
            if self.backend_state == S.Closing:  # alive: let it unmap before we go
                self._drive(lambda: self.backend_state in (S.Closed, S.Unknown),
                            deadline - time.monotonic())
        except XenstoreError as exc:
            self.log.warning("xenstore failed while detaching: %s", exc)
        if self.state != S.Closed or self.backend_state not in (S.Closed, S.Unknown):
            self.log.warning("backend did not close within %.1fs (backend %s)",
                             timeout, self.backend_state.name)
        self._abandon()
        self.log.info("detached")

    def _abandon(self):
        """Release everything now, whatever the backend does; Closed."""
        self._start_over = False
        self._teardown("device detached")
        self._release_retired()
        if self.state != S.Closed and not self.xs.closed:
            try:
                self._switch(S.Closed)
            except XenstoreError as exc:
                self.log.warning("cannot switch Closed: %s", exc)
        self._closed = True
        self._watch.close()
        self._selector.close()
        self._wakeup.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()

    # -- the state machine --------------------------------------------------

    def _switch(self, state, txn=None):
        (txn or self.xs).switch_state(self.path + "/state", state)
        if state != self.state:
            self.log.info("state %s -> %s (backend %s)", self.state.name, state.name,
                          self.backend_state.name)
        self.state = state

    def _react(self):
        """Act on the backend's current state until nothing is left to do."""
        try:
            for _ in range(8):  # each action moves us on; a handful is plenty
                if self._closed or self._error is not None:
                    return
                self.backend_state = self.xs.read_state(self.backend + "/state")
                if self._retired and self.backend_state in (S.Closed, S.Unknown):
                    self._release_retired()
                action = self._action(self.backend_state)
                if action is None:
                    return
                self.log.debug("backend %s: %s", self.backend_state.name, action)
                getattr(self, "_do_" + action)()
        except XenstoreError as exc:
            self._fail(exc)

    def _action(self, backend):
        """What to do about ``backend``: FRONTEND_ON_BACKEND plus reconnecting."""
        own = self.state
        action = frontend_action(own, backend)
        if action == "connect" and own != S.Initialised:
            action = None  # no rings of ours are offered: wait for InitWait
        if backend == S.Unknown and own != S.Closed:
            action = "close"  # the backend directory was removed
        if action == "close" and own not in (S.Initialised, S.Connected, S.Closing):
            action = None  # nothing of ours to close: wait for the backend
        if action is None and own == S.Closed and self._start_over and (
                backend in START_OVER_FROM):
            action = "start_over"
        if action is None and own == backend == S.Connected and self.disk is not None and (
                self._backend_reader("sectors") != str(self.disk.sectors)):
            action = "resize"  # the backend wrote a new size and Connected again
        return action

    def _do_start_over(self):
        self._release_retired()
        self._switch(S.Initialising)

    def _do_setup(self):
        """Blkfront ``talk_to_blkback``: rings, channels, nodes, Initialised."""
        try:
            offer = BackendOffer.read(self._backend_reader)
        except RemoteProtocolError as exc:
            self._fail(exc)
            return
        order, nqueues, indirect, _ = self.options.wants().choose(offer)
        # What we want, whatever the backend shows now: Linux blkback writes
        # feature-persistent only when it connects, so blkfront too asks at
        # setup and takes what was agreed from the backend at Connected.
        persistent = self.options.persistent
        try:
            self._grant_queues(nqueues, order, indirect)
        except PlatformError as exc:
            self._fail(exc)
            return
        conn = Connection(
            queues=tuple(QueueRing(tuple(q.ring_refs), q.port.port) for q in self.queues),
            ring_page_order=order, protocol=self.options.abi.protocol, persistent=persistent)
        self._publish(conn.nodes())
        self.negotiated = {
            "trusted": self.xs.read_str(self.path + "/trusted", "1") != "0", "bounce": True,
            "abi": self.options.abi.tag, "protocol": self.options.abi.protocol,
            "ring_page_order": order, "ring_pages": 1 << order, "queues": nqueues,
            "indirect_segments": indirect, "persistent": persistent,
        }
        self.log.info("setup: %d queue(s) of %d ring page(s), indirect %d, persistent %s, %s",
                      nqueues, 1 << order, indirect, "on" if persistent else "off",
                      self.options.abi.protocol)

    def _grant_queues(self, count, order, indirect):
        try:
            for _ in range(count):
                self.queues.append(FrontQueue(self.platform, self.backend_id,
                                              self.options.abi, order, indirect,
                                              self.options.pool_pages))
        except BaseException:
            self._retired.extend(self.queues)
            self.queues = []
            self._release_retired()
            raise
        for i, queue in enumerate(self.queues):
            fd = queue.port.fileno()
            self._selector.register(fd, selectors.EVENT_READ, i)
            self._port_fds.append(fd)

    def _publish(self, nodes):
        """Our ring nodes and Initialised, in one transaction; the ring nodes
        of an earlier connection go first (it may have had more pages or queues)."""
        for txn in self.xs.transactions():
            with txn:
                for name in txn.list(self.path):
                    if RING_NODES.match(name):
                        txn.rm("%s/%s" % (self.path, name))
                for key, value in nodes.items():
                    txn.write("%s/%s" % (self.path, key), value)
                self._switch(S.Initialised, txn)

    def _do_connect(self):
        """Blkfront ``blkfront_connect``: read the disk and features, Connected."""
        try:
            disk = DiskInfo.read(self._backend_reader)
            offer = BackendOffer.read(self._backend_reader)
        except RemoteProtocolError as exc:
            self._fail(exc)
            return
        self.disk, self.offer = disk, offer
        self._switch(S.Connected)
        self._failed_setups = 0
        self.negotiated.update(
            persistent=self.options.persistent and offer.persistent,
            flush=offer.flush, barrier=offer.barrier, discard=offer.discard,
            discard_granularity=offer.discard_granularity,
            discard_alignment=offer.discard_alignment, discard_secure=offer.discard_secure,
            sectors=disk.sectors, sector_size=disk.sector_size,
            physical_sector_size=disk.physical_sector_size, readonly=disk.readonly)
        self.log.info("connected: %d sectors of %d bytes%s, flush %s, discard %s",
                      disk.sectors, disk.sector_size, " read-only" if disk.readonly else "",
                      "on" if offer.flush else "barrier" if offer.barrier else "off",
                      "on" if offer.discard else "off")

    def _do_resize(self):
        """Blkfront ``blkfront_connect`` when already connected: take the new size."""
        try:
            disk = DiskInfo.read(self._backend_reader)
        except RemoteProtocolError as exc:
            self._fail(exc)
            return
        self.log.info("resized: %d -> %d sectors", self.disk.sectors, disk.sectors)
        self.disk = disk
        self.negotiated["sectors"] = disk.sectors

    def _do_close(self):
        """Blkfront ``blkfront_closing``: fail what is in flight, Closed.

        The rings stay granted until the backend is Closed (it has unmapped
        and unbound by then), as blkfront frees them only later."""
        self._lost("backend is %s" % self.backend_state.name)

    def _lost(self, reason, release=False):
        """The connection is gone: fail transfers, retire the rings, Closed.

        ``release``: free the rings now (the backend died, nobody maps them).
        """
        if self.state == S.Initialised:
            self._failed_setups += 1
        if self.state == S.Closing:
            self.log.info("backend closed (%s)", reason)
        else:
            self.log.warning("connection lost (%s)", reason)
        self._teardown("backend went away (%s)" % reason)
        if release:
            self._release_retired()
        try:
            self._switch(S.Closed)
        except XenstoreError as exc:
            self._fail(exc)
            return
        if not self.options.reconnect:
            self._start_over = False
        elif self._failed_setups >= MAX_FAILED_SETUPS:
            self._fail(RemoteProtocolError(
                "backend closed %d setups in a row without connecting" % self._failed_setups))

    def _teardown(self, reason):
        """Fail every transfer, stop polling the rings and retire them."""
        for handle in self._inflight.values():
            handle._finish(BLKIF_RSP_ERROR, None, reason)
        self._inflight.clear()
        for fd in self._port_fds:
            self._selector.unregister(fd)
        self._port_fds.clear()
        for queue in self.queues:
            queue.fail_all(BLKIF_RSP_ERROR)
        self._retired.extend(self.queues)
        self.queues = []
        self.disk = None

    def _release_retired(self):
        """End access to retired rings and pools, close their channels."""
        for queue in self._retired:
            try:
                queue.close()
            except (PlatformError, LocalProtocolError) as exc:
                self.log.warning("releasing a queue: %s", exc)
        self._retired.clear()

    def _fail(self, exc):
        """Error state: every later call says so.  Rings released, Closed."""
        self.log.error("device failed: %s", exc)
        self._error = exc
        self._start_over = False
        self._teardown("device failed: %s" % exc)
        self._release_retired()
        if not self.xs.closed and self.state != S.Closed:
            try:
                self._switch(S.Closed)
            except XenstoreError:
                pass

    # -- driving ------------------------------------------------------------

    def _poll(self, timeout):
        """Wait up to ``timeout`` s for events; serve rings, then xenstore."""
        events = self._selector.select(max(timeout, 0))
        woken = False
        for key, _ in events:
            if key.data is None:
                woken = True
            elif key.data < len(self.queues) and key.fd in self._port_fds:
                self._service(key.data)
        if woken:
            self._wakeup.drain()
            self._react()

    def _service(self, index):
        queue = self.queues[index]
        try:
            queue.port.clear()
            done = queue.complete()
        except EventChannelClosed as exc:
            self._lost("queue %d: %s" % (index, exc), release=True)
            self._react()
            return
        except RemoteProtocolError as exc:
            self._fail(RemoteProtocolError("queue %d: %s" % (index, exc)))
            return
        for comp in done:
            handle = self._inflight.pop((index, comp.tag), None)
            if handle is not None:
                handle._finish(comp.status, comp.data)
        try:
            queue.kick()  # requests that waited for a slot or pages
        except EventChannelClosed as exc:
            self._lost("queue %d: %s" % (index, exc), release=True)
            self._react()

    def _drive(self, until, timeout):
        """Poll until ``until()`` or ``timeout`` s pass; True if ``until()``."""
        deadline = time.monotonic() + timeout
        while not until():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed:
                return until()
            self._poll(remaining)
        return True

    def poll(self, timeout=0):
        """Handle what has happened (responses, backend state changes),
        waiting up to ``timeout`` s for the first event; for callers with a
        loop of their own."""
        if not self._closed:
            self._poll(timeout)

    def wait(self, handles=None, timeout=None):
        """Drive until ``handles`` (default: all in flight) are done, or
        ``timeout`` s (default: the device's) pass.  Returns those done;
        failures are in each handle's ``error`` (``result()`` raises it)."""
        handles = list(self._inflight.values()) if handles is None else list(handles)
        timeout = self.options.timeout if timeout is None else timeout
        self._drive(lambda: all(h.done for h in handles), timeout)
        return [h for h in handles if h.done]

    def wait_connected(self, timeout=None):
        """Drive until Connected (default timeout: the device's).

        Raises :class:`NotConnected` naming both states if that does not
        happen in time, or at once if the device failed or was detached.
        """
        timeout = self.options.timeout if timeout is None else timeout
        if not self._closed:
            self._poll(0)  # a backend that went away: know it before answering
        self._drive(lambda: self.state == S.Connected or self._error is not None
                    or self._closed or (self.state == S.Closed and not self._start_over),
                    timeout)
        if self.state == S.Connected:
            return
        if self._error is not None:
            raise NotConnected("domid=%d devid=%d: device failed: %s"
                               % (self.domid, self.devid, self._error)) from self._error
        if self._closed:
            raise NotConnected("domid=%d devid=%d: detached" % (self.domid, self.devid))
        if self.state == S.Closed and not self._start_over:
            raise NotConnected("domid=%d devid=%d: disconnected (reconnect is off)"
                               % (self.domid, self.devid))
        raise NotConnected("domid=%d devid=%d: not connected within %.1fs (frontend %s, "
                           "backend %s at %s)" % (self.domid, self.devid, timeout,
                                                  self.state.name, self.backend_state.name,
                                                  self.backend))

    @property
    def connected(self):
        return self.state == S.Connected

    @property
    def size(self):
        """Disk size in bytes (None while not connected)."""
        return self.disk.sectors * SECTOR_SIZE if self.disk else None

    # -- I/O ----------------------------------------------------------------

    def submit_read(self, offset, length):
        """Queue a read; the handle's ``result()`` is the bytes."""
        return self._submit("read", offset, length)

    def submit_write(self, offset, data):
        """Queue a write of ``data`` (bytes-like, copied if not ``bytes``)."""
        if not isinstance(data, bytes):
            data = bytes(data)
        return self._submit("write", offset, len(data), data)

    def submit_flush(self):
        """Queue a cache flush (a write barrier if that is all the backend has)."""
        return self._submit("flush", 0, 0)

    def submit_discard(self, offset, length):
        """Queue a discard (the backend must offer feature-discard)."""
        return self._submit("discard", offset, length)

    def read(self, offset, length):
        """Read ``length`` bytes at ``offset``; raises :class:`BlockIOError`."""
        return self.submit_read(offset, length).result()

    def write(self, offset, data):
        """Write ``data`` at ``offset``; raises :class:`BlockIOError`."""
        self.submit_write(offset, data).result()

    def flush(self):
        """Make every completed write durable; raises :class:`BlockIOError`."""
        self.submit_flush().result()

    def discard(self, offset, length):
        """Discard a range; raises :class:`BlockIOError`."""
        self.submit_discard(offset, length).result()

    def _submit(self, op, offset, length, data=None):
        """Validate, wait for a connection if there is none, put on a queue.

        Bad arguments raise LocalProtocolError before anything reaches a
        ring; no connection within the timeout raises BlockIOError.
        """
        check_range(op, offset, length)
        if self._closed:
            raise LocalProtocolError("domid=%d devid=%d: %s on a detached device"
                                     % (self.domid, self.devid, op))
        self._poll(0)  # notice a backend that went away before using its ring
        if self.state != S.Connected:
            try:
                self.wait_connected()
            except NotConnected as exc:
                raise BlockIOError(op, offset, length, None, str(exc)) from exc
        self._check_disk(op, offset, length)
        index = self._pick_queue()
        tag = self._enqueue(self.queues[index], op, offset, length, data)
        handle = IOHandle(self, op, offset, length)
        self._inflight[(index, tag)] = handle
        if not self._plugged:
            self._kick(index)
        return handle

    def _kick(self, index):
        try:
            self.queues[index].kick()
        except EventChannelClosed as exc:
            self._lost("queue %d: %s" % (index, exc), release=True)
            self._react()

    @contextlib.contextmanager
    def plugged(self):
        """Submit many, push them together (Linux's ``blk_plug``): inside the
        block submits only queue their requests; leaving it puts them on the
        rings, with at most one notify per queue."""
        self._plugged += 1
        try:
            yield self
        finally:
            self._plugged -= 1
            if not self._plugged:
                for index in range(len(self.queues)):
                    if self.state == S.Connected:
                        self._kick(index)

    def _enqueue(self, queue, op, offset, length, data):
        if op == "read":
            return queue.submit_read(offset, length)
        if op == "write":
            return queue.submit_write(offset, data)
        if op == "discard":
            return queue.submit_discard(offset, length)
        flush_op = BLKIF_OP_FLUSH_DISKCACHE if self.offer.flush else BLKIF_OP_WRITE_BARRIER
        return queue.submit_flush(flush_op)

    def _pick_queue(self):
        """The least busy queue; ties go round-robin."""
        count = len(self.queues)
        order = [(self._next_queue + k) % count for k in range(count)]
        self._next_queue = (self._next_queue + 1) % count
        return min(order, key=lambda i: len(self.queues[i].pending))

    def _check_disk(self, op, offset, length):
        """What the connected disk allows: bounds, sector size, features."""
        disk, offer, what = self.disk, self.offer, describe(op, offset, length)
        if op != "flush":
            if offset % disk.sector_size or length % disk.sector_size:
                raise LocalProtocolError("%s: not whole %d-byte sectors"
                                         % (what, disk.sector_size))
            if offset + length > self.size:
                raise LocalProtocolError("%s: past the end of the disk (%d bytes)"
                                         % (what, self.size))
        if op in ("write", "discard") and disk.readonly:
            raise LocalProtocolError("%s: the disk is read-only" % what)
        if op == "discard" and not offer.discard:
            raise LocalProtocolError("%s: the backend does not offer feature-discard" % what)
        if op == "flush" and not (offer.flush or offer.barrier):
            raise LocalProtocolError("flush: the backend offers neither feature-flush-cache "
                                     "nor feature-barrier")
