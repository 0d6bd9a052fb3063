"""blkif negotiation, sans-I/O: the nodes each end writes, how each reads the
other's, and what each does when the other changes state.

Readers take ``read(key) -> str | None`` (a key relative to the other end's
directory; None if absent), so the same code runs over xenstore or a dict.
Every value the frontend writes is capped at what the backend offered, as
Linux ``xenbus.c:connect_ring`` does; a bad value raises RemoteProtocolError
naming the node, and the backend answers with a xenbus error and Closing.

The state tables follow Linux: ``frontend_changed`` in xen-blkback/xenbus.c
and ``blkback_changed`` in xen-blkfront.c.
"""
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from blkif.abi import abi_for_protocol
from blkif.abi.constants import (
    BLKIF_MAX_INDIRECT_SEGMENTS,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    VDISK_READONLY,
    XENBUS_MAX_RING_GRANT_ORDER,
)
from blkif.errors import LocalProtocolError, RemoteProtocolError
from xenstore import BadValue, XenbusState

Reader = Callable[[str], Optional[str]]

MAX_QUEUES = 16  # our cap on multi-queue-max-queues


def node_reader(xs, directory):
    """A :data:`Reader` of the nodes under ``directory`` through ``xs``.

    A value that is not UTF-8 text is the peer's protocol error
    (RemoteProtocolError naming the node), like any other bad value.
    """
    def read(key):
        try:
            return xs.read_str("%s/%s" % (directory, key), None)
        except BadValue as exc:
            raise RemoteProtocolError(str(exc)) from None
    return read


def read_uint(read, key, default=None, maximum=None):
    """An unsigned decimal node; ``default`` if absent (None: required)."""
    raw = read(key)
    if raw is None or raw == "":
        if default is None:
            raise RemoteProtocolError("missing node %s" % key)
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        raise RemoteProtocolError("node %s is not a number: %r" % (key, raw)) from None
    if value < 0 or (maximum is not None and value > maximum):
        raise RemoteProtocolError(
            "node %s = %d out of range 0..%s" % (key, value, maximum))
    return value


def read_flag(read, key):
    """A boolean feature node: "1" is on; absent, "0" or junk is off."""
    return read(key) == "1"


@dataclass(frozen=True)
class BackendOffer:
    """The features a backend advertises before InitWait."""

    max_ring_page_order: int = XENBUS_MAX_RING_GRANT_ORDER
    max_queues: int = 1
    max_indirect_segments: int = 256  # Linux's default; 0 disables indirect
    persistent: bool = True
    flush: bool = True
    barrier: bool = True
    discard: bool = False
    discard_granularity: int = 4096
    discard_alignment: int = 0
    discard_secure: bool = False

    def __post_init__(self):
        if not 0 <= self.max_ring_page_order <= XENBUS_MAX_RING_GRANT_ORDER:
            raise LocalProtocolError("max-ring-page-order %d not in 0..%d" % (
                self.max_ring_page_order, XENBUS_MAX_RING_GRANT_ORDER))
        if not 1 <= self.max_queues <= MAX_QUEUES:
            raise LocalProtocolError("multi-queue-max-queues %d not in 1..%d" % (
                self.max_queues, MAX_QUEUES))
        if not 0 <= self.max_indirect_segments <= BLKIF_MAX_INDIRECT_SEGMENTS:
            raise LocalProtocolError("feature-max-indirect-segments %d not in 0..%d" % (
                self.max_indirect_segments, BLKIF_MAX_INDIRECT_SEGMENTS))

    def nodes(self):
        """Backend nodes to write before switching to InitWait."""
        out = {
            "feature-flush-cache": int(self.flush),
            "feature-barrier": int(self.barrier),
            "feature-persistent": int(self.persistent),
            "max-ring-page-order": self.max_ring_page_order,
            "multi-queue-max-queues": self.max_queues,
            "feature-discard": int(self.discard),
        }
        if self.max_indirect_segments:
            out["feature-max-indirect-segments"] = self.max_indirect_segments
        if self.discard:
            out["discard-granularity"] = self.discard_granularity
            out["discard-alignment"] = self.discard_alignment
            out["discard-secure"] = int(self.discard_secure)
        return {k: str(v) for k, v in out.items()}

    @classmethod
    def read(cls, read):
        """What a backend offers, read by a frontend (absent means off or 1 page)."""
        discard = read_flag(read, "feature-discard")
        return cls(
            max_ring_page_order=read_uint(read, "max-ring-page-order", 0,
                                          XENBUS_MAX_RING_GRANT_ORDER),
            max_queues=max(1, read_uint(read, "multi-queue-max-queues", 1, MAX_QUEUES)),
            max_indirect_segments=read_uint(read, "feature-max-indirect-segments", 0,
                                            BLKIF_MAX_INDIRECT_SEGMENTS),
            persistent=read_flag(read, "feature-persistent"),
            flush=read_flag(read, "feature-flush-cache"),
            barrier=read_flag(read, "feature-barrier"),
            discard=discard,
            discard_granularity=read_uint(read, "discard-granularity", 512) if discard else 4096,
            discard_alignment=read_uint(read, "discard-alignment", 0) if discard else 0,
            discard_secure=discard and read_flag(read, "discard-secure"),
        )


@dataclass(frozen=True)
class DiskInfo:
    """The disk a backend publishes when it connects."""

    sectors: int
    sector_size: int = 512
    physical_sector_size: int = 512
    info: int = 0  # VDISK_* bits

    @property
    def readonly(self):
        return bool(self.info & VDISK_READONLY)

    def nodes(self):
        return {
            "sectors": str(self.sectors),
            "sector-size": str(self.sector_size),
            "physical-sector-size": str(self.physical_sector_size),
            "info": str(self.info),
        }

    @classmethod
    def read(cls, read):
        """Read by a frontend once the backend is Connected."""
        sector_size = read_uint(read, "sector-size")
        if sector_size < 512 or sector_size & (sector_size - 1):
            raise RemoteProtocolError("node sector-size = %d is not a power of two >= 512"
                                      % sector_size)
        return cls(
            sectors=read_uint(read, "sectors"),
            sector_size=sector_size,
            physical_sector_size=read_uint(read, "physical-sector-size", sector_size),
            info=read_uint(read, "info", 0),
        )


@dataclass(frozen=True)
class QueueRing:
    """One queue's ring pages and event channel, as the frontend granted them."""

    ring_refs: Tuple[int, ...]
    event_channel: int


@dataclass(frozen=True)
class Connection:
    """What the frontend chose: written by it, read and checked by the backend."""

    queues: Tuple[QueueRing, ...]
    ring_page_order: int = 0
    protocol: str = ""  # "" means native
    persistent: bool = False

    @property
    def abi(self):
        return abi_for_protocol(self.protocol)

    def nodes(self):
        """Frontend nodes, laid out as Linux blkfront writes them."""
        out = {}
        if self.protocol:
            out["protocol"] = self.protocol
        out["feature-persistent"] = str(int(self.persistent))
        if self.ring_page_order:
            out["ring-page-order"] = str(self.ring_page_order)
        if len(self.queues) > 1:
            out["multi-queue-num-queues"] = str(len(self.queues))
        for i, queue in enumerate(self.queues):
            prefix = "queue-%d/" % i if len(self.queues) > 1 else ""
            if self.ring_page_order:
                for j, ref in enumerate(queue.ring_refs):
                    out["%sring-ref%d" % (prefix, j)] = str(ref)
            else:
                out[prefix + "ring-ref"] = str(queue.ring_refs[0])
            out[prefix + "event-channel"] = str(queue.event_channel)
        return out

    @classmethod
    def read(cls, read, offer):
        """The backend's ``connect_ring``: parse and cap the frontend's nodes."""
        protocol = read("protocol") or ""
        abi_for_protocol(protocol)  # unknown protocol: RemoteProtocolError
        nqueues = read_uint(read, "multi-queue-num-queues", 1)
        if not 1 <= nqueues <= offer.max_queues:
            raise RemoteProtocolError("node multi-queue-num-queues = %d, we offer 1..%d"
                                      % (nqueues, offer.max_queues))
        order = read_uint(read, "ring-page-order", 0)
        if order > offer.max_ring_page_order:
            raise RemoteProtocolError("node ring-page-order = %d exceeds max %d"
                                      % (order, offer.max_ring_page_order))
        has_order = read("ring-page-order") is not None
        queues = []
        for i in range(nqueues):
            prefix = "queue-%d/" % i if nqueues > 1 else ""
            if has_order:
                refs = tuple(read_uint(read, "%sring-ref%d" % (prefix, j), None, 2**32 - 1)
                             for j in range(1 << order))
            else:
                refs = (read_uint(read, prefix + "ring-ref", None, 2**32 - 1),)
            port = read_uint(read, prefix + "event-channel", None, 2**32 - 1)
            queues.append(QueueRing(refs, port))
        return cls(
            queues=tuple(queues),
            ring_page_order=order,
            protocol=protocol,
            persistent=offer.persistent and read_flag(read, "feature-persistent"),
        )


@dataclass(frozen=True)
class FrontendWants:
    """A frontend's own limits; what it uses is the smaller of these and the offer."""

    max_ring_page_order: int = XENBUS_MAX_RING_GRANT_ORDER
    max_queues: int = 1
    max_indirect_segments: int = BLKIF_MAX_INDIRECT_SEGMENTS
    persistent: bool = True

    def choose(self, offer):
        """(ring_page_order, queues, indirect segments, persistent) to use."""
        indirect = min(self.max_indirect_segments, offer.max_indirect_segments)
        if indirect <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
            indirect = 0  # no gain over direct requests: Linux blkfront does the same
        return (
            min(self.max_ring_page_order, offer.max_ring_page_order),
            min(self.max_queues, offer.max_queues),
            indirect,
            self.persistent and offer.persistent,
        )


S = XenbusState

# Backend: what to do when the frontend enters a state (blkback frontend_changed).
#   init_wait: if we are Closed, go back to InitWait (the frontend reconnects)
#   connect:   from InitWait only, read the frontend's nodes, map, Connected
#              (a Closed backend waits for the frontend to start over)
#   closing:   stop taking requests, finish in-flight ones, switch to Closing
#   closed:    unmap and unbind, switch to Closed
#   remove:    the frontend is gone: closed, then drop the device
#   fatal:     a state a blkif frontend never enters: xenbus error, then Closing
BACKEND_ON_FRONTEND = {
    S.Unknown: "remove",
    S.Initialising: "init_wait",
    S.InitWait: None,
    S.Initialised: "connect",
    S.Connected: "connect",
    S.Closing: "closing",
    S.Closed: "closed",
    S.Reconfiguring: "fatal",
    S.Reconfigured: "fatal",
}

# Frontend: what to do when the backend enters a state (blkfront blkback_changed).
#   setup:   grant rings, bind channels, write our nodes, switch to Initialised
#   connect: read the disk (setting up first if the backend skipped InitWait),
#            switch to Connected
#   close:   fail what is in flight, release rings, switch to Closed
FRONTEND_ON_BACKEND = {
    S.Unknown: None,
    S.Initialising: None,
    S.InitWait: "setup",
    S.Initialised: None,
    S.Connected: "connect",
    S.Closing: "close",
    S.Closed: "close",
    S.Reconfiguring: None,
    S.Reconfigured: None,
}


def backend_action(own, frontend):
    """The backend's action for a frontend state change, given its own state."""
    action = BACKEND_ON_FRONTEND.get(frontend, "fatal")
    if action == "init_wait" and own != S.Closed:
        return None
    if action == "connect" and own not in (S.InitWait, S.Initialised):
        return None  # connected already, or closed: the frontend starts over first
    if action == "closing" and own in (S.Closing, S.Closed):
        return None
    if action == "closed" and own == S.Closed:
        return None
    return action


def frontend_action(own, backend):
    """The frontend's action for a backend state change, given its own state."""
    action = FRONTEND_ON_BACKEND.get(backend)
    if action == "setup" and own != S.Initialising:
        return None
    if action == "connect" and own == S.Connected:
        return None
    if action == "close" and own == S.Closed:
        return None
    return action
