"""Persistent grants, as blkif.h and Linux blkback keep them (Python reference).

With ``feature-persistent`` both ends reuse granted pages, so the backend maps
each grant once and keeps it: keyed by gref alone (a page the frontend uses
as an indirect page and later as a data page is one entry), mapped writable
(blkback maps persistent grants read-write), at most ``capacity`` per ring
(Linux ``max_persistent_grants``), and purged once unused for
``unused_seconds`` (``persistent_grant_unused_seconds``).  A request whose
grants do not fit a full cache is mapped for itself; :meth:`clean` then
frees up to 5% of the cache, least recently used first, of the grants idle
for a second, at most every 100 ms (Linux ``purge_persistent_gnt``): a
working set larger than the cache keeps its hot pages and is never remapped
page by page.
The C engine (``csrc/engine.c``) keeps the same cache with reference counts
for requests in flight; this one serves one request at a time.
"""
import collections
import time


class GrantCache:
    """gref -> one-page Mapping, least recently used first."""

    def __init__(self, platform, domid, capacity, unused_seconds=60, clock=time.monotonic):
        self.platform, self.domid = platform, domid
        self.capacity, self.unused_seconds, self.clock = capacity, unused_seconds, clock
        self._pages = collections.OrderedDict()  # gref -> (mapping, view, last used)
        self.hits = self.misses = self.evictions = self.purged = 0
        self.full_misses = 0  # grants a full cache could not keep since the last clean
        self._next_clean = 0.0

    def __len__(self):
        return len(self._pages)

    def pages(self, grefs):
        """Views of the pages of ``grefs``, mapping the missing ones into the
        cache; None when they do not fit: map them with the request."""
        pages, now = self._pages, self.clock()
        missing = [gref for gref in dict.fromkeys(grefs) if gref not in pages]
        if len(missing) > self.capacity - len(pages):
            self.full_misses += len(missing)
            return None
        for gref in missing:
            mapping = self.platform.map_grants(self.domid, [gref], writable=True)
            pages[gref] = (mapping, mapping.buffer, now)
        self.misses += len(missing)
        self.hits += len(grefs) - len(missing)
        out = []
        for gref in grefs:
            mapping, view, _ = pages[gref]
            pages[gref] = (mapping, view, now)
            pages.move_to_end(gref)
            out.append(view)
        return out

    def clean(self):
        """After a full cache turned grants away: unmap up to 5% of it (at
        least one), least recently used first, of those idle for a second; at
        most every 100 ms."""
        now = self.clock()
        if not self.full_misses or now < self._next_clean:
            return
        for _ in range(max(1, self.capacity * 5 // 100)):
            if not self._pages:
                break
            gref, (_, _, used) = next(iter(self._pages.items()))
            if used > now - 1.0:
                break
            self._drop(gref)
            self.evictions += 1
        self.full_misses = 0
        self._next_clean = now + 0.1

    def purge(self):
        """Unmap the grants unused for ``unused_seconds``."""
        limit = self.clock() - self.unused_seconds
        while self._pages:
            gref, (_, _, used) = next(iter(self._pages.items()))
            if used > limit:
                break
            self._drop(gref)
            self.purged += 1

    def _drop(self, gref):
        mapping, _, _ = self._pages.pop(gref)
        mapping.unmap()

    def clear(self):
        for gref in list(self._pages):
            self._drop(gref)
