"""The daemon core without sockets: the store against a dict model
(hypothesis state machine), and random packets into Xenstored.handle."""
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition,
                                 rule)

from xenstore import Perm
from xenstore.daemon import Xenstored
from xenstore.store import DOM0, Caller, Store, StoreError, parent_of
from xenstore.wire import XSD_ERRORS, Op, Packet

NAMES = st.sampled_from(["a", "b", "c"])
PATHS = st.lists(NAMES, min_size=1, max_size=3).map(lambda p: "/" + "/".join(p))
VALUES = st.binary(max_size=4)


class StoreModel(RuleBasedStateMachine):
    """Store vs {path: value}; transactions checked against their snapshot."""

    def __init__(self):
        super().__init__()
        self.store = Store()
        self.model = {"/": b"", "/tool": b"", "/tool/xenstored": b""}
        self.tx = None
        self.tx_model = None

    def _create(self, model, path, value):
        node = path
        while node not in model:
            model[node] = b""
            node = parent_of(node)
        model[path] = value

    @rule(path=PATHS, value=VALUES)
    def write(self, path, value):
        self.store.apply(DOM0, "write", path, value)
        self._create(self.model, path, value)

    @rule(path=PATHS)
    def mkdir(self, path):
        self.store.apply(DOM0, "mkdir", path)
        if path not in self.model:
            self._create(self.model, path, b"")

    @rule(path=PATHS)
    def rm(self, path):
        try:
            self.store.apply(DOM0, "rm", path)
        except StoreError as e:
            assert e.name == "ENOENT" and parent_of(path) not in self.model
            return
        for p in [p for p in self.model if p == path or p.startswith(path + "/")]:
            del self.model[p]

    @rule(path=PATHS)
    def read(self, path):
        try:
            assert self.store.apply(DOM0, "read", path) == self.model[path]
        except StoreError as e:
            assert e.name == "ENOENT" and path not in self.model

    @precondition(lambda self: self.tx is None)
    @rule()
    def begin(self):
        self.tx = self.store.begin(DOM0)
        self.tx_model = dict(self.model)

    @precondition(lambda self: self.tx is not None)
    @rule(path=PATHS, value=VALUES)
    def tx_write(self, path, value):
        self.tx.apply("write", path, value)
        self._create(self.tx_model, path, value)

    @precondition(lambda self: self.tx is not None)
    @rule(path=PATHS)
    def tx_read(self, path):
        try:
            assert self.tx.apply("read", path) == self.tx_model[path]
        except StoreError:
            assert path not in self.tx_model

    @precondition(lambda self: self.tx is not None)
    @rule()
    def commit(self):
        touched = self.tx.work.accessed
        before = {p: self.store.tree.generation(p) for p in touched}
        clean = all(self.tx.snapshot.generation(p) == g for p, g in before.items())
        try:
            self.store.commit(self.tx)
        except StoreError as e:
            assert e.name == "EAGAIN" and not clean
        else:
            assert clean
            for _method, args in self.tx.log:     # replayed onto the live tree
                self._create(self.model, args[0], args[1])
        self.tx = None

    @invariant()
    def tree_matches_model(self):
        paths = {p: n.value for p, n in self.store.tree.walk("/")}
        assert paths == self.model
        owners = {}
        for _, node in self.store.tree.walk("/"):
            owners[node.owner] = owners.get(node.owner, 0) + 1
        owners[0] += 2    # the two special nodes
        assert owners == {d: n for d, n in self.store.tree.owners.items() if n}


TestStoreModel = StoreModel.TestCase
TestStoreModel.settings = settings(max_examples=60, stateful_step_count=30,
                                   deadline=None)


def test_guest_creation_and_ownership():
    store = Store()
    guest = Caller(5)
    store.apply(DOM0, "mkdir", "/local/domain/5")
    store.apply(DOM0, "set_perms", "/local/domain/5", (Perm("n", 5),))
    store.apply(guest, "write", "/local/domain/5/a/b", b"x")
    assert store.tree.lookup("/local/domain/5/a").owner == 5
    assert store.tree.owners[5] == 3


requests = st.builds(
    Packet, st.sampled_from(list(Op)) | st.integers(0, 30),
    st.integers(0, 9), st.integers(0, 3),
    st.lists(st.sampled_from([b"/", b"a", b"\0", b"@introduceDomain", b"1",
                              b"T", b"r1", b"n0", b"5", b"//"]),
             max_size=10).map(b"".join))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), requests), max_size=25))
def test_random_requests_always_get_one_well_formed_reply(script):
    daemon = Xenstored()
    daemon.introduce(1)
    dom0, guest = daemon.connect(0), daemon.connect(1)
    for as_guest, packet in script:
        conn = guest if as_guest else dom0
        if conn.closing:
            continue
        conn.outbox.clear()
        daemon.handle(conn, packet)
        replies = [p for p in conn.outbox if p.type != Op.WATCH_EVENT]
        if conn.closing:
            continue
        assert len(replies) == 1, (packet, list(conn.outbox))
        reply = replies[0]
        assert (reply.req_id, reply.tx_id) == (packet.req_id, packet.tx_id)
        if reply.type == Op.ERROR:
            assert reply.payload[:-1].decode() in XSD_ERRORS
        else:
            assert reply.type == packet.type
        if packet.type == Op.RELEASE and reply.type != Op.ERROR:
            guest = daemon.connect(0)   # guest domain gone: keep a live conn
