"""Counters of a VBD's rings, for ``blkif stats`` (Linux: blkback's statistics).

Each ring keeps a :class:`RingCounters`: the Python ring service updates one
directly, the C engine keeps ``struct eng_stats`` and :func:`engine_counters`
reads it.  A VBD adds up its live rings and what the rings it closed had
counted (:meth:`RingCounters.add`); gauges (in flight, grants held) count
only for live rings.
"""
from blkif.abi.constants import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    OP_NAMES,
)

KINDS = (BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE,
         BLKIF_OP_DISCARD)  # what a request does; indirect ones are also counted apart
COUNTERS = ("requests", "indirect", "errors", "read_bytes", "write_bytes", "batches",
            "notifies", "events", "spurious_events", "grant_hits", "grant_misses",
            "grant_evictions", "grant_purged", "mapped_grants",
            "resumed")  # requests a killed predecessor had taken, answered by us
GAUGES = ("in_flight", "persistent_grants")
# struct eng_stats field of each operation's counter
_ENGINE_OPS = {BLKIF_OP_READ: "op_read", BLKIF_OP_WRITE: "op_write",
               BLKIF_OP_WRITE_BARRIER: "op_barrier", BLKIF_OP_FLUSH_DISKCACHE: "op_flush",
               BLKIF_OP_DISCARD: "op_discard"}


class RingCounters:
    """What one ring (or a sum of rings) has done."""

    def __init__(self):
        self.ops = {OP_NAMES[op]: 0 for op in KINDS}
        for name in COUNTERS + GAUGES:
            setattr(self, name, 0)

    def add(self, other, gauges=True):
        """Add ``other``'s counts (and its gauges unless ``gauges`` is False)."""
        for name in COUNTERS + (GAUGES if gauges else ()):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name, count in other.ops.items():
            self.ops[name] += count
        return self

    def as_dict(self):
        out = {name: getattr(self, name) for name in COUNTERS + GAUGES}
        out["ops"] = dict(self.ops)
        return out


def engine_counters(stats):
    """A :class:`RingCounters` read from the C engine's ``struct eng_stats *``."""
    out = RingCounters()
    for name in COUNTERS + GAUGES:
        setattr(out, name, getattr(stats, name))
    for op, field in _ENGINE_OPS.items():
        out.ops[OP_NAMES[op]] = getattr(stats, field)
    return out
