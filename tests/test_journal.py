"""Live restart at the engine: a backend process killed at random points
while a frontend keeps its ring full of verified writes, barriers, reads and
flushes.

Each backend is ``journal_backend.py``, the C engine or the Python ring
server with a journal (or the two taking turns: one format), or the NBD ring
server on an nbdkit export that outlives every backend (remote storage) or
on a qcow2 image through a qemu-storage-daemon that dies with each backend;
each successor resumes from what its predecessor left.  The frontend checks the
blkif contract throughout: every request is answered exactly once and OKAY,
a read returns the last write answered to its block, and at the end the
image holds exactly the writes answered.  ``BLKIF_KILLS`` sets the number
of kills (default 20; docs/reliability.md records a long run).  A failure
names its seed.
"""
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from helpers import require_tool, start_nbdkit
from blkif.abi import X86_64, constants as c, ffi
from blkif.backend.engine import engine_abi
from blkif.backend.journal import Journal, RingJournal
from blkif.platform import open_platform
from blkif.platform.sim import SimHypervisor
from blkif.request import RequestEncoder, ResponseWriter
from blkif.ring import BackRing, FrontRing

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCKS = 64  # 4 KiB blocks of the image in play
KILLS = int(os.environ.get("BLKIF_KILLS", "20"))
MAX_KILLS = 4 * KILLS  # when none of the first KILLS found anything in flight


class Backend:
    def __init__(self, hv, fe, image, journal, mode, engine, uri=None):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "journal_backend.py"), hv.path,
             ",".join(map(str, fe.ring_pages.refs)), str(fe.port.port), str(image),
             str(journal), mode, engine] + ([uri] if uri else []),
            stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line == "ready\n", "the backend did not start (%r)" % line

    def status(self):
        """Whether the backend still runs, or how it ended and what it said."""
        if self.proc.poll() is None:
            return "the last backend still runs"
        return "the last backend exited with status %d: %r" % (self.proc.returncode,
                                                               self.proc.stdout.read())

    def kill(self):
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()


class Frontend:
    """Domain 1's ring and pages, with a model of what the disk must hold."""

    def __init__(self, hv, seed):
        self.platform = open_platform("sim", domid=1, path=hv.path)
        self.ring_pages = self.platform.grant_pages(0, 1)
        self.ring = FrontRing(self.ring_pages.buffer, X86_64)
        self.enc = RequestEncoder(X86_64)
        self.data = self.platform.grant_pages(0, 32)  # a page per ring slot
        self.port = self.platform.evtchn_alloc_unbound(0)
        self.rng = random.Random(seed)
        self.model = {}  # block -> bytes of the last write answered
        self.inflight = {}  # id -> (op, block, bytes written or None)
        self.free_ids = list(range(32))
        self.answered = 0

    def submit(self):
        """Fill the ring with requests on blocks nobody else has in flight."""
        busy = {block for _, block, _ in self.inflight.values()}
        while self.free_ids and not self.ring.full():
            rid = self.free_ids.pop()
            choice = self.rng.random()
            if choice < 0.1:
                self.enc.rw(self.ring, c.BLKIF_OP_FLUSH_DISKCACHE, rid, 0, [])
                self.inflight[rid] = (c.BLKIF_OP_FLUSH_DISKCACHE, None, None)
                continue
            block = self.rng.choice([b for b in range(BLOCKS) if b not in busy])
            busy.add(block)
            page = (rid * 4096, rid * 4096 + 4096)
            segs = [(self.data.refs[rid], 0, 7)]
            if choice < 0.6:
                # A write, one in eight of them a barrier (all before it done first).
                op = c.BLKIF_OP_WRITE_BARRIER if choice < 0.16 else c.BLKIF_OP_WRITE
                payload = self.rng.randbytes(4096)
                self.data.buffer[page[0]:page[1]] = payload
                self.enc.rw(self.ring, op, rid, block * 8, segs)
                self.inflight[rid] = (op, block, payload)
            else:
                self.enc.rw(self.ring, c.BLKIF_OP_READ, rid, block * 8, segs)
                self.inflight[rid] = (c.BLKIF_OP_READ, block, None)
        if self.ring.push_requests():
            self.port.notify()

    def collect(self):
        """Check every response: an id in flight, OKAY, reads as the model says."""
        while True:
            while self.ring.pending_responses():
                rid, op, status = self.enc.take_response(self.ring)
                assert rid in self.inflight, "response for id %d not in flight" % rid
                want_op, block, payload = self.inflight.pop(rid)
                assert (op, status) == (want_op, c.BLKIF_RSP_OKAY), (rid, op, status)
                if op in (c.BLKIF_OP_WRITE, c.BLKIF_OP_WRITE_BARRIER):
                    self.model[block] = payload
                elif op == c.BLKIF_OP_READ:
                    got = bytes(self.data.buffer[rid * 4096:rid * 4096 + 4096])
                    assert got == self.model.get(block, bytes(4096)), "stale read of %d" % block
                self.free_ids.append(rid)
                self.answered += 1
            if not self.ring.final_check_for_responses():
                return

    def wait_answered(self, backend, timeout):
        """Collect until nothing is in flight; AssertionError after ``timeout``
        s naming what was never answered and how ``backend`` (the last) ended."""
        deadline = time.monotonic() + timeout
        while self.inflight and time.monotonic() < deadline:
            self.port.wait(0.01)
            self.collect()
        assert not self.inflight, "never answered: %s (%s)" % (sorted(self.inflight),
                                                             backend.status())

    def close(self):
        self.ring.release()
        for thing in (self.port, self.data, self.ring_pages, self.platform):
            thing.close()


def resume_until_answered(hv, fe, image, journal_path, engine, uri):
    """A successor on ``journal_path`` answers everything ``fe`` has in flight."""
    backend = Backend(hv, fe, image, journal_path, "resume", engine, uri)
    try:
        fe.wait_answered(backend, 10)
    finally:
        backend.kill()


def _left_in(journal_path):
    """Requests a killed backend had taken and not answered."""
    journal = Journal.open(journal_path)
    region = journal.region(0)
    cons = region.req_cons
    left = sum(1 for i in range(region.size) if region.entries[i].state == 1
               and region.entries[i].ring_index != cons)
    journal.close()
    return left


@pytest.fixture
def storage(tmp_path, request):
    """(image the backend opens, NBD URI or None, a function giving the raw
    disk at the end) for ``request.param``, the backend kind."""
    raw = tmp_path / "disk.img"
    raw.write_bytes(bytes(4096 * BLOCKS))
    if request.param == "nbd":
        require_tool("nbdkit")
        sock = tmp_path / "nbdkit.sock"
        # One thread per connection: nbdkit 1.32 can abort (connections.c,
        # raw_send_socket: "sock >= 0") when a client dies with writes in flight
        # and its threads race to reply on the closed socket.
        server = start_nbdkit(sock, "--threads=1", "file", str(raw))
        yield raw, "nbd+unix:///?socket=%s" % sock, raw.read_bytes
        server.terminate()
        server.wait()
        return
    if request.param == "qsd":
        require_tool("qemu-storage-daemon")
        qcow2 = tmp_path / "disk.qcow2"
        subprocess.run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(qcow2),
                        str(4096 * BLOCKS)], check=True)

        def contents():
            check = subprocess.run(["qemu-img", "check", str(qcow2)], capture_output=True,
                                   text=True)
            assert check.returncode == 0, check.stdout + check.stderr
            subprocess.run(["qemu-img", "convert", "-O", "raw", str(qcow2), str(raw)],
                           check=True)
            return raw.read_bytes()
        yield qcow2, None, contents
        return
    yield raw, None, raw.read_bytes


@pytest.mark.parametrize("engines,storage", [
    (("c",), "file"), (("python",), "file"), (("c", "python"), "file"),
    (("nbd",), "nbd"), (("qsd",), "qsd"), (("c-nbd",), "nbd"), (("c-qsd",), "qsd"),
    (("c-nbd", "nbd"), "nbd")],
    ids=["c", "python", "taking-turns", "nbd", "qsd-qcow2", "c-nbd", "c-qsd-qcow2",
         "nbd-taking-turns"], indirect=["storage"])
@pytest.mark.parametrize("seed", [int.from_bytes(os.urandom(4), "little")])
def test_a_backend_killed_at_random_points_loses_and_repeats_nothing(tmp_path, seed, engines,
                                                                      storage):
    image, uri, contents = storage
    journal = tmp_path / "journal"
    rng = random.Random(seed)
    carried = 0
    with SimHypervisor() as hv:
        fe = Frontend(hv, seed)
        backend = Backend(hv, fe, image, journal, "new", engines[0], uri)
        kills = 0
        try:
            while True:
                deadline = time.monotonic() + rng.uniform(0.0, 0.05)
                while time.monotonic() < deadline:
                    fe.submit()
                    fe.port.wait(0.002)
                    fe.collect()
                # A fast engine is often idle when killed: go on past KILLS
                # (up to MAX_KILLS) until some kill found requests in flight.
                if kills >= KILLS and (carried or kills >= MAX_KILLS):
                    break
                backend.kill()
                kills += 1
                carried += _left_in(journal)
                backend = Backend(hv, fe, image, journal, "resume",
                                  engines[kills % len(engines)], uri)
            fe.wait_answered(backend, 30)  # the last backend answers everything
        except AssertionError as exc:
            raise AssertionError("seed %d: %s" % (seed, exc)) from None
        finally:
            backend.kill()
        fe.close()
    disk = contents()
    for block, payload in fe.model.items():
        assert disk[block * 4096:(block + 1) * 4096] == payload, "seed %d: block %d" % (
            seed, block)
    print("seed %d: %d kills, %d requests answered, %d carried over by a successor"
          % (seed, kills, fe.answered, carried))
    assert fe.answered > kills and carried > 0, "seed %d: the kills hit nothing" % seed


def test_a_new_journal_carries_a_failed_flush_and_ends_with_it(tmp_path):
    """A file store's flush-failed flag moves into each new journal (shared
    with the engines and a successor) and back out at its end."""
    from types import SimpleNamespace

    from blkif.backend.vbd import Vbd
    store = SimpleNamespace(flush_failed=ffi.new("int *", 1))  # an earlier flush failed
    vbd = SimpleNamespace(storage=SimpleNamespace(is_nbd=False), store=store, journal=None)
    journal = Journal.create(str(tmp_path / "journal"), {"ring_bytes": [4096]})
    Vbd._use_journal(vbd, journal, new=True)
    assert journal.flush_failed[0] == 1 and store.flush_failed == journal.flush_failed
    assert Vbd._end_journal(vbd) is journal and store.flush_failed[0] == 1


@pytest.mark.parametrize("engine,storage", [("c", "file"), ("python", "file"), ("c-nbd", "nbd"),
                                            ("nbd", "nbd")],
                         ids=["c", "python", "c-nbd", "nbd"], indirect=["storage"])
def test_answers_a_predecessor_wrote_but_never_pushed_reach_the_frontend(tmp_path, engine,
                                                                          storage):
    """A predecessor killed after it answered a full ring, before it pushed
    rsp_prod: nothing is left to do and no event will come (the frontend
    waits with its ring full), so the successor must publish those answers
    by itself.  (The random kill test found this once in the Python route.)"""
    image, uri, _ = storage
    path = tmp_path / "journal"
    with SimHypervisor() as hv:
        fe = Frontend(hv, 0)
        journal = Journal.create(str(path), {"ring_bytes": [len(fe.ring_pages.buffer)]})
        kept = RingJournal(journal.region(0), fe.ring.size, engine_abi(X86_64))
        kept.start(0)
        back = BackRing(fe.ring_pages.buffer, X86_64)
        for rid in range(fe.ring.size):
            fe.enc.rw(fe.ring, c.BLKIF_OP_READ, rid, rid % BLOCKS * 8, [(fe.data.refs[rid], 0, 7)])
            fe.inflight[rid] = (c.BLKIF_OP_READ, rid % BLOCKS, None)
            fe.free_ids.remove(rid)
        fe.ring.push_requests()
        back.req_cons = fe.ring.size
        for rid in range(fe.ring.size):  # the predecessor: taken, answered, not pushed
            slot = c.SRING_HEADER_SIZE + rid * X86_64.slot_size
            kept.take(bytes(fe.ring_pages.buffer[slot:slot + X86_64.slot_size]), rid, rid)
            back.rsp_prod_pvt = rid
            ResponseWriter(X86_64).put(back, rid, c.BLKIF_OP_READ, c.BLKIF_RSP_OKAY)
            kept.answered(rid, rid)
        journal.close()
        assert back.sring.rsp_prod == 0
        back.release()
        resume_until_answered(hv, fe, image, path, engine, uri)
        fe.close()


@pytest.mark.parametrize("engine,storage", [("c", "file"), ("python", "file"), ("c-nbd", "nbd"),
                                            ("nbd", "nbd")],
                         ids=["c", "python", "c-nbd", "nbd"], indirect=["storage"])
def test_a_journal_with_two_barriers_is_taken_again_in_ring_order(tmp_path, engine, storage):
    """What a Python predecessor on NBD can leave: writes and two barriers
    taken, none answered (it starts a barrier and takes on behind it, as
    blkback does), kept in entries out of ring order.  Its successor takes
    them again oldest first, each barrier after everything before it: all are
    answered once, OKAY, and each block holds its barrier's data."""
    image, uri, contents = storage
    path = tmp_path / "journal"
    plan = [(c.BLKIF_OP_WRITE, 0), (c.BLKIF_OP_WRITE_BARRIER, 0), (c.BLKIF_OP_WRITE, 1),
            (c.BLKIF_OP_WRITE_BARRIER, 1)]
    with SimHypervisor() as hv:
        fe = Frontend(hv, 0)
        journal = Journal.create(str(path), {"ring_bytes": [len(fe.ring_pages.buffer)]})
        kept = RingJournal(journal.region(0), fe.ring.size, engine_abi(X86_64))
        kept.start(0)
        payloads = [os.urandom(4096) for _ in plan]
        for rid, (op, block) in enumerate(plan):
            payload = payloads[rid]
            fe.data.buffer[rid * 4096:rid * 4096 + 4096] = payload
            fe.enc.rw(fe.ring, op, rid, block * 8, [(fe.data.refs[rid], 0, 7)])
            fe.inflight[rid] = (op, block, payload)
            fe.free_ids.remove(rid)
            slot = c.SRING_HEADER_SIZE + rid * X86_64.slot_size
            kept.take(bytes(fe.ring_pages.buffer[slot:slot + X86_64.slot_size]), rid,
                      len(plan) - 1 - rid)  # entries in the reverse of ring order
        fe.ring.push_requests()
        journal.close()
        resume_until_answered(hv, fe, image, path, engine, uri)
        fe.close()
    disk = contents()
    for block in (0, 1):
        assert fe.model[block] == payloads[2 * block + 1]  # the barrier answered last
        assert disk[block * 4096:block * 4096 + 4096] == payloads[2 * block + 1]
