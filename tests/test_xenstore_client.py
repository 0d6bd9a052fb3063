"""The pyxs-based client against the real daemon subprocess: the API, typed
reads, watches in order to every watcher, retrying transactions under
contention from several processes, XenbusState helpers, clean shutdown."""
import subprocess
import sys
import threading
import time

import pytest

from xenstore import (BadValue, Conflict, ConnectionLost, NoEntry, Perm,
                      PermissionDenied, TransactionConflict, UsageError,
                      WaitTimeout, WatchEvent, Xenstore, XenbusState,
                      domain_socket_path)
from xenstore_fixtures import ROOT, start_server, stop_server, xenstored  # noqa: F401


@pytest.fixture
def xs(xenstored):
    with Xenstore.open(xenstored, timeout=10) as client:
        yield client


def router_threads():
    return [t for t in threading.enumerate()
            if t.name.startswith(("xenstore-router", "xenstore-watch"))]


def test_basic_ops(xs):
    xs.write("/a/b", "text")
    xs.write("/a/n", 42)
    xs.write("/a/bin", b"\x00\xff\n")
    assert xs.read("/a/b") == b"text"
    assert xs.read("/a/bin") == b"\x00\xff\n"        # any bytes, as xenstored
    assert xs.list("/a") == ["b", "n", "bin"]
    assert xs.exists("/a/n") and not xs.exists("/a/zz")
    with pytest.raises(NoEntry) as info:
        xs.read("/a/zz")
    assert info.value.path == "/a/zz" and "/a/zz" in str(info.value)
    assert xs.read("/a/zz", None) is None
    xs.mkdir("/a/dir")
    assert xs.read("/a/dir") == b""
    xs.rm("/a")
    assert not xs.exists("/a")
    with pytest.raises(UsageError):
        xs.read("/bad//path")
    assert xs.domain_path(3) == "/local/domain/3"


def test_typed_reads_name_the_path(xs):
    xs.write("/t/int", "-17")
    xs.write("/t/flag", "1")
    xs.write("/t/junk", "12abc")
    assert xs.read_int("/t/int") == -17
    assert xs.read_bool("/t/flag") is True
    assert xs.read_str("/t/int") == "-17"
    assert xs.read_int("/t/none", default=7) == 7
    assert xs.read_bool("/t/none", default=False) is False
    assert xs.read_str("/t/none", default=None) is None
    with pytest.raises(BadValue, match="/t/junk"):
        xs.read_int("/t/junk")
    with pytest.raises(BadValue, match="/t/junk"):
        xs.read_bool("/t/junk")
    with pytest.raises(NoEntry, match="/t/none"):
        xs.read_int("/t/none")


def test_perms(xs):
    xs.write("/p", "")
    xs.set_perms("/p", [Perm("n", 0), "r5"])
    assert xs.get_perms("/p") == [Perm("n", 0), Perm("r", 5)]
    assert [str(p) for p in xs.get_perms("/p")] == ["n0", "r5"]
    with pytest.raises(UsageError):
        xs.set_perms("/p", ["q1"])


def test_guest_connects_as_its_domain(xs, xenstored):
    xs.write("/private", "x")
    xs.introduce_domain(9)
    assert xs.is_domain_introduced(9)
    xs.mkdir("/local/domain/9")
    xs.set_perms("/local/domain/9", ["n9"])
    with Xenstore.open(domain_socket_path(xenstored, 9)) as guest:
        guest.write("device/vbd/51712/state", str(int(XenbusState.Initialising)))
        assert xs.read_state("/local/domain/9/device/vbd/51712/state") == \
            XenbusState.Initialising
        with pytest.raises(PermissionDenied, match="/private"):
            guest.read("/private")
        with pytest.raises(PermissionDenied):
            guest.introduce_domain(10)
    xs.release_domain(9)
    assert not xs.is_domain_introduced(9)


def test_watch_iterator_and_every_watcher_in_order(xs, xenstored):
    with Xenstore.open(xenstored) as other:
        w1 = xs.watch("/w", token="one")
        w2 = other.watch("/w")
        assert w1.get(5) == WatchEvent("/w", "one")        # registration fires
        assert w2.get(5).path == "/w"
        changes = ["/w/%d" % i for i in range(20)]
        for path in changes:
            xs.write(path, "v")
        xs.rm("/w")
        expected = changes + ["/w"]
        assert [w1.get(5).path for _ in expected] == expected
        assert [e.path for _, e in zip(expected, w2)] == expected
        w1.close()
        w2.close()
        xs.write("/w/after", "x")
        with pytest.raises(UsageError):
            w1.get(0.1)


def test_watch_callback_and_special_watch(xs):
    got = []
    with xs.watch("@introduceDomain", callback=got.append):
        xs.introduce_domain(4)
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert [e.path for e in got] == ["@introduceDomain", "@introduceDomain"]
    assert not [t for t in router_threads() if t.name.startswith("xenstore-watch")]


def test_single_transaction_conflict_then_retrying(xs, xenstored):
    xs.write("/c", "0")
    with Xenstore.open(xenstored) as other:
        with pytest.raises(Conflict):
            with xs.transaction() as t:
                t.read("/c")
                other.write("/c", "5")
                t.write("/c", "1")
        assert xs.read("/c") == b"5"
        runs = []
        for t in xs.transactions():
            with t:
                runs.append(t.id)
                value = t.read_int("/c")
                if len(runs) == 1:
                    other.write("/c", "10")      # first attempt loses
                t.write("/c", value + 1)
        assert len(runs) == 2 and xs.read_int("/c") == 11
        with pytest.raises(TransactionConflict):
            for t in xs.transactions(attempts=3):
                with t:
                    t.read("/c")
                    other.write("/c", "0")
                    t.write("/c", "x")
        with pytest.raises(KeyError):              # other errors abort, propagate
            with xs.transaction() as t:
                t.write("/c", "never")
                raise KeyError
        assert xs.read("/c") == b"0"
        assert xs.transact(lambda t: t.read_int("/c") + 1) == 1


INCREMENTER = """
import sys
from xenstore import Xenstore
with Xenstore.open(sys.argv[1]) as xs:
    for _ in range(int(sys.argv[2])):
        xs.transact(lambda t: t.write("/counter", t.read_int("/counter") + 1),
                    attempts=10000)
"""


def test_transactions_under_contention_from_processes(xs, xenstored):
    xs.write("/counter", "0")
    workers, each = 4, 30
    procs = [subprocess.Popen([sys.executable, "-c", INCREMENTER, xenstored,
                               str(each)], cwd=ROOT) for _ in range(workers)]
    for proc in procs:
        assert proc.wait(timeout=60) == 0
    assert xs.read_int("/counter") == workers * each


def test_wait_for_state(xs):
    path = "/local/domain/0/backend/vbd/1/51712/state"
    with pytest.raises(WaitTimeout) as info:
        xs.wait_for_state(path, XenbusState.Connected, timeout=0.2)
    assert path in str(info.value) and info.value.last == "Unknown"
    xs.switch_state(path, XenbusState.InitWait)

    def peer():
        time.sleep(0.1)
        with Xenstore.open(xs.where) as other:
            for state in (XenbusState.Initialised, XenbusState.Connected):
                other.switch_state(path, state)
    thread = threading.Thread(target=peer)
    thread.start()
    got = xs.wait_for_state(path, {XenbusState.Connected, XenbusState.Closed},
                            timeout=10)
    thread.join()
    assert got is XenbusState.Connected
    assert xs.read(path) == b"4"


def test_close_is_clean_and_server_death_is_loud(tmp_path):
    before = set(router_threads())
    path = str(tmp_path / "s.sock")
    proc = start_server(path)
    xs = Xenstore.open(path)
    watch = xs.watch("/x")
    watch.get(5)
    assert stop_server(proc)[0] == 0
    with pytest.raises(ConnectionLost):
        watch.get(5)
    with pytest.raises(ConnectionLost):
        xs.read("/x")
    xs.close()
    xs.close()
    assert set(router_threads()) <= before
    with pytest.raises(ConnectionLost, match="cannot connect"):
        Xenstore.open(path)


def test_threads_end_with_the_client(xenstored):
    before = set(router_threads())
    with Xenstore.open(xenstored) as xs:
        xs.watch("/a", callback=lambda e: None)
        assert len(router_threads()) == len(before) + 2
    assert set(router_threads()) == before
