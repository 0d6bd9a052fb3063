"""The sim platform across real processes: one process per domain.

The test process plays one domain, a forked child the other; they meet
through a real sim hypervisor and share real memory.  Each test checks what
the other side sees, not what we wrote.
"""
import asyncio
import faulthandler
import multiprocessing
import os
import selectors
import signal
import subprocess
import sys
import time

import pytest

from blkif.abi import ffi
from blkif.abi.constants import (
    GNTST_bad_domain,
    GNTST_bad_gntref,
    GNTST_general_error,
    GNTST_okay,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_writing,
    PAGE_SIZE,
)
from blkif.errors import BlkifError, LocalProtocolError
from blkif.platform import (
    CopyOp,
    EventChannelError,
    GrantError,
    GrantRef,
    Local,
    PlatformUnavailable,
    open_platform,
)
from blkif.platform.sim import SimHypervisor

FORK = multiprocessing.get_context("fork")
FRONTEND, BACKEND = 1, 0


def _fds(pid="self"):
    return sorted(os.listdir("/proc/%s/fd" % pid))


def _our_shm():
    # The sim keeps memory in memfds, never in /dev/shm; other jobs on this
    # machine may use /dev/shm meanwhile, so look only for names of ours.
    return [name for name in os.listdir("/dev/shm") if "blkif" in name]


@pytest.fixture
def hv():
    assert _our_shm() == []
    with SimHypervisor() as hypervisor:
        # stdio, epoll, listener, the wake-up socketpair, the owner's pipe;
        # the start-up pipe is closed right after saying ready.
        assert _until(lambda: len(_fds(hypervisor.pid)) == 8)
        hypervisor.baseline_fds = _fds(hypervisor.pid)
        yield hypervisor
    assert _our_shm() == []
    assert not os.path.exists(hypervisor.path)


def _assert_hypervisor_released_everything(hv):
    """The hypervisor holds exactly the fds it had before any domain came."""
    if not _until(lambda: _fds(hv.pid) == hv.baseline_fds):
        listing = os.popen("ls -l /proc/%d/fd" % hv.pid).read()
        raise AssertionError("hypervisor fds %s, baseline %s\n%s"
                             % (_fds(hv.pid), hv.baseline_fds, listing))


def _until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


class Peer:
    """A forked child running ``body(platform, conn)`` as domain ``domid``."""

    def __init__(self, hv, domid, body, *args):
        self.conn, child = FORK.Pipe()
        self.proc = FORK.Process(target=self._run, args=(hv.path, domid, body, child, args))
        self.proc.start()
        child.close()

    @staticmethod
    def _run(path, domid, body, conn, args):
        try:
            with open_platform("sim", domid=domid, path=path) as platform:
                body(platform, conn, *args)
        except BaseException as exc:  # report, so the test fails with the cause
            conn.send(("error", repr(exc)))
            raise

    def recv(self, timeout=10):
        assert self.conn.poll(timeout), "peer said nothing"
        message = self.conn.recv()
        if isinstance(message, tuple) and message and message[0] == "error":
            raise AssertionError("peer failed: %s" % message[1])
        return message

    def send(self, message):
        self.conn.send(message)

    def join(self):
        self.proc.join(10)
        assert self.proc.exitcode == 0
        self.close()

    def kill(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)
        self.close()

    def close(self):
        self.conn.close()
        self.proc.close()


# -- grant, map, write through the mapping, see it on the other side ---------

def _backend_maps(platform, conn):
    domid, refs = conn.recv()
    with platform.map_grants(domid, refs) as mapping:
        conn.send(bytes(mapping.buffer[0:5]))
        mapping.buffer[PAGE_SIZE:PAGE_SIZE + 5] = b"world"
        conn.send("written")
        conn.recv()  # hold the mapping until told
    conn.send("unmapped")


def test_grant_map_and_write_both_ways(hv):
    with open_platform("sim", domid=FRONTEND, path=hv.path) as fe:
        pages = fe.grant_pages(BACKEND, 2)
        assert len(pages.buffer) == 2 * PAGE_SIZE and bytes(pages.buffer) == bytes(2 * PAGE_SIZE)
        assert pages.flags(0) == GTF_permit_access
        pages.buffer[0:5] = b"hello"
        peer = Peer(hv, BACKEND, _backend_maps)
        peer.send((FRONTEND, pages.refs))
        assert peer.recv() == b"hello"
        assert peer.recv() == "written"
        assert bytes(pages.page(1)[0:5]) == b"world"  # zero-copy: the same memory
        assert pages.flags(0) == GTF_permit_access | GTF_reading | GTF_writing
        pages.buffer[1:5] = b"ELLO"  # and our later writes reach the live mapping
        peer.send("unmap")
        assert peer.recv() == "unmapped"
        peer.join()
        assert pages.flags(0) == pages.flags(1) == GTF_permit_access
        assert pages.end_access() is True
        assert pages.flags(0) == 0
        pages.close()


# -- read-only grants ---------------------------------------------------------

def _backend_readonly(platform, conn):
    domid, refs = conn.recv()
    try:
        platform.map_grants(domid, refs, writable=True)
        conn.send(("mapped writable", None))
    except GrantError as exc:
        conn.send(("refused", exc.status))
    mapping = platform.map_grants(domid, refs, writable=False)
    conn.send((mapping.buffer.readonly, bytes(mapping.buffer[0:3])))
    try:
        mapping.buffer[0] = 1
        conn.send("wrote")
    except TypeError:
        conn.send("refused")
    conn.recv()
    # A write below Python's checks: the page is PROT_READ, so this faults.
    faulthandler.disable()  # the fault is expected: no traceback dump
    pointer = ffi.cast("char *", ffi.from_buffer(mapping.buffer))
    pointer[0] = b"A"
    conn.send("no fault")


def test_readonly_grant_maps_read_only_and_writes_fault(hv):
    with open_platform("sim", domid=FRONTEND, path=hv.path) as fe:
        pages = fe.grant_pages(BACKEND, 1, readonly=True)
        assert pages.flags(0) == GTF_permit_access | GTF_readonly
        pages.buffer[0:3] = b"abc"
        peer = Peer(hv, BACKEND, _backend_readonly)
        peer.send((FRONTEND, pages.refs))
        assert peer.recv() == ("refused", GNTST_general_error)
        assert peer.recv() == (True, b"abc")
        assert peer.recv() == "refused"
        assert pages.flags(0) == GTF_permit_access | GTF_readonly | GTF_reading
        peer.send("now fault")
        peer.proc.join(10)
        assert peer.proc.exitcode == -signal.SIGSEGV
        peer.close()
        assert bytes(pages.buffer[0:3]) == b"abc"
        assert _until(lambda: pages.flags(0) == GTF_permit_access | GTF_readonly)


# -- refusals with Xen's statuses ---------------------------------------------

def test_map_refusals_carry_xen_statuses(hv):
    with open_platform("sim", domid=FRONTEND, path=hv.path) as fe, \
            open_platform("sim", domid=BACKEND, path=hv.path) as be, \
            open_platform("sim", domid=2, path=hv.path) as other:
        pages = fe.grant_pages(BACKEND, 2)
        cases = [
            (FRONTEND, [10 ** 6], GNTST_bad_gntref),  # past the table
            (FRONTEND, [pages.refs[0] + 100], GNTST_general_error),  # never granted
            (FRONTEND, [0], GNTST_general_error),  # reserved entry
            (77, [pages.refs[0]], GNTST_bad_domain),  # no such domain
        ]
        for domid, refs, status in cases:
            with pytest.raises(GrantError) as info:
                be.map_grants(domid, refs)
            assert info.value.status == status, (domid, refs)
            assert isinstance(info.value, BlkifError)
        with pytest.raises(GrantError) as info:  # granted to domain 0, not 2
            other.map_grants(FRONTEND, pages.refs)
        assert info.value.status == GNTST_general_error
        # A failing ref leaves nothing mapped: the good one is not pinned.
        with pytest.raises(GrantError):
            be.map_grants(FRONTEND, [pages.refs[0], 10 ** 6])
        assert pages.flags(0) == GTF_permit_access
        # Revoked: cannot be mapped any more.
        assert pages.end_access() is True
        with pytest.raises(GrantError) as info:
            be.map_grants(FRONTEND, pages.refs)
        assert info.value.status == GNTST_general_error


def test_end_access_while_mapped_is_deferred_until_unmap(hv):
    with open_platform("sim", domid=FRONTEND, path=hv.path) as fe, \
            open_platform("sim", domid=BACKEND, path=hv.path) as be:
        pages = fe.grant_pages(BACKEND, 1)
        pages.buffer[0:4] = b"data"
        mapping = be.map_grants(FRONTEND, pages.refs)
        assert pages.end_access() is False
        pages.close()  # our view goes; the backend's mapping stays valid
        assert bytes(mapping.buffer[0:4]) == b"data"
        view = mapping.buffer[0:4]
        with pytest.raises(LocalProtocolError):
            mapping.unmap()  # a view is still exported
        view.release()
        mapping.unmap()
        with pytest.raises(GrantError) as info:
            be.map_grants(FRONTEND, pages.refs)
        assert info.value.status == GNTST_general_error
        again = fe.grant_pages(BACKEND, 1)  # memory comes back zeroed
        assert bytes(again.buffer) == bytes(PAGE_SIZE)


def test_a_domain_can_map_its_own_grants(hv):
    # As gntalloc to domain 0 then gntdev in dom0: a frontend and a backend
    # both in domain 0, here even in one process.
    with open_platform("sim", domid=0, path=hv.path) as dom0:
        pages = dom0.grant_pages(0, 1)
        with dom0.map_grants(0, pages.refs) as mapping:
            mapping.buffer[0:4] = b"self"
            assert bytes(pages.buffer[0:4]) == b"self"
        port = dom0.evtchn_alloc_unbound(0)
        other = dom0.evtchn_bind_interdomain(0, port.port)
        other.notify()
        assert port.wait(timeout=1) is True


# -- grant copy -----------------------------------------------------------------

def test_grant_copy(hv):
    with open_platform("sim", domid=FRONTEND, path=hv.path) as fe, \
            open_platform("sim", domid=BACKEND, path=hv.path) as be:
        rw = fe.grant_pages(BACKEND, 1)
        ro = fe.grant_pages(BACKEND, 1, readonly=True)
        rw.buffer[100:106] = b"source"
        ro.buffer[0:2] = b"ro"
        local = bytearray(16)
        statuses = be.grant_copy([
            CopyOp(GrantRef(FRONTEND, rw.refs[0], 100), Local(local, 2), 6),
            CopyOp(Local(b"XYZ"), GrantRef(FRONTEND, rw.refs[0], PAGE_SIZE - 3), 3),
            CopyOp(GrantRef(FRONTEND, ro.refs[0], 0), GrantRef(FRONTEND, rw.refs[0], 0), 2),
            CopyOp(Local(b"no"), GrantRef(FRONTEND, ro.refs[0], 0), 2),
            CopyOp(GrantRef(FRONTEND, 10 ** 6, 0), Local(local), 1),
            CopyOp(GrantRef(55, rw.refs[0], 0), Local(local), 1),
        ])
        assert statuses == [GNTST_okay, GNTST_okay, GNTST_okay, GNTST_general_error,
                            GNTST_bad_gntref, GNTST_bad_domain]
        assert bytes(local[2:8]) == b"source"
        assert bytes(rw.buffer[PAGE_SIZE - 3:]) == b"XYZ"
        assert bytes(rw.buffer[0:2]) == b"ro" and bytes(ro.buffer[0:2]) == b"ro"
        assert rw.flags(0) == GTF_permit_access  # the copy's pins are gone
        with pytest.raises(LocalProtocolError):  # gntdev: EINVAL
            CopyOp(GrantRef(FRONTEND, rw.refs[0], PAGE_SIZE - 1), Local(local), 2)
        with pytest.raises(LocalProtocolError):
            CopyOp(Local(b"a"), Local(local), 1)


# -- event channels -------------------------------------------------------------

def _ping_pong(platform, conn, rounds):
    remote_domid, remote_port = conn.recv()
    port = platform.evtchn_bind_interdomain(remote_domid, remote_port)
    conn.send(port.port)
    for _ in range(rounds):
        if not port.wait(timeout=5):
            conn.send("lost")
            return
        port.notify()
    conn.send("spurious" if port.wait(timeout=0.2) else "done")
    conn.recv()


def test_ten_thousand_event_round_trips(hv):
    rounds = 10000
    with open_platform("sim", domid=FRONTEND, path=hv.path) as fe:
        port = fe.evtchn_alloc_unbound(BACKEND)
        peer = Peer(hv, BACKEND, _ping_pong, rounds)
        peer.send((FRONTEND, port.port))
        assert peer.recv() >= 1
        start = time.perf_counter()
        for i in range(rounds):
            port.notify()
            assert port.wait(timeout=5), "lost event at round %d" % i
        elapsed = time.perf_counter() - start
        assert peer.recv() == "done"
        assert port.wait(timeout=0.2) is False  # nothing spurious here either
        peer.send("bye")
        peer.join()
        print("sim event round trip: %.1f us" % (elapsed / rounds * 1e6))


def test_ports_poll_coalesce_and_a_closed_peer_leaves_the_port_unbound(hv):
    with open_platform("sim", domid=FRONTEND, path=hv.path) as fe, \
            open_platform("sim", domid=BACKEND, path=hv.path) as be:
        a = fe.evtchn_alloc_unbound(BACKEND)
        a.notify()  # unbound: dropped, as Xen drops it
        b = be.evtchn_bind_interdomain(FRONTEND, a.port)
        assert b.wait(timeout=0.05) is False
        sel = selectors.DefaultSelector()
        sel.register(b, selectors.EVENT_READ)
        assert sel.select(timeout=0) == []
        for _ in range(3):
            a.notify()
        assert [key.fileobj for key, _ in sel.select(timeout=1)] == [b]
        assert b.clear() is True and b.clear() is False  # three notifies, one event
        assert sel.select(timeout=0) == []
        with pytest.raises(EventChannelError) as info:  # already bound
            be.evtchn_bind_interdomain(FRONTEND, a.port)
        assert info.value.errno == 22
        with pytest.raises(EventChannelError) as info:
            be.evtchn_bind_interdomain(99, 1)
        assert info.value.errno == 3  # ESRCH
        c = fe.evtchn_alloc_unbound(2)  # offered to domain 2, not 0
        with pytest.raises(EventChannelError):
            be.evtchn_bind_interdomain(FRONTEND, c.port)
        a.notify()
        a.close()
        assert b.wait(timeout=1) is True  # the event sent before closing arrives
        b.notify()  # to an unbound port: dropped, as Xen drops it
        assert b.wait(timeout=0.05) is False
        with open_platform("sim", domid=2, path=hv.path) as stranger:
            with pytest.raises(EventChannelError):  # offered to the closer's domain only
                stranger.evtchn_bind_interdomain(BACKEND, b.port)
        a2 = fe.evtchn_bind_interdomain(BACKEND, b.port)  # Xen: EVTCHNSTAT_unbound again
        assert a2.wait(timeout=0.05) is False  # what b sent while unbound is gone
        a2.notify()
        assert b.wait(timeout=1) is True
        b.notify()
        assert a2.wait(timeout=1) is True
        sel.close()


def test_ports_work_with_asyncio(hv):
    async def main(a, b):
        loop = asyncio.get_running_loop()
        arrived = loop.create_future()

        def on_readable():
            if b.clear() and not arrived.done():
                arrived.set_result(True)

        loop.add_reader(b.fileno(), on_readable)
        try:
            loop.call_later(0.01, a.notify)
            return await asyncio.wait_for(arrived, timeout=5)
        finally:
            loop.remove_reader(b.fileno())

    with open_platform("sim", domid=FRONTEND, path=hv.path) as fe, \
            open_platform("sim", domid=BACKEND, path=hv.path) as be:
        a = fe.evtchn_alloc_unbound(BACKEND)
        b = be.evtchn_bind_interdomain(FRONTEND, a.port)
        assert asyncio.run(main(a, b)) is True
        assert b.clear() is False


# -- a participant killed with SIGKILL ----------------------------------------------

def _doomed_backend(platform, conn):
    domid, refs, remote_port = conn.recv()
    port = platform.evtchn_bind_interdomain(domid, remote_port)
    mapping = platform.map_grants(domid, refs)
    mapping.set_unmap_notify(clear_byte=PAGE_SIZE + 7, port=port)
    conn.send("ready")
    time.sleep(60)


def test_sigkill_of_the_backend(hv):
    fds_before = _fds()
    with open_platform("sim", domid=FRONTEND, path=hv.path) as fe:
        pages = fe.grant_pages(BACKEND, 2)
        pages.buffer[PAGE_SIZE + 7] = 0xAA  # e.g. a "backend alive" byte
        port = fe.evtchn_alloc_unbound(BACKEND)
        peer = Peer(hv, BACKEND, _doomed_backend)
        peer.send((FRONTEND, pages.refs, port.port))
        assert peer.recv() == "ready"
        assert pages.flags(1) & GTF_writing
        peer.kill()
        assert port.wait(timeout=5) is True  # the unmap notify event
        assert pages.buffer[PAGE_SIZE + 7] == 0  # and its cleared byte
        port.notify()  # unbound now: dropped
        with open_platform("sim", domid=BACKEND, path=hv.path) as be:
            again = be.evtchn_bind_interdomain(FRONTEND, port.port)  # a successor binds it
            again.notify()
            assert port.wait(timeout=5) is True
            again.close()
        assert _until(lambda: pages.flags(0) == GTF_permit_access)
        assert pages.end_access() is True
        pages.close()
    assert _fds() == fds_before
    _assert_hypervisor_released_everything(hv)


def _doomed_frontend(platform, conn):
    pages = platform.grant_pages(BACKEND, 1)
    pages.buffer[0:6] = b"before"
    pages.buffer[100] = 0xAA  # e.g. a "frontend alive" byte
    port = platform.evtchn_alloc_unbound(BACKEND)
    pages.set_unmap_notify(clear_byte=100, port=port)  # gntalloc's, on our side
    conn.send((pages.refs, port.port))
    time.sleep(60)


def test_sigkill_of_the_frontend(hv):
    fds_before = _fds()
    with open_platform("sim", domid=BACKEND, path=hv.path) as be:
        peer = Peer(hv, FRONTEND, _doomed_frontend)
        refs, remote_port = peer.recv()
        port = be.evtchn_bind_interdomain(FRONTEND, remote_port)
        mapping = be.map_grants(FRONTEND, refs)
        assert mapping.buffer[100] == 0xAA
        peer.kill()
        assert port.wait(timeout=5) is True  # the frontend's unmap notify
        assert mapping.buffer[100] == 0
        port.notify()  # its port closed with it: ours is unbound, the event dropped
        assert port.wait(timeout=0.05) is False
        assert bytes(mapping.buffer[0:6]) == b"before"  # our mapping stays valid
        mapping.buffer[0:5] = b"after"
        with pytest.raises(GrantError) as info:  # the domain is gone
            be.map_grants(FRONTEND, refs)
        assert info.value.status == GNTST_bad_domain
        mapping.unmap()
        port.close()
    assert _fds() == fds_before
    _assert_hypervisor_released_everything(hv)


# -- the hypervisor's life ----------------------------------------------------------

def test_no_hypervisor_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("BLKIF_SIM", raising=False)
    with pytest.raises(PlatformUnavailable, match="BLKIF_SIM"):
        open_platform("sim", domid=1)
    with pytest.raises(PlatformUnavailable, match="no sim hypervisor"):
        open_platform("sim", domid=1, path=str(tmp_path))
    with pytest.raises(PlatformUnavailable, match="unknown platform"):
        open_platform("kvm")


def test_clients_see_a_dead_hypervisor(hv, monkeypatch):
    monkeypatch.setenv("BLKIF_SIM", hv.path)
    with open_platform("sim", domid=FRONTEND) as fe:
        pages = fe.grant_pages(BACKEND, 1)
        os.kill(hv.pid, signal.SIGKILL)
        hv.proc.wait(10)
        with pytest.raises(PlatformUnavailable, match="went away"):
            fe.grant_pages(BACKEND, 1)
        pages.buffer[0] = 1  # our own memory is still ours
        pages.close()


def test_start_and_stop_commands_clean_up(tmp_path):
    directory = str(tmp_path / "sim")
    run = [sys.executable, "-m", "blkif.platform.sim"]
    out = subprocess.run(run + ["start", directory], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    assert "BLKIF_SIM=%s" % directory in out
    with open_platform("sim", domid=3, path=directory) as p:
        assert p.domid == 3
        p.grant_pages(0, 1)
    second = subprocess.run(run + ["start", directory], capture_output=True, timeout=30)
    assert second.returncode != 0  # one hypervisor per directory
    assert b"did not start" in second.stderr
    with open_platform("sim", domid=3, path=directory):
        pass  # and the first one still serves
    pid = int(open(os.path.join(directory, "hypervisor.pid")).read())
    subprocess.run(run + ["stop", directory], check=True, timeout=30)
    assert os.listdir(directory) == []
    assert _until(lambda: not os.path.exists("/proc/%d" % pid) or
                  open("/proc/%d/stat" % pid).read().split(") ")[1][0] == "Z")
    # A SIGKILLed hypervisor leaves its socket; stop still cleans up.
    subprocess.run(run + ["start", directory], check=True, timeout=30, capture_output=True)
    pid = int(open(os.path.join(directory, "hypervisor.pid")).read())
    os.kill(pid, signal.SIGKILL)
    subprocess.run(run + ["stop", directory], timeout=30)
    assert os.listdir(directory) == []


@pytest.mark.parametrize("how", ["sim", "default"])
def test_map_grants_each_gives_a_mapping_per_ref(hv, how):
    """One call, a mapping per ref, each unmapped on its own; a bad ref
    leaves nothing mapped.  ``default``: the base class's one-by-one loop."""
    from blkif.platform.base import Platform
    with open_platform("sim", domid=FRONTEND, path=hv.path) as fe, \
            open_platform("sim", domid=BACKEND, path=hv.path) as be:
        each = be.map_grants_each if how == "sim" else (
            lambda *args: Platform.map_grants_each(be, *args))
        pages = fe.grant_pages(BACKEND, 4)
        for i in range(4):
            pages.buffer[i * PAGE_SIZE:i * PAGE_SIZE + 2] = b"p%d" % i
        mappings = each(FRONTEND, [pages.refs[2], pages.refs[0], pages.refs[3]])
        assert [bytes(m.buffer[:2]) for m in mappings] == [b"p2", b"p0", b"p3"]
        assert all(len(m.buffer) == PAGE_SIZE for m in mappings)
        mappings[0].buffer[2:4] = b"!!"
        assert bytes(pages.buffer[2 * PAGE_SIZE:2 * PAGE_SIZE + 4]) == b"p2!!"
        mappings[0].unmap()  # the others stay mapped
        assert pages.flags(2) == GTF_permit_access
        assert pages.flags(0) & GTF_writing and bytes(mappings[1].buffer[:2]) == b"p0"
        for mapping in mappings[1:]:
            mapping.unmap()
        assert pages.flags(0) == GTF_permit_access
        with pytest.raises(GrantError):
            each(FRONTEND, [pages.refs[1], 10 ** 6])
        assert pages.flags(1) == GTF_permit_access  # not left pinned


@pytest.mark.parametrize("how", ["sim", "default"])
def test_unmap_grants_each_lets_every_mapping_go(hv, how):
    """The sim unmaps a batch in one request to its hypervisor (the default:
    one by one); a batch naming a handle not ours unmaps none of it."""
    from blkif.platform.base import Platform
    with open_platform("sim", domid=FRONTEND, path=hv.path) as fe, \
            open_platform("sim", domid=BACKEND, path=hv.path) as be:
        unmap = be.unmap_grants_each if how == "sim" else (
            lambda *args: Platform.unmap_grants_each(be, *args))
        pages = fe.grant_pages(BACKEND, 4)
        mappings = be.map_grants_each(FRONTEND, pages.refs)
        assert all(pages.flags(i) & GTF_writing for i in range(4))
        sent, call = [], be._call
        be._call = lambda message: sent.append(message["op"]) or call(message)
        unmap(mappings[:3])
        assert sent == (["unmap"] if how == "sim" else ["unmap"] * 3)
        assert [pages.flags(i) for i in range(3)] == [GTF_permit_access] * 3
        assert pages.flags(3) & GTF_writing
        unmap(mappings)  # the ones already gone are left alone
        assert pages.flags(3) == GTF_permit_access
        kept = be.map_grants_each(FRONTEND, pages.refs[:1])[0]
        with pytest.raises(LocalProtocolError):
            call({"op": "unmap", "handles": [kept.handle, 10 ** 6]})
        assert pages.flags(0) & GTF_writing
        kept.unmap()
