"""One simulated domain: its memory, its v1 grant table, its event-channel ports.

Memory is one sealed memfd ("domain RAM"); page frame numbers are page
offsets in it.  The grant table is another memfd holding real
``struct grant_entry_v1`` entries, written only by the hypervisor and mapped
read-only by the domain's processes, so a granter sees GTF_reading and
GTF_writing while its pages are mapped.  Checks and statuses follow Xen's
grant_table.c (_set_status_v1, map_grant_ref, gnttab_end_foreign_access_ref):
a ref past the table is GNTST_bad_gntref; an entry that is not
GTF_permit_access for the mapping domain, or a write pin of a GTF_readonly
entry, is GNTST_general_error.
"""
import fcntl
import heapq
import mmap
import os

from blkif.abi import ffi, lib
from blkif.abi.constants import (
    GNTST_bad_gntref,
    GNTST_general_error,
    GNTST_okay,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_type_mask,
    GTF_writing,
    PAGE_SIZE,
)

NR_GRANT_FRAMES = 32  # 32 pages of 512 v1 entries: 16384 refs
GNTTAB_NR_RESERVED_ENTRIES = 8  # Linux keeps refs 0..7 for the toolstack
MEMORY_CHUNK_PAGES = 256  # domain RAM grows 1 MiB at a time
MAX_MEMORY_PAGES = 1 << 18  # 1 GiB of granted memory per domain

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL


def _memfd(name, size):
    """A memfd of ``size`` bytes that nobody can shrink (no SIGBUS for mappers)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    return fd


def _read_only(fd):
    """A read-only descriptor of the same file: mmap(PROT_WRITE) of it fails."""
    return os.open("/proc/self/fd/%d" % fd, os.O_RDONLY | os.O_CLOEXEC)


class Memory:
    """Domain RAM: pages handed out by frame number, zeroed when allocated."""

    def __init__(self, domid):
        self.fd = _memfd("blkif-sim-ram-d%d" % domid, MEMORY_CHUNK_PAGES * PAGE_SIZE)
        self.ro_fd = _read_only(self.fd)
        self.pages = MEMORY_CHUNK_PAGES
        self._free = list(range(self.pages))

    def alloc(self, count):
        """``count`` zeroed frames, or None if the domain is out of memory."""
        while len(self._free) < count:
            if self.pages + MEMORY_CHUNK_PAGES > MAX_MEMORY_PAGES:
                return None
            os.ftruncate(self.fd, (self.pages + MEMORY_CHUNK_PAGES) * PAGE_SIZE)
            for pfn in range(self.pages, self.pages + MEMORY_CHUNK_PAGES):
                heapq.heappush(self._free, pfn)
            self.pages += MEMORY_CHUNK_PAGES
        frames = [heapq.heappop(self._free) for _ in range(count)]
        zero = bytes(PAGE_SIZE)
        for pfn in frames:
            os.pwrite(self.fd, zero, pfn * PAGE_SIZE)
        return frames

    def free(self, pfn):
        heapq.heappush(self._free, pfn)

    def close(self):
        os.close(self.ro_fd)
        os.close(self.fd)


class GrantTable:
    """A v1 grant table in shared memory plus the hypervisor's pin counts."""

    def __init__(self, domid, frames=NR_GRANT_FRAMES):
        size = frames * PAGE_SIZE
        self.fd = _memfd("blkif-sim-gnttab-d%d" % domid, size)
        self.ro_fd = _read_only(self.fd)
        self._mm = mmap.mmap(self.fd, size)
        self.entries = ffi.from_buffer("struct grant_entry_v1[]", self._mm)
        self.nr_entries = size // ffi.sizeof("struct grant_entry_v1")
        self.size = size
        self._free = list(range(GNTTAB_NR_RESERVED_ENTRIES, self.nr_entries))
        self.pins = {}  # ref -> [readers, writers]
        self.deferred = set()  # refs whose end_access waits for the last unpin

    @property
    def live(self):
        """How many refs are granted (including deferred ones)."""
        return self.nr_entries - GNTTAB_NR_RESERVED_ENTRIES - len(self._free)

    def grant(self, remote_domid, frames, readonly):
        """Grant access to ``frames``; their refs, or None if the table is full."""
        if len(self._free) < len(frames):
            return None
        refs = [heapq.heappop(self._free) for _ in frames]
        for ref, frame in zip(refs, frames):
            entry = self.entries[ref]
            entry.domid = remote_domid
            entry.frame = frame
            lib.xen_wmb()  # as gnttab_grant_foreign_access: flags last
            entry.flags = GTF_permit_access | (GTF_readonly if readonly else 0)
        return refs

    def check(self, ref, mapping_domid, writable):
        """The GNTST_* status a map or copy of ``ref`` would get (no side effect)."""
        if not 0 <= ref < self.nr_entries:
            return GNTST_bad_gntref
        entry = self.entries[ref]
        if (entry.flags & GTF_type_mask) != GTF_permit_access or entry.domid != mapping_domid:
            return GNTST_general_error
        if writable and entry.flags & GTF_readonly:
            return GNTST_general_error
        return GNTST_okay

    def frame(self, ref):
        return self.entries[ref].frame

    def pin(self, ref, writable):
        """Count one more mapping of a checked ``ref``; sets GTF_reading/writing."""
        counts = self.pins.setdefault(ref, [0, 0])
        counts[0] += 1
        counts[1] += 1 if writable else 0
        self._set_in_use(ref)

    def unpin(self, ref, writable):
        """Drop one mapping.  Returns the frame to free if a deferred end
        of access completed now, else None."""
        counts = self.pins[ref]
        counts[0] -= 1
        counts[1] -= 1 if writable else 0
        if counts[0] == 0:
            del self.pins[ref]
        self._set_in_use(ref)
        if ref in self.deferred and ref not in self.pins:
            self.deferred.discard(ref)
            return self._revoke(ref)
        return None

    def end_access(self, ref):
        """gnttab_end_foreign_access: the frame to free if revoked now; None
        (and the ref is kept until its last unpin) if still in use."""
        if ref in self.pins:
            self.deferred.add(ref)
            return None
        return self._revoke(ref)

    def _set_in_use(self, ref):
        counts = self.pins.get(ref, (0, 0))
        entry = self.entries[ref]
        flags = entry.flags & ~(GTF_reading | GTF_writing)
        flags |= (GTF_reading if counts[0] else 0) | (GTF_writing if counts[1] else 0)
        entry.flags = flags

    def _revoke(self, ref):
        entry = self.entries[ref]
        frame = entry.frame
        entry.flags = 0
        lib.xen_wmb()
        entry.domid = 0
        entry.frame = 0
        heapq.heappush(self._free, ref)
        return frame

    def close(self):
        ffi.release(self.entries)
        self._mm.close()
        os.close(self.ro_fd)
        os.close(self.fd)


class Domain:
    """A domain exists while one of its processes is connected, and lingers
    (dying: maps of it fail) until the last of its grants is unmapped."""

    def __init__(self, domid):
        self.domid = domid
        self.conns = set()
        self.memory = Memory(domid)
        self.gnttab = GrantTable(domid)
        self.ports = {}  # port number -> hypervisor.PortRecord

    @property
    def alive(self):
        return bool(self.conns)

    @property
    def finished(self):
        return not self.conns and self.gnttab.live == 0 and not self.ports

    def new_port_number(self):
        port = 1  # port 0 is never valid in Xen
        while port in self.ports:
            port += 1
        return port

    def close(self):
        self.gnttab.close()
        self.memory.close()
