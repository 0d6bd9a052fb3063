"""The frontend's queue in C (``blkif/abi/csrc/front.c``), for a guest that
keeps many transfers in flight: blkif bench's guest side.

:class:`FastQueue` takes over an idle :class:`~blkif.frontend.queue.FrontQueue`
(its ring, page pools and event channel) and builds requests and takes
responses exactly as the Python queue does, which stays the reference
(tests/test_front_fastpath.py compares them byte for byte).  Hand the ring
back with :meth:`FastQueue.close` before the Python queue is used again.

:func:`run_pattern` keeps a number of transfers of one size in flight over
several such queues for a time, all in C without the GIL, and returns each
transfer's latency: what fio does in a Linux guest over blkfront, so that
the guest's own cost is not what a benchmark of the backend measures.
"""
from blkif.abi import X86_32, ffi, lib
from blkif.abi.constants import BLKIF_OP_READ, BLKIF_OP_WRITE
from blkif.errors import BlkifError, LocalProtocolError, RemoteProtocolError
from blkif.platform import EventChannelClosed

PORT_KINDS = {"evtchn": lib.FQ_PORT_XEN, "socket": lib.FQ_PORT_SOCKET}


class FastQueue:
    """``queue``'s ring driven from C; ``queue`` must have nothing in flight."""

    def __init__(self, queue):
        if queue.pending or queue.waiting:
            raise LocalProtocolError("the queue has transfers in flight")
        self.queue = queue
        self._keep = [ffi.from_buffer(queue.ring_grant.buffer, require_writable=True),
                      ffi.from_buffer(queue.pool.buffer, require_writable=True),
                      ffi.new("uint32_t[]", list(queue.pool.refs))]
        cfg = ffi.new("struct fq_config *")
        cfg.sring, cfg.pool, cfg.pool_refs = self._keep
        cfg.ring_bytes = len(self._keep[0])
        cfg.abi = lib.FQ_ABI_X86_32 if queue.abi.tag == X86_32.tag else lib.FQ_ABI_X86_64
        cfg.pool_pages = len(queue.pool.refs)
        if queue.ind_pool is not None:
            self._keep += [ffi.from_buffer(queue.ind_pool.buffer, require_writable=True),
                           ffi.new("uint32_t[]", list(queue.ind_pool.refs))]
            cfg.ind_pool, cfg.ind_refs = self._keep[3:]
            cfg.ind_pages = queue.ind_pages
        cfg.segments = queue.segments
        cfg.req_prod_pvt = queue.ring.req_prod_pvt
        cfg.rsp_cons = queue.ring.rsp_cons
        cfg.port_kind = PORT_KINDS[queue.port.transport]
        cfg.port_fd = queue.port.fileno()
        cfg.port = queue.port.port
        err = ffi.new("char[]", 200)
        self._q = lib.fq_new(cfg, err, len(err))
        if self._q == ffi.NULL:
            raise LocalProtocolError(ffi.string(err).decode())
        self._done = ffi.new("struct fq_done[]", lib.FQ_TAKE_BATCH)
        self._dests = {}  # tag -> where a read in flight lands (kept alive till taken)

    def _error(self):
        return ffi.string(lib.fq_error(self._q)).decode()

    def _check(self, rc):
        if rc == lib.FQ_RING_ERROR:
            raise RemoteProtocolError(self._error())
        if rc == lib.FQ_CHANNEL_CLOSED:
            raise EventChannelClosed(self._error())
        if rc < 0:
            raise LocalProtocolError(self._error())
        return rc

    def put(self, tag, op, offset, length, data=None, dest=None):
        """One request (FrontQueue._put); False if it does not fit now.
        ``data`` is a write's bytes; a read's land in ``dest`` when taken."""
        for name, buf in (("data", data), ("dest", dest)):
            if buf is not None and memoryview(buf).nbytes < length:
                raise LocalProtocolError("%s holds fewer than %d bytes" % (name, length))
        if op == BLKIF_OP_WRITE and data is None:
            raise LocalProtocolError("a write needs its data")
        src = ffi.NULL if data is None else ffi.from_buffer(data)
        into = ffi.NULL if dest is None else ffi.from_buffer(dest, require_writable=True)
        if not self._check(lib.fq_put(self._q, tag, op, offset, length, src, into)) == 0:
            return False
        if dest is not None:
            self._dests[tag] = into
        return True

    def push(self):
        """Publish the requests put; notify the backend if the ring says so."""
        self._check(lib.fq_push(self._q))

    def take(self):
        """Every response there is: [(tag, status)] (FrontQueue.complete)."""
        done = []
        while True:
            n = self._check(lib.fq_take(self._q, self._done, lib.FQ_TAKE_BATCH))
            done += [(self._done[i].tag, self._done[i].status) for i in range(n)]
            if n < lib.FQ_TAKE_BATCH:
                for tag, _ in done:
                    self._dests.pop(tag, None)
                return done

    @property
    def in_flight(self):
        return lib.fq_in_flight(self._q)

    @property
    def notifies(self):
        return lib.fq_notifies(self._q)

    def close(self):
        """Hand the ring back to the Python queue: its positions (the Python
        queue's ids and pages are all free, in its own order).  With requests
        still in flight (a run that failed) the ring is only fit to be torn
        down."""
        if self._q == ffi.NULL:
            return
        self.queue.ring.req_prod_pvt = lib.fq_req_prod_pvt(self._q)
        self.queue.ring.rsp_cons = lib.fq_rsp_cons(self._q)
        lib.fq_free(self._q)
        self._q = ffi.NULL
        for cdata in self._keep:
            ffi.release(cdata)
        self._keep = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_pattern(queues, op, block_size, depth, random, disk_bytes, seed, seconds,
                timeout, data=None):
    """Keep ``depth`` transfers of ``block_size`` bytes in flight over the
    :class:`FastQueue` list ``queues`` for ``seconds``, then until all are
    answered: ``random`` offsets or sequential ones (wrapping) on a disk of
    ``disk_bytes``; a write sends ``data``.

    Returns (latencies in seconds, elapsed seconds).  Raises what
    :meth:`FastQueue.take` raises, or BlkifError for a transfer answered with
    an error or none finishing for ``timeout`` s."""
    if op not in (BLKIF_OP_READ, BLKIF_OP_WRITE):
        raise LocalProtocolError("operation %d is not a read or a write" % op)
    if not 0 < len(queues) <= lib.FQ_MAX_QUEUES:
        raise LocalProtocolError("%d queues: 1 to %d" % (len(queues), lib.FQ_MAX_QUEUES))
    if any(q.in_flight for q in queues):
        raise LocalProtocolError("a queue has requests in flight")
    job = ffi.new("struct fq_job *")
    job.op, job.random, job.depth = op, bool(random), depth
    job.block_size, job.disk_bytes, job.seed = block_size, disk_bytes, seed
    job.duration_ns, job.timeout_ns = int(seconds * 1e9), int(timeout * 1e9)
    keep = []
    if op == BLKIF_OP_WRITE:
        if data is None or len(data) != block_size:
            raise LocalProtocolError("a write pattern needs %d bytes of data" % block_size)
        keep.append(ffi.from_buffer(data))
        job.data = keep[-1]
    else:
        keep.append(ffi.new("char[]", depth * block_size))
        job.scratch = keep[-1]
    cap = int(seconds * 1_000_000) + 4 * depth  # far above any rate seen: 1M per second
    latencies = ffi.new("uint64_t[]", cap)
    job.latency_ns, job.latency_cap = latencies, cap
    handles = ffi.new("struct fq *[]", [q._q for q in queues])
    transfers = ffi.new("struct fq_transfer[]", depth)
    result = ffi.new("struct fq_result *")
    rc = lib.fq_run(handles, len(queues), job, transfers, result)
    if rc == lib.FQ_IO_ERROR or rc == lib.FQ_TIMEOUT:
        raise BlkifError(queues[0]._error())
    queues[0]._check(rc)
    n = min(result.ios, cap)
    return [x / 1e9 for x in ffi.unpack(latencies, n)], result.elapsed_ns / 1e9
