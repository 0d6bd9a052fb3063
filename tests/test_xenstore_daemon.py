"""The embedded xenstored's replies, byte for byte, over its real socket:
payload formats of every op, xsd_errors names, watches, permissions as a
guest on its domain socket sees them, transactions, quotas and limits."""
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenstore import domain_socket_path
from xenstore.daemon import Watch, Xenstored
from xenstore.store import Change
from xenstore.wire import XENSTORE_PAYLOAD_MAX, Op, Packet
from xenstore_fixtures import RawClient, start_server, stop_server, xenstored  # noqa: F401


@pytest.fixture
def dom0(xenstored):
    with RawClient(xenstored) as client:
        yield client


def guest(dom0, socket_path, domid):
    """Introduce ``domid`` with a home it owns, connect as that domain."""
    dom0.ok(Op.INTRODUCE, b"%d\0%d\0%d\0" % (domid, 0, 1))
    home = b"/local/domain/%d" % domid
    dom0.ok(Op.MKDIR, home + b"\0")
    dom0.ok(Op.SET_PERMS, home + b"\0n%d\0" % domid)
    return RawClient(domain_socket_path(socket_path, domid))


def test_read_write_formats(dom0):
    assert dom0.ok(Op.WRITE, b"/a/b\0hello") == b"OK\0"
    assert dom0.ok(Op.READ, b"/a/b\0") == b"hello"          # no NUL added
    assert dom0.ok(Op.READ, b"/a\0") == b""                 # created empty
    dom0.ok(Op.WRITE, b"/bin\0\x00\xff\0")
    assert dom0.ok(Op.READ, b"/bin\0") == b"\x00\xff\0"     # values are bytes
    assert dom0.error(Op.READ, b"/nope\0") == "ENOENT"
    assert dom0.error(Op.READ, b"/a/b") == "EINVAL"         # not NUL-terminated
    assert dom0.error(Op.READ, b"/a\0/b\0") == "EINVAL"     # two args
    assert dom0.error(Op.WRITE, b"/novalue") == "EINVAL"


def test_directory_and_directory_part(dom0):
    assert dom0.ok(Op.DIRECTORY, b"/\0") == b"tool\0"
    for name in (b"z", b"a", b"m"):
        dom0.ok(Op.WRITE, b"/d/" + name + b"\0")
    assert dom0.ok(Op.DIRECTORY, b"/d\0") == b"z\0a\0m\0"     # creation order
    assert dom0.ok(Op.DIRECTORY, b"/d/z\0") == b""
    gen, _, rest = dom0.ok(Op.DIRECTORY_PART, b"/d\0" + b"0\0").partition(b"\0")
    assert gen.isdigit() and rest == b"z\0a\0m\0\0"
    assert dom0.ok(Op.DIRECTORY_PART, b"/d\0" + b"2\0") == gen + b"\0a\0m\0\0"
    assert dom0.ok(Op.DIRECTORY_PART, b"/d\0" + b"99\0") == gen + b"\0\0"


def test_big_directory_is_e2big_and_comes_in_parts(dom0):
    names = [b"n%04d-" % i + b"x" * 40 for i in range(120)]   # > 4096 bytes
    for name in names:
        dom0.ok(Op.MKDIR, b"/big/" + name + b"\0")
    assert dom0.error(Op.DIRECTORY, b"/big\0") == "E2BIG"
    got, offset = [], 0
    while True:
        reply = dom0.ok(Op.DIRECTORY_PART, b"/big\0%d\0" % offset)
        assert len(reply) <= XENSTORE_PAYLOAD_MAX
        chunk = reply.partition(b"\0")[2]
        end = chunk.endswith(b"\0\0")
        chunk = chunk[:-1] if end else chunk
        got += chunk.split(b"\0")[:-1]
        offset += len(chunk)
        if end:
            break
    assert got == names


def test_perms_format_and_inheritance(dom0):
    assert dom0.ok(Op.GET_PERMS, b"/\0") == b"n0\0"
    dom0.ok(Op.WRITE, b"/p\0")
    assert dom0.ok(Op.SET_PERMS, b"/p\0b3\0r5\0") == b"OK\0"
    assert dom0.ok(Op.GET_PERMS, b"/p\0") == b"b3\0r5\0"
    dom0.ok(Op.WRITE, b"/p/q/r\0x")
    assert dom0.ok(Op.GET_PERMS, b"/p/q/r\0") == b"b3\0r5\0"   # inherited
    assert dom0.error(Op.SET_PERMS, b"/p\0x3\0") == "EINVAL"
    assert dom0.error(Op.SET_PERMS, b"/p\0") == "EINVAL"
    assert dom0.ok(Op.GET_PERMS, b"@introduceDomain\0") == b"n0\0"
    assert dom0.error(Op.READ, b"@introduceDomain\0") == "EINVAL"


def test_rm(dom0):
    dom0.ok(Op.WRITE, b"/r/a/b\0x")
    assert dom0.ok(Op.RM, b"/r/a\0") == b"OK\0"
    assert dom0.error(Op.READ, b"/r/a/b\0") == "ENOENT"
    assert dom0.ok(Op.RM, b"/r/gone\0") == b"OK\0"          # parent exists: fine
    assert dom0.error(Op.RM, b"/r/gone/deeper\0") == "ENOENT"
    assert dom0.error(Op.RM, b"/\0") == "EINVAL"


def test_bad_paths_are_einval(dom0):
    for path in (b"/a//b", b"/a/", b"/a b", b"/a\xff", b"", b"/" + b"x" * 3072):
        assert dom0.error(Op.READ, path + b"\0") == "EINVAL", path


def test_unknown_and_reply_only_ops_are_enosys(dom0):
    for op in (20, 23, 1000, Op.WATCH_EVENT, Op.ERROR, Op.INVALID):
        assert dom0.error(op, b"x\0") == "ENOSYS"
    assert dom0.ok(Op.READ, b"/tool\0") == b""    # and the connection carries on


def test_domain_ops(xenstored, dom0):
    assert dom0.ok(Op.GET_DOMAIN_PATH, b"7\0") == b"/local/domain/7\0"
    assert dom0.ok(Op.IS_DOMAIN_INTRODUCED, b"7\0") == b"F\0"
    assert dom0.ok(Op.IS_DOMAIN_INTRODUCED, b"0\0") == b"T\0"
    dom0.ok(Op.WATCH, b"@introduceDomain\0in\0")
    dom0.ok(Op.WATCH, b"@releaseDomain\0out\0")
    assert dom0.next_event() == b"@introduceDomain\0in\0"      # initial fire
    assert dom0.next_event() == b"@releaseDomain\0out\0"
    assert dom0.error(Op.INTRODUCE, b"7\0" + b"0\0" + b"0\0") == "EINVAL"  # port 0
    assert dom0.ok(Op.INTRODUCE, b"7\0" + b"1234\0" + b"3\0") == b"OK\0"
    assert dom0.next_event() == b"@introduceDomain\0in\0"
    assert os.path.exists(domain_socket_path(xenstored, 7))
    assert dom0.ok(Op.IS_DOMAIN_INTRODUCED, b"7\0") == b"T\0"
    assert dom0.ok(Op.RELEASE, b"7\0") == b"OK\0"
    assert dom0.next_event() == b"@releaseDomain\0out\0"
    assert not os.path.exists(domain_socket_path(xenstored, 7))
    assert dom0.error(Op.RELEASE, b"7\0") == "ENOENT"
    assert dom0.error(Op.RELEASE, b"0\0") == "EINVAL"


def test_guest_is_unprivileged(xenstored, dom0):
    dom0.ok(Op.WRITE, b"/secret/key\0x")
    dom0.ok(Op.WRITE, b"/public\0p")
    dom0.ok(Op.SET_PERMS, b"/public\0n0\0r5\0")
    with guest(dom0, xenstored, 5) as g:
        assert g.error(Op.READ, b"/secret/key\0") == "EACCES"
        assert g.error(Op.READ, b"/secret/none\0") == "EACCES"   # no existence leak
        assert g.error(Op.DIRECTORY, b"/\0") == "EACCES"
        assert g.error(Op.WRITE, b"/secret/new\0v") == "EACCES"
        assert g.error(Op.WRITE, b"/newtop\0v") == "EACCES"
        assert g.ok(Op.READ, b"/public\0") == b"p"
        assert g.error(Op.READ, b"/public/none\0") == "ENOENT"   # readable parent
        assert g.error(Op.WRITE, b"/public\0v") == "EACCES"
        assert g.error(Op.SET_PERMS, b"/public\0n5\0") == "EACCES"
        # Relative paths are under the domain's home; it owns what it creates.
        assert g.ok(Op.WRITE, b"data/x\0 1") == b"OK\0"
        assert dom0.ok(Op.READ, b"/local/domain/5/data/x\0") == b" 1"
        assert dom0.ok(Op.GET_PERMS, b"/local/domain/5/data/x\0") == b"n5\0"
        assert g.ok(Op.SET_PERMS, b"data/x\0n5\0r0\0") == b"OK\0"
        assert g.error(Op.SET_PERMS, b"data/x\0n6\0") == "EPERM"  # owner stays
        for op in (Op.INTRODUCE, Op.RELEASE, Op.IS_DOMAIN_INTRODUCED, Op.CONTROL,
                   Op.SET_TARGET, Op.RESUME):
            assert g.error(op, b"5\0" + b"1\0" + b"1\0") == "EACCES", op
        assert g.ok(Op.GET_DOMAIN_PATH, b"5\0") == b"/local/domain/5\0"
        # Special watches: registration fires, later events need permission.
        g.ok(Op.WATCH, b"@introduceDomain\0i\0")
        assert g.next_event() == b"@introduceDomain\0i\0"
        dom0.ok(Op.INTRODUCE, b"6\0" + b"0\0" + b"1\0")
        g.ok(Op.WATCH, b"data\0rel\0")
        assert g.next_event() == b"data\0rel\0"      # relative watch, relative path


def test_watch_fires_on_registration_then_every_change(dom0):
    assert dom0.ok(Op.WATCH, b"/w\0t1\0") == b"OK\0"
    assert dom0.next_event() == b"/w\0t1\0"
    assert dom0.error(Op.WATCH, b"/w\0t1\0") == "EEXIST"
    dom0.ok(Op.WRITE, b"/w/a/b\0x")
    dom0.ok(Op.WRITE, b"/w\0y")
    dom0.ok(Op.WRITE, b"/other\0z")                 # not below: no event
    dom0.ok(Op.MKDIR, b"/w/a\0")                    # exists: no change
    dom0.ok(Op.SET_PERMS, b"/w/a\0n0\0r1\0")
    dom0.ok(Op.RM, b"/w/a\0")
    events = [dom0.next_event() for _ in range(4)]
    # The rm fires /w/a for watchers at or above it; its removed child
    # /w/a/b fires only for watches on exactly /w/a/b (xenstored's rule).
    assert events == [b"/w/a/b\0t1\0", b"/w\0t1\0", b"/w/a\0t1\0",
                      b"/w/a\0t1\0"]
    dom0.ok(Op.READ, b"/tool\0")
    assert dom0.events == []                        # and nothing more


def test_watch_below_a_removed_node_fires(dom0):
    dom0.ok(Op.WRITE, b"/x/y/z\0v")
    dom0.ok(Op.WATCH, b"/x/y/z\0deep\0")
    dom0.ok(Op.WATCH, b"/x\0top\0")
    assert dom0.next_event() == b"/x/y/z\0deep\0"
    assert dom0.next_event() == b"/x\0top\0"
    dom0.ok(Op.RM, b"/x/y\0")
    # xenstored: children first, each exactly; the removed node to ancestors.
    assert [dom0.next_event(), dom0.next_event()] == [b"/x/y/z\0deep\0",
                                                      b"/x/y\0top\0"]
    assert dom0.ok(Op.UNWATCH, b"/x\0top\0") == b"OK\0"
    assert dom0.error(Op.UNWATCH, b"/x\0top\0") == "ENOENT"
    dom0.ok(Op.WRITE, b"/x/again\0v")
    dom0.ok(Op.WRITE, b"/x/y/z\0v")
    assert dom0.next_event() == b"/x/y/z\0deep\0"


def test_transactions(xenstored, dom0):
    tx = int(dom0.ok(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
    assert tx > 0
    assert dom0.error(Op.TRANSACTION_START, b"\0", tx_id=tx) == "EBUSY"
    dom0.ok(Op.WRITE, b"/t/a\0in-tx", tx_id=tx)
    assert dom0.ok(Op.READ, b"/t/a\0", tx_id=tx) == b"in-tx"
    assert dom0.error(Op.READ, b"/t/a\0") == "ENOENT"          # isolated
    assert dom0.ok(Op.TRANSACTION_END, b"T\0", tx_id=tx) == b"OK\0"
    assert dom0.ok(Op.READ, b"/t/a\0") == b"in-tx"
    assert dom0.error(Op.READ, b"/t/a\0", tx_id=tx) == "ENOENT"  # tx is gone
    assert dom0.error(Op.TRANSACTION_END, b"T\0") == "ENOENT"
    # Conflict: another connection changes what we read.
    with RawClient(xenstored) as other:
        tx = int(dom0.ok(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
        assert dom0.ok(Op.READ, b"/t/a\0", tx_id=tx) == b"in-tx"
        other.ok(Op.WRITE, b"/t/a\0changed")
        assert dom0.ok(Op.READ, b"/t/a\0", tx_id=tx) == b"in-tx"   # snapshot
        dom0.ok(Op.WRITE, b"/t/b\0x", tx_id=tx)
        assert dom0.error(Op.TRANSACTION_END, b"T\0", tx_id=tx) == "EAGAIN"
        assert dom0.error(Op.READ, b"/t/b\0") == "ENOENT"
        # Unrelated concurrent writes do not conflict; abort discards.
        tx = int(dom0.ok(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
        dom0.ok(Op.WRITE, b"/t/a/c\0x", tx_id=tx)
        other.ok(Op.WRITE, b"/elsewhere\0y")
        assert dom0.ok(Op.TRANSACTION_END, b"T\0", tx_id=tx) == b"OK\0"
        tx = int(dom0.ok(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
        dom0.ok(Op.WRITE, b"/t/d\0x", tx_id=tx)
        assert dom0.error(Op.TRANSACTION_END, b"X\0", tx_id=tx) == "EINVAL"
        assert dom0.ok(Op.TRANSACTION_END, b"F\0", tx_id=tx) == b"OK\0"
        assert dom0.error(Op.READ, b"/t/d\0") == "ENOENT"


def test_transaction_commit_fires_watches_then(xenstored, dom0):
    with RawClient(xenstored) as watcher:
        watcher.ok(Op.WATCH, b"/c\0w\0")
        assert watcher.next_event() == b"/c\0w\0"
        tx = int(dom0.ok(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
        dom0.ok(Op.WRITE, b"/c/1\0x", tx_id=tx)
        dom0.ok(Op.WRITE, b"/c/2\0x", tx_id=tx)
        watcher.ok(Op.READ, b"/tool\0")
        assert watcher.events == []                   # nothing before commit
        dom0.ok(Op.TRANSACTION_END, b"T\0", tx_id=tx)
        assert [watcher.next_event(), watcher.next_event()] == [b"/c/1\0w\0",
                                                               b"/c/2\0w\0"]


def test_reset_watches(dom0):
    dom0.ok(Op.WATCH, b"/r\0t\0")
    dom0.next_event()
    tx = int(dom0.ok(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
    assert dom0.ok(Op.RESET_WATCHES, b"") == b"OK\0"
    assert dom0.error(Op.READ, b"/tool\0", tx_id=tx) == "ENOENT"
    assert dom0.error(Op.UNWATCH, b"/r\0t\0") == "ENOENT"


def test_guest_quotas(xenstored, tmp_path):
    path = str(tmp_path / "q.sock")
    proc = start_server(path, "--quota", "nodes=5", "--quota", "watches=2",
                        "--quota", "transactions=1", "--quota", "node_size=100")
    try:
        with RawClient(path) as dom0, guest(dom0, path, 3) as g:
            for i in range(4):                        # owns its home: 1 + 4
                g.ok(Op.WRITE, b"n%d\0" % i)
            assert g.error(Op.WRITE, b"n9\0") == "ENOSPC"
            assert g.error(Op.WRITE, b"n0\0" + b"x" * 101) == "ENOSPC"
            g.ok(Op.WATCH, b"a\0t\0")
            g.ok(Op.WATCH, b"b\0t\0")
            assert g.error(Op.WATCH, b"c\0t\0") == "E2BIG"
            g.ok(Op.TRANSACTION_START, b"\0")
            assert g.error(Op.TRANSACTION_START, b"\0") == "ENOSPC"
            assert g.error(Op.READ, b"/local/domain/3/" + b"a" * 2049 + b"\0") == "EINVAL"
            for i in range(10):                       # dom0 has no quota
                dom0.ok(Op.WRITE, b"/d0/%d\0" % i + b"x" * 200)
    finally:
        assert stop_server(proc)[0] == 0


def test_oversize_packet_drops_only_that_client(xenstored, dom0):
    with RawClient(xenstored) as bad:
        bad.send_raw(Packet(Op.READ, 1, 0, b"").encode()[:12]
                     + (XENSTORE_PAYLOAD_MAX + 1).to_bytes(4, "little"))
        with pytest.raises((EOFError, ConnectionResetError)):
            bad.recv_packet()
    assert dom0.ok(Op.READ, b"/tool\0") == b""


def test_reply_too_big_is_e2big(dom0):
    dom0.ok(Op.WRITE, b"/v\0" + b"x" * (XENSTORE_PAYLOAD_MAX - 3))
    assert len(dom0.ok(Op.READ, b"/v\0")) == XENSTORE_PAYLOAD_MAX - 3


def test_admit_is_a_token_bucket_per_guest_domain():
    from xenstore.daemon import Xenstored
    from xenstore.store import DEFAULT_QUOTAS

    d = Xenstored(dict(DEFAULT_QUOTAS, rate=10, burst=3))
    d.introduce(4)
    d.introduce(5)
    g, other, priv = d.connect(4), d.connect(5), d.connect(0)
    assert [d.admit(g, 100.0) for _ in range(3)] == [0.0] * 3   # the burst
    assert d.admit(g, 100.0) == pytest.approx(0.1)              # then 10 a second
    assert d.admit(g, 100.05) == pytest.approx(0.05)
    assert d.admit(g, 100.11) == 0.0 and d.admit(g, 100.11) > 0
    assert d.admit(other, 100.11) == 0.0                        # its own bucket
    assert all(d.admit(priv, 100.1) == 0.0 for _ in range(50))  # dom0: no limit
    assert d.admit(g, 200.0) == 0.0 and d.domains[4].tokens == 2  # refilled to the burst
    unlimited = Xenstored(dict(DEFAULT_QUOTAS, rate=0))
    unlimited.introduce(4)
    c = unlimited.connect(4)
    assert all(unlimited.admit(c, 1.0) == 0.0 for _ in range(5000))


def test_a_guest_over_its_rate_waits_and_slows_no_one_else(tmp_path):
    """Real sockets: a guest pipelines 150 requests at rate 50/s after a burst
    of 25; all are answered, in order, over about 2.5 s, while dom0 and
    another guest are answered at once."""
    import time

    path = str(tmp_path / "r.sock")
    proc = start_server(path, "--quota", "rate=50", "--quota", "burst=25")
    try:
        with RawClient(path) as dom0, guest(dom0, path, 3) as flood, \
                guest(dom0, path, 4) as calm:
            started = time.monotonic()
            flood.send_raw(b"".join(Packet(Op.READ, i, 0, b"/local/domain/3\0").encode()
                                    for i in range(150)))
            slowest = 0.0
            while time.monotonic() - started < 1.5:  # the flood is held back meanwhile
                t = time.monotonic()
                dom0.ok(Op.READ, b"/local/domain/3\0")
                calm.ok(Op.READ, b"/local/domain/4\0")
                slowest = max(slowest, time.monotonic() - t)
            assert slowest < 0.5
            replies = [flood.recv_packet() for _ in range(150)]
            took = time.monotonic() - started
            assert [r.req_id for r in replies] == list(range(150))
            assert all(r.type == Op.READ for r in replies)
            assert took > (150 - 25) / 50 * 0.8, took
    finally:
        assert stop_server(proc)[0] == 0


def test_a_held_back_guest_is_let_go_a_few_requests_a_turn(tmp_path):
    """Over its rate, a guest's requests go a few at a time (a turn of the
    daemon's loop per 50 ms, not per request): at 50/s, after its burst of
    25, its replies come in groups of two or three, not one every 20 ms; the
    rate still holds."""
    import time

    path = str(tmp_path / "r.sock")
    proc = start_server(path, "--quota", "rate=50", "--quota", "burst=25")
    try:
        with RawClient(path) as dom0, guest(dom0, path, 3) as flood:
            flood.send_raw(b"".join(Packet(Op.READ, i, 0, b"/local/domain/3\0").encode()
                                    for i in range(100)))
            times = []
            for i in range(100):
                assert flood.recv_packet().req_id == i
                times.append(time.monotonic())
            groups = sum(1 for a, b in zip(times, times[1:]) if b - a > 0.01)
            assert groups <= 50, groups  # about 30; one per request made 75
            assert times[-1] - times[0] > 75 / 50 * 0.8
    finally:
        assert stop_server(proc)[0] == 0


_SEGMENT = st.sampled_from(["a", "b", "ab"])
_PATH = st.one_of(st.just("/"), st.sampled_from(["@introduceDomain", "@releaseDomain"]),
                  st.lists(_SEGMENT, min_size=1, max_size=4).map(lambda p: "/" + "/".join(p)))


@settings(max_examples=300, deadline=None)
@given(watches=st.lists(st.tuples(st.integers(0, 3), _PATH), max_size=12),
       change=_PATH, exact=st.booleans())
def test_fire_finds_the_watches_a_scan_of_every_watch_finds(watches, change, exact):
    """``fire`` looks watches up by path (a write costs the same with 130
    watching connections as with one); it must find exactly the watches,
    in exactly the order, that checking every watch with ``Watch.matches``
    in connection order finds.  Connections come and go in between."""
    d = Xenstored()
    conns = [d.connect(0) for _ in range(4)]
    ch = Change(change, exact, ())
    for i, (who, path) in enumerate(watches):
        conns[who].add_watch(Watch(path, b"t%d" % i, 0))
        d._watchers(ch)  # the index as it stands, to be kept up to date
    if watches:
        conns[watches[0][0]].remove_watch(0)
        d._watchers(ch)
    d.disconnect(conns[1])
    conns[1] = d.connect(0)  # a later id, so connection order is not list order
    conns[1].add_watch(Watch(change, b"new", 0))
    scan = [(conn, watch) for conn in d.connections.values() for watch in conn.watches
            if watch.matches(ch)]
    assert [(conn, watch) for _, _, conn, watch in d._watchers(ch)] == scan
