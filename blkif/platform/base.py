"""The platform interface: grant tables and event channels, as Xen gives them.

A frontend grants its own pages (``grant_pages``, like gntalloc) and allocates
an unbound event channel; a backend maps those grants (``map_grants``, like
gntdev) and binds to the channel.  Two implementations: ``xen`` drives
/dev/xen/{gntdev,gntalloc,evtchn}; ``sim`` talks to a simulated hypervisor
shared by processes that each play one domain.  Statuses are Xen's GNTST_*
codes and errors are ``blkif.platform.errors`` classes on both.
"""
import abc
import math
import time
from dataclasses import dataclass
from typing import Any

from blkif.abi.constants import PAGE_SIZE
from blkif.errors import LocalProtocolError


class _Closing:
    """Context-manager support: ``with x:`` calls ``x.close()``."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class GrantedPages(_Closing, abc.ABC):
    """Pages of our own memory granted to ``remote_domid`` (one per ref in ``refs``)."""

    remote_domid: int
    refs: list
    readonly: bool

    @property
    @abc.abstractmethod
    def buffer(self):
        """A writable memoryview over ``len(refs) * PAGE_SIZE`` bytes."""

    def page(self, i):
        """A memoryview of page ``i`` (the one ``refs[i]`` grants)."""
        return self.buffer[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]

    @abc.abstractmethod
    def end_access(self):
        """Revoke every grant.  Returns True if all were revoked now.

        False means the remote still maps some page: those grants end and
        their memory is freed once the remote unmaps (gntalloc's deferred
        free).  Either way, do not hand the refs out again.
        """

    def flags(self, i):
        """The GTF_* flags of ``refs[i]``'s grant entry, where the platform shows them."""
        raise NotImplementedError("this platform does not expose grant entries")

    def set_unmap_notify(self, clear_byte=None, port=None):
        """When these pages are released (or we die): zero the byte at offset
        ``clear_byte`` of ``buffer`` and/or notify ``port`` (a Port or number)."""
        raise NotImplementedError("this platform has no unmap notify for grants")

    @abc.abstractmethod
    def close(self):
        """End access (if not done) and release our view of the pages."""


class Mapping(_Closing, abc.ABC):
    """Another domain's grants mapped contiguously, page ``i`` from ``refs[i]``."""

    domid: int
    refs: list
    writable: bool

    @property
    @abc.abstractmethod
    def buffer(self):
        """A memoryview over ``len(refs) * PAGE_SIZE`` bytes; read-only unless writable."""

    def page(self, i):
        return self.buffer[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]

    @abc.abstractmethod
    def set_unmap_notify(self, clear_byte=None, port=None):
        """On unmap or process death: zero the byte at offset ``clear_byte`` of
        the mapping (seen by the granter) and/or notify ``port`` (a Port of
        ours, or its number), as gntdev's IOCTL_GNTDEV_SET_UNMAP_NOTIFY."""

    @abc.abstractmethod
    def unmap(self):
        """Release the mapping.  Release every memoryview taken from
        ``buffer`` first: a still-exported view raises LocalProtocolError."""

    def close(self):
        self.unmap()


class Port(_Closing, abc.ABC):
    """One local event-channel port bound (or to be bound) to a remote domain."""

    port: int
    remote_domid: int
    # What fileno() is, for the C engine: "evtchn" (a /dev/xen/evtchn fd: read
    # pending ports, write one back to unmask, IOCTL_EVTCHN_NOTIFY) or
    # "socket" (the sim: a byte per event, end of file when the peer is gone).
    transport: str

    @abc.abstractmethod
    def notify(self):
        """Send an event to the peer.  Raises EventChannelClosed if it is gone."""

    def wait(self, timeout=None):
        """Block until an event arrives (True, and the event is consumed) or
        ``timeout`` seconds pass (False).  Raises EventChannelClosed if the
        peer is gone and no event is left.  Subclasses keep ``_poll``, a
        ``select.poll`` with their descriptor registered."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.clear():
                return True
            if deadline is None:
                self._poll.poll()
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._poll.poll(math.ceil(remaining * 1000))

    @abc.abstractmethod
    def fileno(self):
        """A file descriptor that polls readable while an event is pending."""

    @abc.abstractmethod
    def clear(self):
        """Consume a pending event without blocking; True if there was one.
        Call after select/poll said readable, before looking at the ring."""

    def ack(self):
        return self.clear()

    @abc.abstractmethod
    def close(self):
        """Unbind the port; the peer's later notifies fail (on sim)."""


@dataclass(frozen=True)
class GrantRef:
    """A grant copy endpoint in another domain's granted page."""

    domid: int
    ref: int
    offset: int = 0


@dataclass(frozen=True)
class Local:
    """A grant copy endpoint in a local buffer (bytes for a source, writable for a dest)."""

    buffer: Any
    offset: int = 0


@dataclass(frozen=True)
class CopyOp:
    """One IOCTL_GNTDEV_GRANT_COPY segment: ``length`` bytes from ``source`` to ``dest``.

    At least one side is a GrantRef, and a GrantRef side may not cross its
    page (gntdev refuses both with EINVAL: we raise LocalProtocolError).
    """

    source: Any
    dest: Any
    length: int

    def __post_init__(self):
        for side in (self.source, self.dest):
            if not isinstance(side, (GrantRef, Local)):
                raise LocalProtocolError("copy endpoint must be GrantRef or Local: %r" % (side,))
            if side.offset < 0:
                raise LocalProtocolError("negative copy offset")
            if isinstance(side, GrantRef) and side.offset + self.length > PAGE_SIZE:
                raise LocalProtocolError("grant copy may not cross a page boundary")
            if isinstance(side, Local) and side.offset + self.length > memoryview(
                    side.buffer).nbytes:
                raise LocalProtocolError("grant copy runs past the local buffer")
        if isinstance(self.source, Local) and isinstance(self.dest, Local):
            raise LocalProtocolError("grant copy needs a grant on at least one side")
        if not 0 < self.length <= 0xFFFF:
            raise LocalProtocolError("grant copy length must be 1..65535")


class Platform(_Closing, abc.ABC):
    """Grant tables and event channels of the domain ``domid``."""

    name: str
    domid: int

    @abc.abstractmethod
    def grant_pages(self, remote_domid, count, readonly=False):
        """Allocate ``count`` zeroed pages and grant them to ``remote_domid``."""

    @abc.abstractmethod
    def map_grants(self, remote_domid, refs, writable=True):
        """Map ``refs`` of ``remote_domid`` contiguously.  Raises GrantError
        (``.status`` GNTST_*) if any ref cannot be mapped; nothing stays mapped."""

    def map_grants_each(self, remote_domid, refs, writable=True):
        """Map each of ``refs`` on its own: one Mapping per ref, each unmapped
        alone (as Xen's batched GNTTABOP_map_grant_ref gives a handle per
        entry).  Raises as :meth:`map_grants`; nothing stays mapped then.
        This default maps them one by one; a platform may do it in one call."""
        mappings = []
        try:
            for ref in refs:
                mappings.append(self.map_grants(remote_domid, [ref], writable))
        except BaseException:
            for mapping in mappings:
                mapping.unmap()
            raise
        return mappings

    def unmap_grants_each(self, mappings):
        """Unmap ``mappings`` (of :meth:`map_grants_each`) together, as a
        backend lets its persistent grants go.  This default unmaps them one
        by one; a platform may do it in one call."""
        for mapping in mappings:
            mapping.unmap()

    def grant_device(self):
        """A descriptor native code may map grants through itself (Xen's
        gntdev), or None: then grants are mapped only by :meth:`map_grants`."""
        return None

    @abc.abstractmethod
    def grant_copy(self, ops):
        """Perform CopyOps in order; returns one GNTST_* status per op."""

    @abc.abstractmethod
    def evtchn_alloc_unbound(self, remote_domid):
        """A new Port that ``remote_domid`` may bind to (advertise ``.port``)."""

    @abc.abstractmethod
    def evtchn_bind_interdomain(self, remote_domid, remote_port):
        """A new Port bound to ``remote_port`` of ``remote_domid``.  Raises
        EventChannelError (EINVAL) unless that port is unbound and offered to us."""

    @abc.abstractmethod
    def close(self):
        """Release every grant, mapping and port this platform object holds."""
