"""Persistent grants, as blkif.h and Linux blkback keep them (Python reference).

With ``feature-persistent`` both ends reuse granted pages, so the backend maps
each grant once and keeps it: keyed by gref alone (a page the frontend uses
as an indirect page and later as a data page is one entry), mapped writable
(blkback maps persistent grants read-write), at most ``capacity`` per ring
(Linux ``max_persistent_grants``) in least-recently-used order, and purged
once unused for ``unused_seconds`` (``persistent_grant_unused_seconds``).
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

    def __len__(self):
        return len(self._pages)

    def pages(self, grefs):
        """Views of the pages of ``grefs``, mapping the missing ones; None when
        they do not fit (more than the cache holds besides themselves)."""
        pages, now = self._pages, self.clock()
        missing = [gref for gref in dict.fromkeys(grefs) if gref not in pages]
        room = self.capacity - len(pages)
        if len(missing) > room:
            wanted = set(grefs)
            spare = [gref for gref in pages if gref not in wanted][:len(missing) - room]
            if len(spare) < len(missing) - room:
                return None
            for gref in spare:
                self._drop(gref)
                self.evictions += 1
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
