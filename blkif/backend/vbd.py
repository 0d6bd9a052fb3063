"""A VBD's control path (Linux: xen-blkback/xenbus.c).

:class:`Vbd` owns one backend directory, the storage named by its
``params`` and ``mode`` nodes (``blkif.backend.storage``) and, while
connected, one mapped ring, bound event channel and ring server per queue: a
:class:`RingEngine` (C, the default: a file or device, or an image or NBD
export through libnbd) or the Python reference (a :class:`RingServer` for a
file or device, an :class:`NbdRingServer` for an image or NBD export), each
serving its ring on a thread of its own.  Storage that
fails or comes back is shown in the error node (:meth:`Vbd.tick`,
:meth:`Vbd.storage_changed`).

Its life follows Linux blkback:

- :meth:`Vbd.start` opens the store, publishes the offer (features, ring and
  queue limits) and switches to InitWait.  A state left over from a worker
  that died (Initialised/Connected/Closing) is first switched to Closed, so
  the frontend starts over instead of trusting rings nobody serves.
- :meth:`Vbd.changed` runs after any xenstore change: it reads both states
  and does what :func:`blkif.negotiate.backend_action` says.  Connecting
  reads the frontend's nodes with :meth:`Connection.read` (every value capped
  at the offer), maps the rings, binds the channels and publishes the disk.
- :meth:`Vbd.check_size` (the worker calls it every second and on SIGHUP)
  finds a store that grew: the rings accept the new size first, then
  ``sectors`` and Connected are written again in one transaction, as
  blkback's ``xen_vbd_resize`` does; blkfront reads the new size when it
  sees Connected again.  A store that shrank is not published (logged).
- A frontend that breaks the protocol gets Linux's ``xenbus_dev_fatal``: an
  error node under ``/local/domain/<backend>/error/<backend path>``, the rings
  released and Closing.  Only this VBD stops.
- Live restart: with a journal directory (``BackendOptions.journal_dir``),
  a connection is journaled (:mod:`blkif.backend.journal`), whatever serves it
  (either engine, on any store).  A
  worker that finds the VBD Connected and its predecessor's journal matching
  the frontend's nodes resumes instead of closing: the same rings and
  channels, the requests in flight answered once, no renegotiation.
  :meth:`Vbd.detach` ends a worker that way on purpose (an upgrade).

Nothing here waits: the worker (``blkif.backend.worker``) feeds it xenstore
changes; a ring whose frontend breaks it reports from its thread
(:meth:`Vbd.ring_failed`, which wakes the worker) and the next
:meth:`Vbd.changed` shuts the VBD down.
"""
import collections
import dataclasses
import errno
import logging
import os
import time
from dataclasses import dataclass

from blkif.abi import ffi
from blkif.abi.constants import PAGE_SIZE, SECTOR_SIZE, VDISK_READONLY
from blkif.backend.counters import RingCounters
from blkif.backend.engine import MAX_PERSISTENT_GRANTS, RingEngine
from blkif.backend.nbd_ring import NbdRingServer
from blkif.backend.ring_service import RingServer
from blkif.backend.backing import StoreError
from blkif.backend.journal import Journal, JournalError, journal_path
from blkif.backend.params import parse_params
from blkif.backend.storage import Storage
from blkif.errors import RemoteProtocolError
from blkif.negotiate import (MAX_QUEUES, BackendOffer, Connection, DiskInfo, backend_action,
                             node_reader)
from blkif.platform import PlatformError
from blkif.request import Limits
from blkif.toolstack import RESIZE_REQUEST, RESIZE_RESULT
from xenstore import BadValue, XenbusState, XenstoreError

log = logging.getLogger(__name__)

S = XenbusState
STALE = (S.Initialised, S.Connected, S.Closing)  # a dead worker's connection
FIRST_OPEN_DELAY, MAX_OPEN_DELAY = 1.0, 30.0  # retrying storage that would not open


@dataclass(frozen=True)
class BackendOptions:
    """What the operator lets every VBD offer (``blkif serve`` options)."""

    max_indirect_segments: int = 256
    max_ring_page_order: int = 4
    max_queues: int = min(os.cpu_count() or 1, MAX_QUEUES)  # Linux: one per CPU
    persistent: bool = True
    direct: bool = False
    bounce_mib: int = 0  # per ring: the C engine's bounce buffer (engine.c)
    max_persistent_grants: int = MAX_PERSISTENT_GRANTS  # per ring
    engine: str = "c"  # "c" (blkif.backend.engine) or "python" (ring_service)
    io: str = "io_uring"  # the C engine's I/O: "io_uring" or "threads"
    journal_dir: str = None  # where connections are journaled (live restart); None: not
    run_dir: str = None  # where image VBDs put their storage daemon's socket


class Vbd:
    """One VBD: ``path`` is its backend directory, e.g. backend/vbd/1/51712."""

    def __init__(self, xs, platform, path, options=BackendOptions()):
        self.xs = xs
        self.platform = platform
        self.path = path
        self.options = options
        parts = path.rstrip("/").split("/")
        self.backend_domid = int(parts[3])
        self.domid, self.devid = int(parts[-2]), int(parts[-1])
        self.label = "vbd %d/%d" % (self.domid, self.devid)
        self.closed_counters = {}  # queue index -> what its closed rings had done
        self.params = None
        self.target = None  # ``params`` parsed
        self.store = None
        self.storage = None  # the Storage behind ``store``, once it opened
        self.storage_error = None  # why the storage fails, or None
        self._open_delay, self._open_at = FIRST_OPEN_DELAY / 2, 0.0
        self._storage_reports = collections.deque()  # from ring threads: a failure, or None
        self.offer = None
        self.frontend = None
        self.state = S.Unknown
        self.servers = []  # one RingEngine or RingServer per queue while connected
        self._rings = []  # (mapping, port) per queue
        self._failures = []  # messages from ring threads whose frontend broke the ring
        self.wake = lambda: None  # the worker's wake-up, called from ring threads
        self.negotiated = {}
        self.connections = 0
        self.journal = None  # while connected with a journal
        self.detached = False  # left to a successor: nothing more to shut down
        self.gone = False  # our directory was removed: the worker may exit
        self.backend_changed = True  # an event under our directory since we last read it
        self._shrunk_to = None  # a shrunken size already logged

    # -- xenstore helpers -------------------------------------------------

    def _node(self, key, default=None):
        return self.xs.read_str("%s/%s" % (self.path, key), default)

    def _switch(self, state, txn=None):
        """Publish our state.  Alone (no ``txn``) it is a transaction that
        writes nothing once the toolstack removed our directory, as Linux's
        xenbus_switch_state: ``xl destroy`` removes a qdisk VBD's directory
        with no handshake, and a late write would create it again."""
        if txn is not None:
            txn.switch_state(self.path + "/state", state)
        else:
            for txn in self.xs.transactions():
                with txn:
                    present = txn.exists(self.path)
                    if present:
                        txn.switch_state(self.path + "/state", state)
            if not present:
                log.info("%s: directory removed: %s not published", self.label, state.name)
                self.gone = True
                return
        if state != self.state:
            log.info("%s: %s -> %s", self.label, self.state.name, state.name)
        self.state = state

    # -- life cycle -------------------------------------------------------

    def start(self):
        """Open the store, publish the offer and go to InitWait.

        Raises BlkifError if the VBD cannot be served as configured (bad
        ``params``, a file that cannot be opened).  An image or NBD export
        that cannot be opened yet is reported (error node, ``blkif stats``)
        and tried again from :meth:`tick` until it opens.
        """
        params = self._node("params", "")
        self.frontend = self._node("frontend", "")
        if not params or not self.frontend:
            raise RemoteProtocolError("%s: backend node %s missing" % (
                self.label, "params" if not params else "frontend"))
        self.params = params
        self.target = parse_params(params)
        self._open()

    def _open(self):
        opts = self.options
        try:
            self.storage = Storage(self.target, writable="w" in self._node("mode", "w"),
                                   direct=opts.direct, run_dir=opts.run_dir, label=self.label,
                                   name="vbd-%d-%d" % (self.domid, self.devid))
        except StoreError as exc:
            if self.target.kind == "file":
                raise
            self._open_delay = min(self._open_delay * 2, MAX_OPEN_DELAY)
            self._open_at = time.monotonic() + self._open_delay
            if str(exc) != self.storage_error:
                log.error("%s: %s; trying again every %.0f s at most", self.label, exc,
                          MAX_OPEN_DELAY)
                self._set_storage_error(str(exc))
            return
        self._set_storage_error(None)
        self.store = self.storage.store
        own = self.state = self.xs.read_state(self.path + "/state")
        if own == S.Connected and self._resume():
            return
        path = self._journal_path()
        if path and os.path.exists(path):
            os.unlink(path)  # a connection nobody carries on
        self.offer = BackendOffer(
            max_ring_page_order=opts.max_ring_page_order,
            # One NBD connection per VBD, owned by one ring thread: one queue
            # (a FLUSH covers only its own connection's writes).
            max_queues=1 if self.storage.is_nbd else opts.max_queues,
            max_indirect_segments=opts.max_indirect_segments,
            persistent=opts.persistent,
            discard=self.store.discard_supported and self._node("discard-enable", "1") != "0",
            discard_granularity=self.store.discard_granularity,
            discard_alignment=self.store.discard_alignment,
            discard_secure=self.store.discard_secure,
        )
        if own in STALE:
            log.warning("%s: found state %s from a worker that died; closing that connection",
                        self.label, own.name)
        for txn in self.xs.transactions():
            with txn:
                for key, value in self.offer.nodes().items():
                    txn.write("%s/%s" % (self.path, key), value)
                if own in STALE or own == S.Closed:
                    self._switch(S.Closed, txn)
                else:
                    self._switch(S.InitWait, txn)
        log.info("%s: serving %s (%s, %d sectors%s)", self.label, self.target,
                 "read-write" if self.store.writable else "read-only", self.store.sectors,
                 ", O_DIRECT" if opts.direct else "")
        self.changed()

    def _journal_path(self):
        """Where this VBD's rings are journaled (every engine and the NBD
        ring server journal); None without a journal directory."""
        if self.options.journal_dir is None:
            return None
        return journal_path(self.options.journal_dir, self.domid, self.devid)

    def _resume(self):
        """Carry on the connection a killed worker left; True if it worked.
        Otherwise its journal is removed and the caller closes the connection."""
        path = self._journal_path()
        try:
            journal = path and Journal.open(path)
        except JournalError as exc:
            log.warning("%s: %s", self.label, exc)
            os.unlink(path)
            return False
        if not journal:
            return False
        try:
            desc = journal.description
            front = self.xs.read_state(self.frontend + "/state")
            offer = BackendOffer(**desc["offer"])
            conn = Connection.read(node_reader(self.xs, self.frontend), offer)
            if front != S.Connected or conn.nodes() != desc["frontend"] or (
                    desc["params"] != self.store.path):
                raise JournalError("the frontend is %s, with other nodes than it had"
                                   % front.name)
            self.offer = offer
            self._use_journal(journal)
            self._attach(conn, resume=True)
        except (JournalError, RemoteProtocolError, PlatformError, BadValue, KeyError,
                TypeError) as exc:
            log.warning("%s: cannot resume the connection a killed worker left (%s); "
                        "closing it", self.label, exc)
            self.disconnect()
            self._end_journal()
            journal.remove()
            return False
        self._connected(conn)
        # The predecessor may have died between publishing responses and
        # notifying: the frontend would wait for them forever.  One event
        # more is harmless (blkfront looks at the ring and finds what is there).
        for _, port in self._rings:
            port.notify()
        log.info("%s: resumed the connection (blkif stats counts the requests carried "
                 "over as resumed)", self.label)
        return True

    def _use_journal(self, journal, new=False):
        """Journal the connection; a file store's flush-failed flag lives there
        too (carried into a ``new`` journal; an NBD store's flushes are its
        server's)."""
        self.journal = journal
        if not self.storage.is_nbd:
            if new:
                journal.flush_failed[0] = self.store.flush_failed[0]
            self.store.flush_failed = journal.flush_failed

    def _end_journal(self):
        """Stop journaling: the flag back in the store, the journal unmapped."""
        journal, self.journal = self.journal, None
        if journal is not None:
            if not self.storage.is_nbd:
                self.store.flush_failed = ffi.new("int *", journal.flush_failed[0])
            journal.close()
        return journal

    def check_size(self):
        """Publish a store that grew (online resize); True if it did."""
        if self.store is None:
            return False
        try:
            now = self.store.current_size() // SECTOR_SIZE
        except OSError as exc:
            log.warning("%s: cannot read the size of %s: %s", self.label, self.store.path,
                        exc.strerror)
            return False
        if now == self.store.sectors:
            return False
        if now < self.store.sectors:
            if now != self._shrunk_to:
                log.error("%s: %s shrank from %d to %d sectors; keeping %d (I/O beyond the "
                          "end fails)", self.label, self.store.path, self.store.sectors, now,
                          self.store.sectors)
                self._shrunk_to = now
            return False
        log.info("%s: %s grew from %d to %d sectors", self.label, self.store.path,
                 self.store.sectors, now)
        self.store.sectors = now
        for server in self.servers:  # before the frontend can learn of the new size
            server.set_sectors(now)
        if self.state == S.Connected:
            for txn in self.xs.transactions():
                with txn:
                    txn.write(self.path + "/sectors", str(now))
                    self._switch(S.Connected, txn)  # blkfront re-reads the size
        return True

    def _resize_requested(self):
        """``blkif vbd resize`` of an image or NBD VBD asks in RESIZE_REQUEST
        (bytes): with the rings' I/O held back, grow the image under its
        daemon (or connect again to an export grown on its server), publish
        the new size, answer in RESIZE_RESULT ("ok" or "error: why")."""
        node = "%s/%s" % (self.path, RESIZE_REQUEST)
        text = self.xs.read_str(node, None)
        if text is None:
            return
        self.xs.rm(node)
        try:
            size = int(text)
            if self.target.kind == "file":
                raise StoreError("%s is not an image: a raw file grows by itself (blkif vbd "
                                 "resize truncates it)" % self.target)
            if size % SECTOR_SIZE or size < self.store.sectors * SECTOR_SIZE:
                raise StoreError("%d bytes is not a whole number of sectors of at least "
                                 "the %d the disk has" % (size, self.store.sectors * SECTOR_SIZE))
            self._holding_rings(lambda: self.storage.grow(size))
            self.check_size()
            answer = "ok"
        except (ValueError, StoreError) as exc:
            log.error("%s: growing %s to %s bytes: %s", self.label, self.target, text, exc)
            answer = "error: %s" % exc
        self.xs.write("%s/%s" % (self.path, RESIZE_RESULT), answer)

    def _holding_rings(self, action):
        """``action()`` while no ring takes a request: every request taken is
        answered first; the rings are served again after, whatever happens."""
        for server in self.servers:
            server.stop()
        try:
            for server in self.servers:
                server.drain()
                left = server.counters().in_flight
                if left:
                    raise StoreError("%d requests still in flight after draining; not "
                                     "touching the storage under them" % left)
            if self.servers and self._engine_holds_nbd():
                for server in self.servers:  # the store's one connection is the engine's
                    server.close_store()
            action()
        finally:
            if self.servers and self._engine_holds_nbd():
                self.store.lend()  # the action connected it again
                for server in self.servers:
                    server.reopen_store()
            for server in self.servers:
                server.start(self.ring_failed)

    def ring_failed(self, message):
        """From a ring's thread: its frontend broke the ring; shut down soon."""
        self._failures.append(message)
        self.wake()

    def storage_changed(self, message):
        """From a ring's thread: the storage failed (``message``) or is back (None)."""
        self._storage_reports.append(message)
        self.wake()

    def tick(self):
        """About once a second from the worker: watch the storage, or open it."""
        if self.storage is None:
            if self.target is not None and not self.gone and time.monotonic() >= self._open_at:
                self._open()
            return
        self.storage.tick(idle=not self.servers)
        self._set_storage_error(self.storage.error)

    def _set_storage_error(self, error):
        """The storage's failure in the error node (removed once it is back)."""
        if error == self.storage_error:
            return
        self.storage_error = error
        if self.storage is not None:
            self.storage.error = error
        try:
            if error is not None:
                self.xs.write(self._error_node(), "%d %s" % (errno.EIO, error))
            elif self.xs.exists(self._error_node()):
                self.xs.rm(self._error_node())
        except XenstoreError as exc:
            log.warning("%s: cannot write error node: %s", self.label, exc)

    def _error_node(self):
        return "/local/domain/%d/error%s/error" % (
            self.backend_domid, self.path[len("/local/domain/%d" % self.backend_domid):])

    def changed(self):
        """Act on the current states of both ends (after any watch event).

        Our own directory is read again only after an event under it
        (``backend_changed``, set by the worker's watch): a frontend that
        keeps rewriting its ``state`` costs one read per event."""
        while self._storage_reports:  # the last report is the current state
            self._set_storage_error(self._storage_reports.popleft())
        if self._failures:
            message = self._failures[0]
            self._failures.clear()
            if self.servers:
                self.fatal(message)
            return
        if self.backend_changed:
            self.backend_changed = False  # cleared first: a later event sets it again
            if not self._backend_read():
                return
        elif self.storage is None:
            return
        try:
            front = self.xs.read_state(self.frontend + "/state")
        except BadValue as exc:
            if self.state not in (S.Closing, S.Closed):
                self.fatal(str(exc))
            return
        action = backend_action(self.state, front)
        if action is None:
            return
        log.debug("%s: frontend %s: %s", self.label, front.name, action)
        if action == "init_wait":
            self._switch(S.InitWait)
        elif action == "connect":
            self.connect()
        elif action == "closing":
            self._switch(S.Closing)  # the rings keep serving until Closed
        elif action in ("closed", "remove"):
            if action == "remove" and self.state not in (S.Connected, S.Closing):
                return  # no frontend yet: nothing to tear down
            self.disconnect()
            self._switch(S.Closed)
        else:
            self.fatal("frontend entered state %s" % front.name)

    def _backend_read(self):
        """Our directory's part of :meth:`changed`; False if that is all."""
        if not self.xs.exists(self.path):
            self.gone = True
            self.disconnect()
            return False
        if self.storage is None:
            self.backend_changed = True  # read it again once the storage opens (tick)
            return False  # nothing offered until then
        self._resize_requested()
        own = self.xs.read_state(self.path + "/state")
        if own != self.state and own in (S.Closing, S.Closed):
            # The toolstack (libxl on ``xl destroy``) asks us to close.
            log.info("%s: toolstack switched us to %s", self.label, own.name)
            self.state = own
            self.disconnect()
            self._switch(S.Closed)
            return False
        return True

    def connect(self):
        """Read the frontend's rings, map them, bind the channels, Connected."""
        try:
            conn = Connection.read(node_reader(self.xs, self.frontend), self.offer)
            path = self._journal_path()
            if path:
                self._use_journal(Journal.create(path, {
                    "offer": dataclasses.asdict(self.offer), "frontend": conn.nodes(),
                    "params": self.store.path,
                    "ring_bytes": [len(q.ring_refs) * PAGE_SIZE for q in conn.queues]}),
                    new=True)
            self._attach(conn)
        except (RemoteProtocolError, PlatformError, JournalError, OSError) as exc:
            self.fatal("connecting rings: %s" % exc)
            return
        disk = DiskInfo(
            sectors=self.store.sectors,
            sector_size=self.store.logical_block_size,
            physical_sector_size=self.store.physical_block_size,
            info=0 if self.store.writable else VDISK_READONLY,
        )
        for txn in self.xs.transactions():
            with txn:
                for key, value in disk.nodes().items():
                    txn.write("%s/%s" % (self.path, key), value)
                self._switch(S.Connected, txn)
        self._connected(conn)

    def _connected(self, conn):
        """Count the connection, say what it is, and serve its rings."""
        self.connections += 1
        self.negotiated = {
            "protocol": conn.abi.protocol, "ring_page_order": conn.ring_page_order,
            "queues": len(conn.queues), "persistent": conn.persistent,
            "max_indirect_segments": self.offer.max_indirect_segments,
            "discard": self.offer.discard,
            "engine": self.options.engine,
            "io": self.servers[0].io_mode,
        }
        if self.negotiated["engine"] == "c":
            self.negotiated["bounce_mib"] = self.servers[0].bounce_pages >> 8
        log.info("%s: connected: %s, %d queue(s) of %d ring page(s), persistent grants %s, "
                 "%s engine (%s%s)", self.label, conn.abi.protocol, len(conn.queues),
                 1 << conn.ring_page_order, "on" if conn.persistent else "off",
                 self.negotiated["engine"], self.servers[0].io_note,
                 "; bounce buffer %d MiB per ring" % self.negotiated["bounce_mib"]
                 if self.negotiated.get("bounce_mib") else "")
        for server in self.servers:
            server.start(self.ring_failed)

    def _attach(self, conn, resume=False):
        limits = Limits(
            sectors=self.store.sectors, readonly=not self.store.writable,
            flush=self.offer.flush, barrier=self.offer.barrier, discard=self.offer.discard,
            discard_secure=self.offer.discard_secure,
            max_indirect_segments=self.offer.max_indirect_segments,
            sector_size=self.store.logical_block_size,
        )
        try:
            if self._engine_holds_nbd():
                self.store.lend()  # a server may take one client only
            for i, queue in enumerate(conn.queues):
                mapping = self.platform.map_grants(self.domid, queue.ring_refs, writable=True)
                try:
                    port = self.platform.evtchn_bind_interdomain(self.domid, queue.event_channel)
                except BaseException:
                    mapping.unmap()
                    raise
                self._rings.append((mapping, port))
                label = "%s q%d" % (self.label, i)
                if self.storage.is_nbd and self.options.engine == "python":
                    server = NbdRingServer(self.platform, self.domid, mapping.buffer, port,
                                           conn.abi, limits, self.store,
                                           persistent=conn.persistent, label=label,
                                           max_grants=self.options.max_persistent_grants,
                                           on_storage=self.storage_changed,
                                           journal=self.journal and self.journal.region(i),
                                           resume=resume)
                elif self.options.engine == "python":
                    server = RingServer(self.platform, self.domid, mapping.buffer, port,
                                        conn.abi, limits, self.store,
                                        persistent=conn.persistent, label=label,
                                        max_grants=self.options.max_persistent_grants,
                                        journal=self.journal and self.journal.region(i),
                                        resume=resume)
                else:
                    server = RingEngine(self.platform, self.domid, mapping.buffer, port,
                                        conn.abi, limits, self.store,
                                        persistent=conn.persistent, label=label,
                                        io=self.options.io,
                                        bounce_pages=self.options.bounce_mib << 8,
                                        max_grants=self.options.max_persistent_grants,
                                        journal=self.journal and self.journal.region(i),
                                        resume=resume, on_storage=self.storage_changed)
                self.servers.append(server)
        except BaseException:
            self.disconnect()
            self._take_back_store()  # lent, though no engine got to hold it
            raise

    def _engine_holds_nbd(self):
        """The C engine keeps this VBD's NBD connection while rings are up."""
        return self.storage.is_nbd and self.options.engine == "c"

    def disconnect(self):
        """Finish what is on the rings, then unmap and unbind everything."""
        if not self.servers and not self._rings:
            return
        self._release()
        journal = self._end_journal()
        if journal is not None:
            journal.remove()
        log.info("%s: disconnected", self.label)

    def _release(self):
        """Serve what is queued and wait for what is in flight, then unmap,
        unbind and flush the store."""
        for queue, server in enumerate(self.servers):
            server.stop()
            server.drain()
            self.closed_counters.setdefault(queue, RingCounters()).add(
                server.counters(), gauges=False)
            server.close()
        for mapping, port in self._rings:
            port.close()
            mapping.unmap()
        self.servers.clear()
        self._rings.clear()
        if self.store is not None and self.store.lent:
            self._take_back_store()  # the engine flushed its connection as it closed
        elif self.store is not None and self.store.writable:
            self._flush_store()

    def _take_back_store(self):
        """After the rings: an NBD store lent to the engine (which closed its
        connection) connects again, and what the engine last reported of the
        storage is over.  If it cannot yet, the worker's tick reports that
        and retries."""
        if self.store is None or not self.store.lent:
            return
        try:
            self.store.take_back()
        except StoreError as exc:
            log.debug("%s: %s", self.label, exc)
            return
        self._storage_reports.clear()
        self._set_storage_error(None)

    def detach(self):
        """Leave the connection to a successor (an upgrade): answer everything
        in flight, release the rings and channels, keep the journal, and stay
        Connected.  Without a journal, this is :meth:`shutdown`."""
        if self.journal is None or self.state != S.Connected or self.gone:
            self.shutdown()
            return
        self._release()
        self._end_journal()
        self.storage.close()
        self.storage = self.store = None
        self.detached = True
        log.info("%s: detached; the connection stays up for the next worker", self.label)

    def _flush_store(self):
        try:
            self.store.flush()
        except OSError as exc:
            log.error("%s: flushing %s: %s", self.label, self.store.path, exc.strerror)

    def fatal(self, message):
        """Linux ``xenbus_dev_fatal``: error node, release the rings, Closing."""
        log.error("%s: %s; closing the device", self.label, message)
        try:
            self.xs.write(self._error_node(), "%d %s" % (errno.EIO, message))
        except XenstoreError as exc:
            log.warning("%s: cannot write error node: %s", self.label, exc)
        self.disconnect()
        self._switch(S.Closing)

    def shutdown(self):
        """The service stops: serve what is queued, release it all, Closed."""
        if self.detached:
            return
        if self.state in (S.Connected, S.Closing):
            self.disconnect()
            if not self.gone:
                self._switch(S.Closed)
        if self.storage is not None:
            self.storage.close()
            self.storage = self.store = None

    def status(self):
        """The VBD's state and counters, for ``blkif stats``."""
        return {
            "domid": self.domid, "devid": self.devid, "path": self.path,
            "params": self.params,
            "storage": self._storage_status(),
            "state": self.state.name, "connections": self.connections,
            "negotiated": self.negotiated if self.servers else {},
            "rings_mapped": len(self._rings), "channels_bound": len(self._rings),
            "counters": self.counters().as_dict(),
            "queues": [dict(counters.as_dict(), queue=queue)
                       for queue, counters in sorted(self.queue_counters().items())],
        }

    def _storage_status(self):
        if self.storage is not None:
            return self.storage.status()
        if self.target is None:
            return None
        return {"kind": self.target.kind, "target": str(self.target), "error": self.storage_error}

    def queue_counters(self):
        """{queue index: counters over every ring served as that queue}
        (gauges: the live ring's)."""
        out = {queue: RingCounters().add(done) for queue, done in self.closed_counters.items()}
        for queue, server in enumerate(list(self.servers)):
            out.setdefault(queue, RingCounters()).add(server.counters())
        return out

    def counters(self):
        """Counters over every ring this VBD served (gauges: the live ones)."""
        total = RingCounters()
        for counters in self.queue_counters().values():
            total.add(counters)
        return total
