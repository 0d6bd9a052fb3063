"""A VBD's journal of requests in flight: what a restarted worker carries on from.

One file per connected VBD, ``<state dir>/journal/<domid>-<devid>``, mapped
shared by its worker.  The first page holds a magic, the store's flush-failed
flag (shared with the engines, so a failed fdatasync stays failed across a
restart) and, as JSON, what the connection was: the offer the frontend
negotiated against and the frontend's nodes.  Then one region per ring, kept
by the C engine with plain stores (``struct eng_journal``: the ring's
positions and every request taken but not answered; engine.c, "the
journal"), or by the Python ring server through :class:`RingJournal`, the
same protocol in Python.

A worker killed at any moment leaves the file behind.  Its successor finds
the frontend still Connected with the same nodes, maps the rings, binds the
channels again and hands each engine its region to resume: the requests the
dead worker had taken are answered, once, and serving goes on.  Nothing is
renegotiated; the guest sees a pause.  A clean disconnect removes the file.
"""
import json
import mmap
import os

from blkif.abi import ffi, lib
from blkif.errors import BlkifError

MAGIC = b"BLKIFJ01"
HEADER_BYTES = 4096
FLUSH_FAILED_AT = 8
LENGTH_AT = 12
DESCRIPTION_AT = 16
PAGE = 4096


class JournalError(BlkifError):
    """A journal that cannot be used (the VBD then starts over, as without one)."""


def journal_path(directory, domid, devid):
    return os.path.join(directory, "%d-%d" % (domid, devid))


def _region_bytes(ring_bytes):
    """Room for the most requests a ring of ``ring_bytes`` holds (a slot is at
    least 64 bytes), page-aligned."""
    entries = ring_bytes // 64
    size = ffi.sizeof("struct eng_journal") + entries * ffi.sizeof("struct eng_journal_entry")
    return -(-size // PAGE) * PAGE


class Journal:
    """An open journal; ``description`` is the JSON-able dict it was created with."""

    def __init__(self, path, fd, description):
        self.path, self.description = path, description
        self._map = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED)
        self._base = ffi.from_buffer(self._map)
        self.flush_failed = ffi.cast("int *", self._base + FLUSH_FAILED_AT)
        self._offsets = []
        at = HEADER_BYTES
        for ring_bytes in description["ring_bytes"]:
            self._offsets.append(at)
            at += _region_bytes(ring_bytes)
        if at > len(self._map):
            self.close()
            raise JournalError("%s: %d bytes, its rings need %d" % (path, len(self._map), at))

    @classmethod
    def create(cls, path, description):
        """A new journal at ``path`` (replacing any), for rings of
        ``description["ring_bytes"]`` bytes each."""
        text = json.dumps(description, sort_keys=True).encode()
        if DESCRIPTION_AT + len(text) > HEADER_BYTES:
            raise JournalError("%s: the connection's description is too long" % path)
        size = HEADER_BYTES + sum(_region_bytes(n) for n in description["ring_bytes"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".new"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            head = bytearray(HEADER_BYTES)
            head[LENGTH_AT:LENGTH_AT + 4] = len(text).to_bytes(4, "little")
            head[DESCRIPTION_AT:DESCRIPTION_AT + len(text)] = text
            head[:len(MAGIC)] = MAGIC
            os.pwrite(fd, bytes(head), 0)
            os.rename(tmp, path)
            return cls(path, fd, description)
        finally:
            os.close(fd)

    @classmethod
    def open(cls, path):
        """The journal a predecessor left at ``path``; None if there is none."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            head = os.pread(fd, HEADER_BYTES, 0)
            length = int.from_bytes(head[LENGTH_AT:LENGTH_AT + 4], "little")
            if head[:len(MAGIC)] != MAGIC or DESCRIPTION_AT + length > HEADER_BYTES:
                raise JournalError("%s: not a journal" % path)
            try:
                description = json.loads(head[DESCRIPTION_AT:DESCRIPTION_AT + length])
            except ValueError as exc:
                raise JournalError("%s: unreadable description: %s" % (path, exc)) from None
            return cls(path, fd, description)
        finally:
            os.close(fd)

    def region(self, ring):
        """Ring ``ring``'s ``struct eng_journal *``, for its engine."""
        return ffi.cast("struct eng_journal *", self._base + self._offsets[ring])

    def close(self):
        """Unmap; the file stays for a successor."""
        if self._map is None:
            return
        ffi.release(self._base)
        self._map.close()
        self._map = None

    def remove(self):
        """Unmap and delete: the connection ended cleanly."""
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class RingJournal:
    """One ring's region (``struct eng_journal``) kept from Python, by the
    rules of engine.c's "the journal": a request's bytes, its ring index and
    TAKEN, then ``req_cons``; at its answer ANSWERED with the response's
    index, then ``rsp_prod_pvt``, then FREE.  Each store is a plain store in
    that order, so a process killed between any two leaves a prefix its
    successor (this class or the C engine) can read back."""

    def __init__(self, region, size, abi):
        self.j, self.size, self.abi = region, size, abi

    def start(self, at):
        """A new journal for a ring whose next request is at index ``at``."""
        j = self.j
        n = ffi.sizeof("struct eng_journal") + self.size * ffi.sizeof("struct eng_journal_entry")
        ffi.memmove(j, bytes(n), n)
        j.size, j.abi = self.size, self.abi
        j.req_cons = j.rsp_prod_pvt = at
        j.magic = lib.ENG_JOURNAL_MAGIC

    def resume(self, rsp_prod):
        """What a predecessor left: (req_cons, rsp_prod_pvt, [(entry, request
        bytes)] of the requests taken and not answered, oldest on the ring
        first, which stay TAKEN until :meth:`answered`).  JournalError if the
        region is not this ring's or does not add up."""
        j = self.j
        if j.magic != lib.ENG_JOURNAL_MAGIC or j.size != self.size or j.abi != self.abi:
            raise JournalError("the journal is not of this ring (size %d, abi %d)"
                               % (j.size, j.abi))
        cons, rsp = j.req_cons, j.rsp_prod_pvt
        for en in j.entries[0:self.size]:
            if en.state == lib.JOURNAL_ANSWERED and en.answer == rsp:
                rsp = (rsp + 1) & 0xFFFFFFFF  # killed between its answer and rsp_prod_pvt
        taken = []  # (age on the ring, entry, request bytes)
        for i, en in enumerate(j.entries[0:self.size]):
            if en.state == lib.JOURNAL_TAKEN and en.ring_index != cons:
                taken.append(((cons - en.ring_index) & 0xFFFFFFFF, i,
                              bytes(ffi.buffer(en.request))))
            else:
                en.state = lib.JOURNAL_FREE
        if (cons - rsp) & 0xFFFFFFFF != len(taken) or (rsp - rsp_prod) & 0xFFFFFFFF > self.size:
            raise JournalError("the journal is inconsistent (req_cons %d, rsp_prod_pvt %d, %d "
                               "requests, rsp_prod %d)" % (cons, rsp, len(taken), rsp_prod))
        j.rsp_prod_pvt = rsp
        return cons, rsp, [(entry, raw) for _, entry, raw in sorted(taken, reverse=True)]

    def take(self, raw, ring_index, entry):
        """Request bytes ``raw``, taken from ring index ``ring_index``, kept in
        entry ``entry`` (one per request in flight) until :meth:`answered`."""
        en = self.j.entries[entry]
        ffi.memmove(en.request, raw, len(raw))
        en.ring_index = ring_index
        en.state = lib.JOURNAL_TAKEN
        self.j.req_cons = (ring_index + 1) & 0xFFFFFFFF

    def answered(self, entry, at):
        """The request kept in ``entry`` was answered in response slot ``at``."""
        en = self.j.entries[entry]
        en.answer = at
        en.state = lib.JOURNAL_ANSWERED
        self.j.rsp_prod_pvt = (at + 1) & 0xFFFFFFFF
        en.state = lib.JOURNAL_FREE
