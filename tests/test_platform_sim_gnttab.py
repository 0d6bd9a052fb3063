"""The sim's grant table against a model of Xen's v1 rules (hypothesis).

Random grants, maps (pins), unmaps and ends of access; after every step the
shared entries a granter would read (flags, domid, frame) and every map
status must match the model, as must which ends of access were deferred.
"""
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from blkif.abi.constants import (
    GNTST_bad_gntref,
    GNTST_general_error,
    GNTST_okay,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_writing,
)
from blkif.platform.sim.domain import GNTTAB_NR_RESERVED_ENTRIES, GrantTable

DOMIDS = st.integers(0, 2)


class GrantTableMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.table = GrantTable(domid=1, frames=1)
        self.model = {}  # ref -> dict(domid, frame, readonly, readers, writers, deferred)
        self.pins = []  # (ref, writable) currently held
        self.next_frame = 1000
        self.freed_frames = []

    def teardown(self):
        self.table.close()

    @rule(remote=DOMIDS, count=st.integers(1, 4), readonly=st.booleans())
    def grant(self, remote, count, readonly):
        frames = list(range(self.next_frame, self.next_frame + count))
        self.next_frame += count
        refs = self.table.grant(remote, frames, readonly)
        free = self.table.nr_entries - GNTTAB_NR_RESERVED_ENTRIES - len(self.model)
        if count > free:
            assert refs is None
            return
        assert len(set(refs)) == count and not set(refs) & set(self.model)
        for ref, frame in zip(refs, frames):
            self.model[ref] = dict(domid=remote, frame=frame, readonly=readonly,
                                   readers=0, writers=0, deferred=False)

    def _expected(self, ref, domid, writable):
        if not 0 <= ref < self.table.nr_entries:
            return GNTST_bad_gntref
        entry = self.model.get(ref)
        if entry is None or entry["domid"] != domid or (writable and entry["readonly"]):
            return GNTST_general_error
        return GNTST_okay

    @rule(data=st.data(), domid=DOMIDS, writable=st.booleans())
    def map(self, data, domid, writable):
        known = sorted(self.model) or [GNTTAB_NR_RESERVED_ENTRIES]
        ref = data.draw(st.one_of(st.sampled_from(known), st.integers(-2, 600)))
        status = self.table.check(ref, domid, writable)
        assert status == self._expected(ref, domid, writable)
        if status == GNTST_okay:
            self.table.pin(ref, writable)
            entry = self.model[ref]
            entry["readers"] += 1
            entry["writers"] += writable
            self.pins.append((ref, writable))

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def unmap(self, data):
        ref, writable = self.pins.pop(data.draw(st.integers(0, len(self.pins) - 1)))
        frame = self.table.unpin(ref, writable)
        entry = self.model[ref]
        entry["readers"] -= 1
        entry["writers"] -= writable
        if entry["deferred"] and entry["readers"] == 0:
            assert frame == entry["frame"]
            del self.model[ref]
        else:
            assert frame is None

    @precondition(lambda self: any(not e["deferred"] for e in self.model.values()))
    @rule(data=st.data())
    def end_access(self, data):
        ref = data.draw(st.sampled_from(
            sorted(r for r, e in self.model.items() if not e["deferred"])))
        entry = self.model[ref]
        frame = self.table.end_access(ref)
        if entry["readers"]:
            assert frame is None
            entry["deferred"] = True
        else:
            assert frame == entry["frame"]
            del self.model[ref]

    @invariant()
    def shared_entries_match(self):
        for ref in range(self.table.nr_entries):
            raw = self.table.entries[ref]
            entry = self.model.get(ref)
            if entry is None:
                assert raw.flags == 0
                continue
            flags = (GTF_permit_access | (GTF_readonly if entry["readonly"] else 0)
                     | (GTF_reading if entry["readers"] else 0)
                     | (GTF_writing if entry["writers"] else 0))
            assert (raw.flags, raw.domid, raw.frame) == (flags, entry["domid"], entry["frame"])
        assert self.table.live == len(self.model)


GrantTableMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40,
                                               deadline=None)
TestGrantTable = GrantTableMachine.TestCase
