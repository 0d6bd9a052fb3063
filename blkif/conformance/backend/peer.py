"""The suite as a frontend: a VBD driven by hand, so a case can send anything.

:class:`FrontendPeer` negotiates with plain nodes (any value, any node left
out), grants rings and pages with :class:`~blkif.frontend.queue.FrontQueue`
only as storage, and puts raw requests on the ring with
:class:`~blkif.request.RequestEncoder` or straight into the slot bytes.
Every wait is bounded; a peer that does not answer in time is a
:class:`Failed` case, never a hang.
"""
import time

from blkif.abi import NATIVE, ffi
from blkif.abi.constants import PAGE_SIZE
from blkif.conformance.catalogue import Failed
from blkif.frontend.queue import FrontQueue
from blkif.negotiate import BackendOffer, Connection, DiskInfo, QueueRing
from blkif.ring import FrontRing
from xenstore import NoEntry, PermissionDenied, WaitTimeout, XenbusState as S

TOOLSTACK_NODES = {"backend", "backend-id", "state", "virtual-device", "device-type"}
TIMEOUT = 5.0  # default for anything a correct backend does at once


class FrontendPeer:
    """Domain ``domid``'s end of VBD ``devid`` whose backend is ``backend``
    (its xenstore directory).  ``xs`` and ``platform`` act as that domain;
    ``dom0`` (or None) reads what a guest may not, such as error nodes."""

    def __init__(self, session, xs, platform, domid, devid, backend, dom0=None):
        self.session, self.xs, self.platform, self.dom0 = session, xs, platform, dom0
        self.domid, self.devid = domid, devid
        self.front = "/local/domain/%d/device/vbd/%d" % (domid, devid)
        self.back = backend
        self.backend_id = int(xs.read_str(self.front + "/backend-id"))
        self.queues = []
        self.abi = NATIVE
        self.disk = None
        self.timeout = session.timeout

    # -- xenstore -----------------------------------------------------------

    def read_back(self, key):
        return self.xs.read_str("%s/%s" % (self.back, key), None)

    def backend_state(self):
        return self.xs.read_state(self.back + "/state")

    def wait_backend(self, states, timeout=None, what=None):
        """The backend's state once it is one of ``states``; Failed if it is
        not within ``timeout`` s."""
        timeout = timeout or self.timeout
        try:
            return self.xs.wait_for_state(self.back + "/state", states, timeout)
        except WaitTimeout:
            raise Failed("%sbackend state stayed %s, not %s within %.0fs" % (
                what + ": " if what else "", self.backend_state().name,
                "/".join(s.name for s in states), timeout)) from None

    def switch(self, state):
        self.xs.switch_state(self.front + "/state", state)

    def write_front(self, key, value):
        self.xs.write("%s/%s" % (self.front, key), value)

    def error_node(self):
        """The backend's xenbus error text, or None; "" if we may not read it."""
        reader = self.dom0 or self.xs
        home = "/local/domain/%d/" % self.backend_id
        relative = self.back[len(home):] if self.back.startswith(home) else self.back
        path = "%serror/%s/error" % (home, relative.strip("/"))
        try:
            return reader.read_str(path)
        except NoEntry:
            return None
        except PermissionDenied:
            return ""

    # -- negotiation ----------------------------------------------------------

    def offer(self):
        """What the backend offers once it is InitWait."""
        self.wait_backend([S.InitWait], what="offer")
        return BackendOffer.read(self.read_back)

    def setup(self, queues=1, order=0, persistent=False, indirect=0, abi=None,
              protocol=None, extra=None, omit=(), pool_pages=16, start=0):
        """Grant ``queues`` rings of 2**``order`` pages (indices at ``start``),
        write the nodes as blkfront does (``protocol`` overrides the node, ""
        leaves it out), plus ``extra``, minus ``omit``; switch Initialised."""
        self.offer()
        self.abi = abi or NATIVE
        self.queues = [FrontQueue(self.platform, self.backend_id, self.abi, order, indirect,
                                  pool_pages) for _ in range(queues)]
        for q in self.queues if start else ():
            q.ring.release()
            q.ring = FrontRing(q.ring_grant.buffer, self.abi, init=True, start=start)
        conn = Connection(tuple(QueueRing(tuple(q.ring_refs), q.port.port) for q in self.queues),
                          order, self.abi.protocol if protocol is None else protocol,
                          persistent)
        nodes = dict(conn.nodes(), **(extra or {}))
        for txn in self.xs.transactions():
            with txn:
                for key in txn.list(self.front):
                    if key not in TOOLSTACK_NODES:
                        txn.rm("%s/%s" % (self.front, key))
                for key, value in nodes.items():
                    if key not in omit:
                        txn.write("%s/%s" % (self.front, key), value)
                txn.switch_state(self.front + "/state", S.Initialised)
        return conn

    def connect(self, **setup):
        """:meth:`setup`, then Connected once the backend is; the DiskInfo."""
        self.setup(**setup)
        state = self.wait_backend([S.Connected, S.Closing, S.Closed], what="connect")
        if state != S.Connected:
            raise Failed("backend went %s instead of Connected (error: %s)"
                         % (state.name, self.error_node()))
        self.switch(S.Connected)
        self.disk = DiskInfo.read(self.read_back)
        return self.disk

    def expect_refusal(self, what):
        """After a bad setup: the backend must go Closing (or Closed) and,
        where we can read it, write an error node.  The error text."""
        state = self.wait_backend([S.Connected, S.Closing, S.Closed], what=what)
        if state == S.Connected:
            raise Failed("%s: backend went Connected" % what)
        error = self.error_node()
        if error is None:
            raise Failed("%s: backend went %s without an error node" % (what, state.name))
        return error

    def close(self):
        """Closing, Closed, as blkfront does; the rings are released."""
        self.switch(S.Closing)
        self.wait_backend([S.Closing, S.Closed], what="close")
        self.switch(S.Closed)
        self.wait_backend([S.Closed], what="close")
        self.release()

    def restart(self):
        """From Closed: Initialising, and the backend must offer again (InitWait)."""
        self.switch(S.Initialising)
        self.wait_backend([S.InitWait], what="reconnect")

    def reset(self):
        """Bring a used VBD back to a fresh start: Closed until the backend is
        Closed too (from any state, InitWait included), then Initialising."""
        self.switch(S.Closed)
        self.wait_backend([S.Closed], what="reset")
        self.release()
        self.restart()

    def release(self):
        for q in self.queues:
            q.close()
        self.queues = []

    # -- the ring -----------------------------------------------------------

    @property
    def q(self):
        return self.queues[0]

    @property
    def encoder(self):
        return self.q.encoder

    def slot(self, queue=0, back=1):
        """A ``char *`` to the request slot ``back`` places before req_prod_pvt."""
        ring = self.queues[queue].ring
        return ring.slot((ring.req_prod_pvt - back) & 0xFFFFFFFF)

    def request(self, queue=0, back=1, kind="request"):
        """The last request written, as its cffi struct (to corrupt a field)."""
        return ffi.cast(self.abi.ctype(kind) + " *", self.slot(queue, back))

    def push(self, queue=0, notify=True):
        q = self.queues[queue]
        if q.ring.push_requests() and notify:
            q.port.notify()

    def responses(self, count, queue=0, timeout=None, raw=False):
        """Wait for ``count`` responses: [(id, operation, status)], or with
        ``raw`` [(id, operation, status, slot bytes)].  Failed on a timeout."""
        q = self.queues[queue]
        got = []
        timeout = timeout or self.timeout
        deadline = time.monotonic() + timeout
        while True:
            while len(got) < count and q.ring.pending_responses():
                data = bytes(ffi.buffer(q.ring.slot(q.ring.rsp_cons), q.ring.response_size))
                rid, op, status = q.encoder.take_response(q.ring)
                got.append((rid, op, status, data) if raw else (rid, op, status))
            if len(got) >= count:
                break
            if q.ring.final_check_for_responses():
                continue
            if time.monotonic() > deadline:
                raise Failed("%d of %d responses within %.0fs (got %s)"
                             % (len(got), count, timeout, got))
            q.port.wait(0.05)
        return got

    def exchange(self, build, count=None, queue=0, timeout=None):
        """``build(encoder, ring)`` writes requests; push, notify, wait for as
        many responses: {id: (operation, status)}."""
        q = self.queues[queue]
        before = q.ring.req_prod_pvt
        build(q.encoder, q.ring)
        n = (q.ring.req_prod_pvt - before) & 0xFFFFFFFF if count is None else count
        self.push(queue)
        return {rid: (op, status) for rid, op, status in self.responses(n, queue, timeout)}

    def one(self, build, queue=0, timeout=None):
        """Send one request; its (operation, status)."""
        got = self.exchange(build, 1, queue, timeout)
        return next(iter(got.values()))

    def page(self, i, queue=0):
        """A writable view of data page ``i`` of the queue's pool."""
        return self.queues[queue].pool.page(i)

    def gref(self, i, queue=0):
        return self.queues[queue].pool.refs[i]

    def alive(self, queue=0, timeout=None):
        """A one-page read at sector 0 must still be answered OKAY."""
        from blkif.abi.constants import BLKIF_OP_READ, BLKIF_RSP_OKAY
        ref = self.gref(0, queue)
        op, status = self.one(lambda enc, ring: enc.rw(ring, BLKIF_OP_READ, 0xA11, 0,
                                                       [(ref, 0, 7)]), queue, timeout)
        if status != BLKIF_RSP_OKAY:
            raise Failed("the VBD no longer serves a plain read (status %d)" % status)

    # -- other VBDs -----------------------------------------------------------

    def other(self):
        """A second VBD of the same backend, connected (Skipped if the target
        has none): it must not notice what a case does to this one."""
        peer = self.session.extra_peer("other")
        peer.connect()
        return peer

    def readonly(self):
        """A read-only VBD of the same backend, not yet connected."""
        return self.session.extra_peer("readonly")

    def shutdown(self):
        self.release()


def pages_of(pattern, n):
    """``n`` pages of ``pattern`` bytes (repeated)."""
    return (pattern * (n * PAGE_SIZE // len(pattern) + 1))[:n * PAGE_SIZE]
