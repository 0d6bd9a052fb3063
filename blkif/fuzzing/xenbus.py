"""Fuzz target: the xenbus nodes one end reads from the other, as bytes in
xenstore, through the reader both ends use (:func:`blkif.negotiate.node_reader`).

The first byte picks the side: the backend's ``connect_ring``
(:meth:`Connection.read` of the frontend's ``protocol``, ``ring-ref*``,
``event-channel``, ``multi-queue-num-queues``, ``queue-N/``,
``ring-page-order``, ``feature-persistent``, capped at a fuzzed offer), or
the frontend's reading of the backend (:meth:`BackendOffer.read` and
:meth:`DiskInfo.read`).  Node values are edge numbers, protocol names or
raw bytes.

Rules: a bad node is a :class:`RemoteProtocolError` and nothing else; what
is accepted keeps the offer's caps (queues, ring order, persistent only if
offered), has one ring-ref per ring page and 32-bit grant refs and ports, a
known protocol, a power-of-two sector size of at least 512; and what is
accepted reads back the same from the nodes its own side would write.
"""
import atheris

from blkif.abi import ABIS
from blkif.abi.constants import XENBUS_MAX_RING_GRANT_ORDER
from blkif.errors import RemoteProtocolError
from blkif.fuzzing import BrokenRule
from blkif.negotiate import MAX_QUEUES, BackendOffer, Connection, DiskInfo, node_reader
from xenstore.client import _Ops
from xenstore.errors import NoEntry
from xenstore.wire import Op

DIR = "/local/domain/1/device/vbd/51712"
FRONTEND_KEYS = (["protocol", "multi-queue-num-queues", "ring-page-order", "feature-persistent",
                  "ring-ref", "event-channel"]
                 + ["ring-ref%d" % j for j in range(17)]
                 + ["queue-%d/%s" % (i, key) for i in range(3)
                    for key in ["ring-ref", "event-channel", "ring-ref0", "ring-ref1"]])
BACKEND_KEYS = ["max-ring-page-order", "multi-queue-max-queues", "feature-max-indirect-segments",
                "feature-persistent", "feature-flush-cache", "feature-barrier",
                "feature-discard", "discard-granularity", "discard-alignment", "discard-secure",
                "sectors", "sector-size", "physical-sector-size", "info"]
NUMBERS = [0, 1, 2, 3, 4, 5, 8, 15, 16, 17, 511, 512, 513, 4096, 4097, 2**31, 2**32 - 1, 2**32,
           2**64, -1]
WORDS = [b"", b"x86_64-abi", b"x86_32-abi", b"arm-abi", b"sparc-abi", b" 1", b"+1", b"0x10",
         b"1_0", b"\xd9\xa3", b"\xff", b"1\x00"]


class NodeStore(_Ops):
    """Xenstore nodes in a dict (path -> bytes), behind the client's own read
    calls (``read_str`` decodes and refuses non-UTF-8 as the real one does)."""

    def __init__(self, nodes):
        self.nodes = nodes

    def _request(self, op, payload, path=None):
        if op != Op.READ:
            raise BrokenRule("a reader sent %s" % op)
        if path not in self.nodes:
            raise NoEntry("ENOENT", path)
        return self.nodes[path]


def _value(fdp):
    kind = fdp.ConsumeIntInRange(0, 3)
    if kind == 0:
        return str(fdp.PickValueInList(NUMBERS)).encode()
    if kind == 1:
        return fdp.PickValueInList(WORDS)
    if kind == 2:
        return str(fdp.ConsumeIntInRange(0, 70000)).encode()
    return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 12))


def _nodes(fdp, keys):
    return {"%s/%s" % (DIR, fdp.PickValueInList(keys)): _value(fdp)
            for _ in range(fdp.ConsumeIntInRange(0, 24))}


def _reader(nodes):
    return node_reader(NodeStore(nodes), DIR)


def _as_stored(nodes):
    return {"%s/%s" % (DIR, k): v.encode() for k, v in nodes.items()}


def backend_reads(fdp):
    offer = BackendOffer(max_ring_page_order=fdp.ConsumeIntInRange(0, 4),
                         max_queues=fdp.ConsumeIntInRange(1, MAX_QUEUES),
                         persistent=fdp.ConsumeBool())
    try:
        conn = Connection.read(_reader(_nodes(fdp, FRONTEND_KEYS)), offer)
    except RemoteProtocolError:
        return
    if not 1 <= len(conn.queues) <= offer.max_queues:
        raise BrokenRule("%d queues accepted, offered %d" % (len(conn.queues), offer.max_queues))
    if not 0 <= conn.ring_page_order <= offer.max_ring_page_order:
        raise BrokenRule("ring-page-order %d accepted" % conn.ring_page_order)
    if conn.persistent and not offer.persistent:
        raise BrokenRule("persistent grants accepted, not offered")
    if conn.protocol and conn.protocol not in ABIS:
        raise BrokenRule("protocol %r accepted" % conn.protocol)
    for queue in conn.queues:
        if len(queue.ring_refs) != 1 << conn.ring_page_order:
            raise BrokenRule("%d ring-refs for order %d" % (len(queue.ring_refs),
                                                            conn.ring_page_order))
        if not all(0 <= v < 2**32 for v in queue.ring_refs + (queue.event_channel,)):
            raise BrokenRule("grant ref or port out of 32 bits: %r" % (queue,))
    again = Connection.read(_reader(_as_stored(conn.nodes())), offer)
    if again != conn:
        raise BrokenRule("%r reads back as %r" % (conn, again))


def frontend_reads(fdp):
    reader = _reader(_nodes(fdp, BACKEND_KEYS))
    try:
        offer = BackendOffer.read(reader)
        disk = DiskInfo.read(reader)
    except RemoteProtocolError:
        return
    if not (0 <= offer.max_ring_page_order <= XENBUS_MAX_RING_GRANT_ORDER
            and 1 <= offer.max_queues <= MAX_QUEUES):
        raise BrokenRule("offer out of range accepted: %r" % (offer,))
    if disk.sector_size < 512 or disk.sector_size & (disk.sector_size - 1) or disk.sectors < 0:
        raise BrokenRule("disk accepted: %r" % (disk,))
    stored = _as_stored(dict(offer.nodes(), **disk.nodes()))
    if (BackendOffer.read(_reader(stored)), DiskInfo.read(_reader(stored))) != (offer, disk):
        raise BrokenRule("%r %r do not read back the same" % (offer, disk))


def test_one_input(data):
    fdp = atheris.FuzzedDataProvider(data)
    (backend_reads if fdp.ConsumeBool() else frontend_reads)(fdp)
