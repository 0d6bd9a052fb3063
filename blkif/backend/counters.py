"""Counters of a VBD's rings, for ``blkif stats`` (Linux: blkback's statistics).

Each ring keeps a :class:`RingCounters`: the Python ring service updates one
directly, the C engine keeps ``struct eng_stats`` and :func:`engine_counters`
reads it.  A VBD adds up its live rings and what the rings it closed had
counted (:meth:`RingCounters.add`); gauges (in flight, grants held) count
only for live rings.

Request latency, from the request taken off the ring to its response, is a
histogram of ``LATENCY_BUCKETS`` counts: bucket 0 holds latencies under
32 us, bucket i under 32 us * 2**i, the last one the rest (the C engine
computes the same index with a count of leading zeros).
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
            "resumed",  # requests a killed predecessor had taken, answered by us
            "bounced",  # transfers copied through the C engine's bounce buffer
            "submits")  # the C engine's io_uring submits (0 where it does no io_uring)
GAUGES = ("in_flight", "persistent_grants")
LATENCY_BUCKETS = 17
LATENCY_UNIT_NS = 32_000  # the first bucket's bound


def latency_bucket(ns):
    """The histogram bucket of a latency of ``ns`` nanoseconds."""
    return min((ns // LATENCY_UNIT_NS).bit_length(), LATENCY_BUCKETS - 1)


def latency_bounds():
    """Each bucket's upper bound in seconds; the last is infinite."""
    return [LATENCY_UNIT_NS * 2 ** i / 1e9 for i in range(LATENCY_BUCKETS - 1)] + [float("inf")]
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
        self.latency = [0] * LATENCY_BUCKETS
        self.latency_ns = 0  # the sum of every latency counted

    def observe(self, ns):
        """Count one request answered ``ns`` nanoseconds after it was taken."""
        self.latency[latency_bucket(ns)] += 1
        self.latency_ns += ns

    def add(self, other, gauges=True):
        """Add ``other``'s counts (and its gauges unless ``gauges`` is False)."""
        for name in COUNTERS + (GAUGES if gauges else ()):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name, count in other.ops.items():
            self.ops[name] += count
        self.latency = [a + b for a, b in zip(self.latency, other.latency)]
        self.latency_ns += other.latency_ns
        return self

    def as_dict(self):
        out = {name: getattr(self, name) for name in COUNTERS + GAUGES}
        out["ops"] = dict(self.ops)
        out["latency"] = list(self.latency)
        out["latency_ns"] = self.latency_ns
        return out


def engine_counters(stats):
    """A :class:`RingCounters` read from the C engine's ``struct eng_stats *``."""
    out = RingCounters()
    for name in COUNTERS + GAUGES:
        setattr(out, name, getattr(stats, name))
    for op, field in _ENGINE_OPS.items():
        out.ops[OP_NAMES[op]] = getattr(stats, field)
    out.latency = list(stats.latency)
    out.latency_ns = stats.latency_ns
    return out
