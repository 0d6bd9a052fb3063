"""The catalogue: every conformance case, numbered, with its clause and level.

A case is data (what it sends, what it expects, why, the clause of blkif.h,
ring.h or the XSA it checks) plus a function that performs it against a peer.
Group modules register theirs with :func:`group`::

    case = group("backend", "requests")

    @case("req-3", "blkif.h: BLKIF_MAX_SEGMENTS_PER_REQUEST", MUST,
          title="12 segments in a direct request",
          sends="a READ with nr_segments 12",
          expects="a response with status BLKIF_RSP_ERROR",
          why="...")
    def _(peer): ...

The function raises :class:`Failed` (with the observed value) when the peer
does not conform, :class:`Skipped` when the target cannot run the case, and
may return a string: what it observed, shown for INFO cases.

Levels: MUST for blkif.h's and ring.h's rules and the security rules; SHOULD
for what Linux does where the header is silent; INFO for values worth knowing.
"""
import importlib
from dataclasses import dataclass
from typing import Callable

MUST, SHOULD, INFO = "MUST", "SHOULD", "INFO"
LEVELS = (MUST, SHOULD, INFO)

# side -> its group modules, in report order
GROUPS = {
    "backend": ("xenbus", "ring", "requests", "grants", "security"),
    "frontend": ("xenbus", "responses", "security"),
}


class Failed(Exception):
    """The peer did not do what the case expects; the message is what it did."""


class Skipped(Exception):
    """The target cannot run this case (the message says why)."""


@dataclass(frozen=True)
class Case:
    id: str
    side: str
    group: str
    clause: str
    level: str
    title: str
    sends: str
    expects: str
    why: str
    run: Callable


CASES = {}  # id -> Case, in registration order


def group(side, name):
    """The ``case`` decorator factory for group ``name`` of ``side``."""
    def case(id, clause, level, *, title, sends, expects, why):
        if level not in LEVELS:
            raise ValueError("case %s: level %r" % (id, level))

        def register(function):
            if id in CASES:
                raise ValueError("case %s registered twice" % id)
            CASES[id] = Case(id, side, name, clause, level, title, sends, expects, why,
                             function)
            return function
        return register
    return case


def load(side=None):
    """Every case of ``side`` (both sides if None), in catalogue order."""
    for each in (side,) if side else GROUPS:
        for name in GROUPS[each]:
            importlib.import_module("blkif.conformance.%s.%s" % (each, name))
    order = [(s, g) for s in GROUPS for g in GROUPS[s]]
    cases = [c for c in CASES.values() if side in (None, c.side)]
    return sorted(cases, key=lambda c: (order.index((c.side, c.group)), _number(c.id)))


def _number(case_id):
    tail = case_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def select(cases, ids=(), levels=()):
    """``cases`` filtered to ``ids`` (exact ids or group prefixes such as
    ``req``) and ``levels``; an unknown id raises ValueError."""
    out = list(cases)
    if ids:
        known = {c.id for c in out}
        for wanted in ids:
            if wanted not in known and not any(c.id.startswith(wanted + "-") for c in out):
                raise ValueError("no case %r (see `blkif conformance list`)" % wanted)
        out = [c for c in out if c.id in ids or any(c.id.startswith(w + "-") for w in ids)]
    if levels:
        out = [c for c in out if c.level in levels]
    return out
