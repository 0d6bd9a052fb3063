"""One ring served by the C engine (``blkif/abi/csrc/engine.c``) on its own thread.

:class:`RingEngine` hands the engine the mapped ring, the bound port, the
store's descriptor and the VBD's limits, then runs ``eng_run`` in a thread
of its own: cffi releases the GIL for the call, so each queue of each VBD
is served in parallel, like blkback's kthread per ring.  On Xen the engine
maps grants itself, through the platform's gntdev descriptor
(``Platform.grant_device``); elsewhere (the sim) it calls back into Python
to map and unmap them (``eng_map_grants``).

Life: ``start(on_error)``; ``stop()`` joins the thread (``start`` again
serves on); ``drain()`` serves what the frontend already queued and waits
for every request in flight; ``close()`` frees the engine and unmaps its
persistent grants.  A frontend that breaks the ring (overrun, closed
channel) ends the thread and calls ``on_error(message)`` from it: the VBD
then shuts down (``Vbd.fatal``).

A store that is an NBD export (:class:`NbdStore`: an image behind its
qemu-storage-daemon, or a remote server) is served through libnbd's C API
(``csrc/nbd_link.c``): the engine keeps the VBD's connection while the
store lends it its own (``NbdStore.lend``).  When the connection goes or
comes back, ``on_storage(message or None)`` is called from the ring's thread.
"""
import itertools
import logging
import os
import threading

from blkif.abi import X86_32, ffi, lib
from blkif.abi.constants import BLKIF_MAX_SEGMENTS_PER_REQUEST
from blkif.backend.counters import engine_counters
from blkif.backend.nbd_store import NbdStore
from blkif.platform import PlatformError
from blkif.platform._mman import address

log = logging.getLogger(__name__)

MAX_PERSISTENT_GRANTS = 1056  # Linux xen_blkif_max_pgrants, per ring
PERSISTENT_GRANT_UNUSED_SECONDS = 60  # Linux xen_blkif_pgrant_timeout
IO_MODES = {"io_uring": lib.ENG_IO_URING, "threads": lib.ENG_IO_THREADS}
IO_NAMES = {lib.ENG_IO_URING: "io_uring", lib.ENG_IO_THREADS: "threads", lib.ENG_IO_NBD: "nbd"}
NBD_BOUNCE_PAGES = 4096  # 16 MiB: a NBD command needs one contiguous buffer
IO_THREADS = 4
RUN_SLICE_MS = 200  # the engine hands back this often even under full load


def _map(engine, grefs, n, writable, each):
    """``n`` grefs mapped together (``each``: a mapping per gref), kept under
    new tokens: [(address, token)], one per mapping, or None (logged) if any cannot
    be mapped.  No exception may unwind into C."""
    refs, platform = list(grefs[0:n]), engine.platform
    try:
        if each:
            mappings = platform.map_grants_each(engine.domid, refs, writable=bool(writable))
        else:
            mappings = [platform.map_grants(engine.domid, refs, writable=bool(writable))]
    except PlatformError as exc:
        log.warning("%s: %s", engine.label, exc)
        return None
    except Exception:
        log.exception("%s: mapping grants", engine.label)
        return None
    out = []
    for mapping in mappings:
        key = next(engine.tokens)
        engine.mappings[key] = mapping
        out.append((address(mapping.buffer), key))
    return out


@ffi.def_extern()
def eng_map_grants(handle, grefs, n, writable, base, token):
    """Map ``n`` grefs contiguously for the engine; -1 if any cannot be."""
    engine = ffi.from_handle(handle)
    mapped = _map(engine, grefs, n, writable, each=False)
    if mapped is None:
        return -1
    base[0], token[0] = mapped[0]
    return 0


@ffi.def_extern()
def eng_map_each(handle, grefs, n, writable, addrs, tokens):
    """Map ``n`` grefs a page each (for the grant cache) in one call to the
    platform; -1 if any cannot be (then none is mapped)."""
    engine = ffi.from_handle(handle)
    mapped = _map(engine, grefs, n, writable, each=True)
    if mapped is None:
        return -1
    for i, (addr, key) in enumerate(mapped):
        addrs[i], tokens[i] = addr, key
    return 0


@ffi.def_extern()
def eng_unmap_grants(handle, token):
    engine = ffi.from_handle(handle)
    mapping = engine.mappings.pop(token, None)
    if mapping is None:
        return
    try:
        mapping.unmap()
    except Exception:  # the engine is done with it whatever happens
        log.exception("%s: unmapping grants", engine.label)


@ffi.def_extern()
def eng_unmap_each(handle, tokens, n):
    """Unmap the engine's persistent grants together (one call to the platform)."""
    engine = ffi.from_handle(handle)
    mappings = [m for m in (engine.mappings.pop(t, None) for t in tokens[0:n]) if m]
    try:
        engine.platform.unmap_grants_each(mappings)
    except Exception:  # the engine is done with them whatever happens
        log.exception("%s: unmapping grants", engine.label)


def engine_abi(abi):
    """The engine's (and a journal's) number for a ring layout."""
    return lib.ENG_ABI_X86_32 if abi.tag == X86_32.tag else lib.ENG_ABI_X86_64


def _strerror(errnum):
    return os.strerror(errnum) if errnum else "none"


PORT_KINDS = {"evtchn": lib.ENG_PORT_XEN, "socket": lib.ENG_PORT_SOCKET}


class RingEngine:
    """Serves one shared ring of a connected VBD in C.

    ``ring_buffer`` is the mapped ring (kept mapped by the caller until
    :meth:`close`); ``port`` the bound event channel; ``store`` the open
    backing store.  ``io`` is "io_uring" or "threads"; io_uring falls back to
    threads where the kernel refuses it (the reason is in :attr:`io_note`).
    ``bounce_pages``: the ring's bounce buffer (engine.c), 0 for none; an
    NBD store has NBD_BOUNCE_PAGES unless told, and never less than its
    largest request: each transfer is one command from it, and waits for
    room when it is full.  ``on_storage``
    hears of an NBD store's connection.
    ``journal`` is the ring's region of a :class:`~blkif.backend.journal.Journal`
    (kept mapped until :meth:`close`), ``resume`` to carry on from what a
    killed predecessor left in it.
    """

    def __init__(self, platform, domid, ring_buffer, port, abi, limits, store,
                 persistent=False, label="", io="io_uring", bounce_pages=0,
                 max_grants=MAX_PERSISTENT_GRANTS,
                 grant_unused_seconds=PERSISTENT_GRANT_UNUSED_SECONDS,
                 journal=None, resume=False, on_storage=lambda message: None):
        self.platform, self.domid, self.port, self.label = platform, domid, port, label
        self.on_storage = on_storage
        self.storage_error = None  # what on_storage was last told
        self._errors_seen = 0  # the error count last logged
        self.mappings = {}
        self.tokens = itertools.count(1)
        self._handle = ffi.new_handle(self)
        self._ring = ffi.from_buffer(ring_buffer, require_writable=True)
        cfg = ffi.new("struct eng_config *")
        cfg.sring = self._ring
        cfg.ring_bytes = len(self._ring)
        cfg.abi = engine_abi(abi)
        cfg.limits = {
            "sectors": limits.sectors, "readonly": limits.readonly, "flush": limits.flush,
            "barrier": limits.barrier, "discard": limits.discard,
            "discard_secure": limits.discard_secure,
            "max_indirect_segments": limits.max_indirect_segments,
            "sector_size": limits.sector_size,
        }
        if isinstance(store, NbdStore):
            self._keep = (ffi.new("char[]", store.uri.encode()),
                          ffi.new("char[]", store.path.encode()),
                          ffi.new("int *"))  # its flushes are its own (nbd_link.c)
            cfg.nbd_uri, cfg.nbd_name, cfg.flush_failed = self._keep
            cfg.nbd_size = store.size
            cfg.store_fd = -1
            largest = max(BLKIF_MAX_SEGMENTS_PER_REQUEST, limits.max_indirect_segments)
            bounce_pages = max(bounce_pages or NBD_BOUNCE_PAGES, largest)
        else:
            cfg.store_fd = store.fd
            cfg.store_is_device = store.is_device
            cfg.flush_failed = store.flush_failed
        self.bounce_pages = bounce_pages
        cfg.port_kind = PORT_KINDS[port.transport]
        cfg.port_fd = port.fileno()
        cfg.port = port.port
        cfg.persistent = persistent
        cfg.max_grants = max_grants
        cfg.grant_unused_seconds = grant_unused_seconds
        cfg.io_mode = IO_MODES[io]
        cfg.io_threads = IO_THREADS
        cfg.bounce_pages = bounce_pages
        device = platform.grant_device()
        cfg.gntdev_fd = -1 if device is None else device
        cfg.domid = domid
        cfg.journal = ffi.NULL if journal is None else journal
        cfg.resume = resume
        cfg.handle = self._handle
        err = ffi.new("char[]", 256)
        self._eng = lib.eng_new(cfg, err, 256)
        if self._eng == ffi.NULL:
            ffi.release(self._ring)
            raise PlatformError("%s: %s" % (label, ffi.string(err).decode()))
        self.io_mode = IO_NAMES[lib.eng_io_mode(self._eng)]
        self.io_note = ffi.string(lib.eng_io_note(self._eng)).decode()
        self._thread = None
        self.failure = None

    def start(self, on_error):
        """Serve the ring on a new thread; ``on_error(message)`` if the frontend breaks it."""
        lib.eng_restart(self._eng)  # after a stop(): serve again
        self._thread = threading.Thread(target=self._serve, args=(on_error,),
                                        name="blkif %s" % self.label, daemon=True)
        self._thread.start()

    def _serve(self, on_error):
        while True:
            rc = lib.eng_run(self._eng, RUN_SLICE_MS)
            self._report_storage()
            self._log_io_errors()
            if rc == lib.ENG_STOPPED:
                return
            if rc < 0:
                self.failure = ffi.string(lib.eng_error(self._eng)).decode()
                on_error(self.failure)
                return

    def _log_io_errors(self):
        """Log the engine's error count when it grew, with the last I/O errno
        (the C side answers the guest; the cause is said here), except while
        the storage is down: that was said once."""
        stats = lib.eng_stats(self._eng)
        if stats.errors != self._errors_seen and self.storage_error is None and (
                stats.last_io_errno or stats.last_map_errno):
            log.error("%s: %d requests answered with an error so far; last I/O error: %s;"
                      " last grant mapping error: %s", self.label, stats.errors,
                      _strerror(stats.last_io_errno), _strerror(stats.last_map_errno))
        self._errors_seen = stats.errors

    def _report_storage(self):
        """Tell ``on_storage`` when an NBD store's connection goes or comes back."""
        error = ffi.string(lib.eng_store_error(self._eng)).decode() or None
        if (error is None) == (self.storage_error is None):
            return
        if error is not None:
            log.error("%s: %s; requests fail until it is back", self.label, error)
        else:
            log.info("%s: storage is back", self.label)
        self.storage_error = error
        self.on_storage(error)

    def close_store(self):
        """While stopped and drained: flush and close an NBD store's
        connection (the store's export may change, or the rings go).  A flush
        that failed is logged: writes answered since the last one may be lost."""
        if lib.eng_nbd_close(self._eng) < 0:
            log.error("%s: %s", self.label, ffi.string(lib.eng_error(self._eng)).decode())

    def reopen_store(self):
        """While stopped: connect an NBD store again, taking the size its
        export has now (an image grown on purpose).  If that fails, the
        engine keeps trying once started, and says so."""
        if lib.eng_nbd_reopen(self._eng) < 0:
            log.warning("%s: %s", self.label, ffi.string(lib.eng_store_error(self._eng)).decode())

    def stop(self):
        """Stop the thread (it finishes its round first) and wait for it."""
        if self._thread is not None:
            lib.eng_stop(self._eng)
            self._thread.join()
            self._thread = None

    def drain(self, timeout=30.0):
        """After :meth:`stop`: serve what is queued, wait for what is in flight."""
        if self.failure is not None:
            return
        rc = lib.eng_quiesce(self._eng, int(timeout * 1000))
        if rc < 0:
            log.warning("%s: while draining: %s", self.label,
                        ffi.string(lib.eng_error(self._eng)).decode())

    def set_sectors(self, sectors):
        """The store grew: accept requests up to ``sectors`` from now on."""
        lib.eng_set_sectors(self._eng, sectors)

    def counters(self):
        """This ring's counters (``blkif stats``)."""
        return engine_counters(lib.eng_stats(self._eng))

    def close(self):
        """Stop, free the engine and unmap every grant it holds; the ring stays mapped."""
        if self._eng is None:
            return
        self.stop()
        self.close_store()
        lib.eng_free(self._eng)
        self._eng = None
        for mapping in self.mappings.values():  # none, unless the engine lost one
            mapping.unmap()
        self.mappings.clear()
        ffi.release(self._ring)

