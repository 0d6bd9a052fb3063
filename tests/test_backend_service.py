"""``blkif serve`` across processes on the sim platform: our xenstored, the
service and its workers, and a frontend domain negotiated by hand, with every
byte checked against the image file on disk."""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend_fixtures import RawFrontend, Service, error_node, status_after_tick
from helpers import require_tool
from blkif.abi import X86_32, X86_64, constants as c, ffi
from blkif.backend import service as service_mod, status as status_mod, worker as worker_mod
from blkif.negotiate import FrontendWants
from blkif.platform.sim import SimHypervisor
from xenstore import Xenstore, XenbusState as S
from xenstore_fixtures import ROOT, start_server, stop_server

OKAY, ERROR, NOTSUP = c.BLKIF_RSP_OKAY, c.BLKIF_RSP_ERROR, c.BLKIF_RSP_EOPNOTSUPP


@pytest.fixture(scope="module")
def hv():
    with SimHypervisor() as hv:
        yield hv


@pytest.fixture(scope="module")
def service(hv, tmp_path_factory):
    svc = Service(hv, tmp_path_factory.mktemp("serve"), "--max-queues", "4")
    yield svc
    assert svc.close() == 0, svc.output()
    assert "Traceback" not in svc.output()


@pytest.fixture
def vbd(service, tmp_path):
    domid, devid = service.new_vbd(tmp_path / "disk.img")
    fe = RawFrontend(service, domid, devid)
    yield fe, tmp_path / "disk.img", domid, devid
    fe.shutdown()


@pytest.fixture
def other(service, tmp_path):
    """A second VBD, connected, that must not notice what happens to the first."""
    image = tmp_path / "other.img"
    ids = service.new_vbd(image)
    fe = RawFrontend(service, *ids)
    fe.connect(wants=FrontendWants(0, 1, 0, False))
    yield fe, image, ids
    fe.shutdown()


def workload(fe, image, seed, rounds=40):
    """Random writes, reads, flushes and discards over every queue; checked
    against a model and, after a flush, against the file."""
    rng = random.Random(seed)
    size = os.path.getsize(image)
    model = bytearray(open(image, "rb").read())
    for i in range(rounds):
        q = fe.queues[i % len(fe.queues)]
        length = rng.choice([512, 4096, 4096 * rng.randint(1, 300), 1 << 20])
        offset = rng.randrange(0, size - length, 512)
        what = rng.random()
        if what < 0.5:
            data = os.urandom(length)
            tag = q.submit_write(offset, data)
            model[offset:offset + length] = data
        elif what < 0.9:
            tag = q.submit_read(offset, length)
        else:
            tag = q.submit_discard(offset, length)
            model[offset:offset + length] = bytes(length)
        comp = fe.run(q, [tag])[tag]
        assert comp.ok, (i, comp.status)
        if comp.data is not None:
            assert comp.data == model[offset:offset + length], i
    q = fe.queues[0]
    tag = q.submit_flush()
    assert fe.run(q, [tag])[tag].ok
    assert open(image, "rb").read() == model


MATRIX = [  # abi, queues, order, indirect, persistent
    (X86_64, 1, 0, 0, False), (X86_64, 2, 1, 256, True), (X86_32, 3, 2, 32, False),
    (X86_32, 4, 3, 0, True), (X86_64, 1, 4, 256, False), (X86_32, 1, 4, 512, True),
]


@pytest.mark.parametrize("abi,queues,order,indirect,persistent", MATRIX,
                         ids=["%s-q%d-o%d-ind%d-p%d" % (a.tag, q, o, i, p)
                              for a, q, o, i, p in MATRIX])
def test_negotiated_io_matches_the_image(service, vbd, abi, queues, order, indirect,
                                         persistent):
    fe, image, domid, devid = vbd
    conn = fe.connect(abi=abi, wants=FrontendWants(order, queues, indirect, persistent))
    assert len(conn.queues) == queues and conn.ring_page_order == order
    assert fe.disk.sectors == os.path.getsize(image) // 512
    workload(fe, image, seed=order * 10 + queues)
    vbd_status = status_after_tick(service, domid, devid)
    assert vbd_status["negotiated"]["protocol"] == abi.protocol
    assert vbd_status["negotiated"]["queues"] == queues
    assert vbd_status["negotiated"]["persistent"] is persistent
    assert vbd_status["rings_mapped"] == queues
    counters = vbd_status["counters"]
    assert counters["errors"] == 0 and counters["in_flight"] == 0
    assert (counters["indirect"] > 0) == bool(indirect)
    assert (counters["persistent_grants"] > 0) == persistent
    fe.close()
    assert fe.read_back("state") == str(int(S.Closed))


def test_the_offer_is_what_we_configured(vbd):
    fe = vbd[0]
    offer = fe.offer()
    assert (offer.max_queues, offer.max_ring_page_order, offer.max_indirect_segments) == (4, 4, 256)
    assert offer.persistent and offer.flush and offer.barrier and offer.discard


def test_reconnect_after_close(service, vbd):
    fe, image, domid, devid = vbd
    for seed in range(2):
        fe.connect(wants=FrontendWants(seed, 1 + seed, 256, bool(seed)))
        workload(fe, image, seed, rounds=10)
        fe.close()
        fe.xs.switch_state(fe.front + "/state", S.Initialising)
        assert fe.backend_state([S.InitWait]) == S.InitWait


@pytest.mark.parametrize("nodes,reason", [
    ({"ring-page-order": "5"}, "ring-page-order"),
    ({"multi-queue-num-queues": "9"}, "multi-queue-num-queues"),
    ({"protocol": "sparc-abi"}, "sparc-abi"),
    ({"event-channel": "junk"}, "event-channel"),
    ({"ring-ref": "999999"}, "ring"),
    ({"event-channel": "4000"}, "connecting rings"),
    ({"ring-ref": b"\xff8"}, "UTF-8"),  # killed the worker (the xenbus fuzz target reproduces it)
], ids=["order", "queues", "protocol", "port-junk", "bad-gref", "bad-port", "not-utf8"])
def test_bad_frontend_nodes_get_an_error_node_and_closing(service, vbd, nodes, reason):
    fe, _, domid, devid = vbd
    fe.setup(wants=FrontendWants(0, 1, 0, False), extra=nodes)
    assert fe.backend_state([S.Connected, S.Closing]) == S.Closing
    assert reason in error_node(service, domid, devid)


JUNK = st.one_of(
    st.integers(-5, 2**33).map(str),
    st.sampled_from(["", "0", "1", "16", "4294967295", "x86_32-abi", "x86_64-abi", "arm-abi"]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=8),
)
FRONTEND_KEYS = ["ring-ref", "ring-ref0", "ring-ref1", "event-channel", "ring-page-order",
                 "protocol", "multi-queue-num-queues", "queue-0/ring-ref", "queue-1/event-channel",
                 "feature-persistent"]


@settings(max_examples=12, deadline=None)
@given(junk=st.dictionaries(st.sampled_from(FRONTEND_KEYS), JUNK, min_size=1, max_size=4),
       queues=st.integers(1, 2), order=st.integers(0, 1))
def test_random_frontend_nodes_never_hurt_the_worker(service, tmp_path_factory, junk, queues,
                                                      order):
    """Whatever a guest writes, its VBD ends Connected or Closing with an
    error node, still closes when the frontend does, and the worker lives."""
    image = tmp_path_factory.mktemp("fuzz") / "disk.img"
    domid, devid = service.new_vbd(image, size=1 << 20)
    fe = RawFrontend(service, domid, devid)
    try:
        pid = service.worker_pid(domid, devid)
        fe.setup(wants=FrontendWants(order, queues, 0, False), extra=junk)
        state = fe.backend_state([S.Connected, S.Closing])
        if state == S.Closing:
            assert error_node(service, domid, devid)
        # Either way it still follows the frontend: Closing, then Closed.
        fe.close()
        assert service.worker_pid(domid, devid) == pid
    finally:
        fe.shutdown()


def _raw_requests(fe, build, count):
    """Put requests made by ``build(encoder, ring)`` on queue 0 and wait for
    ``count`` responses: {id: (operation, status)}."""
    q = fe.queues[0]
    build(q.encoder, q.ring)
    if q.ring.push_requests():
        q.port.notify()
    got = {}
    deadline = time.monotonic() + 10
    while len(got) < count:
        assert time.monotonic() < deadline, "responses: %s" % got
        q.port.wait(0.2)
        while q.ring.pending_responses():
            rid, op, status = q.encoder.take_response(q.ring)
            got[rid] = (op, status)
    return got


def test_bad_requests_get_error_responses_and_the_vbd_carries_on(service, vbd):
    fe, image, domid, devid = vbd
    fe.connect(wants=FrontendWants(0, 1, 0, False))
    q = fe.queues[0]
    ref = q.pool.refs[0]
    sectors = fe.disk.sectors

    def build(enc, ring):
        enc.rw(ring, 99, 1001, 0, [(ref, 0, 7)])  # unknown operation
        enc.rw(ring, c.BLKIF_OP_READ, 1002, 0, [(ref, 0, 7)] * 11)
        slot = ring.slot((ring.req_prod_pvt - 1) & 0xFFFFFFFF)
        ffi.cast(q.abi.ctype("request") + " *", slot).nr_segments = 12  # one too many
        enc.rw(ring, c.BLKIF_OP_READ, 1003, 0, [(ref, 5, 2)])  # first_sect > last_sect
        enc.rw(ring, c.BLKIF_OP_READ, 1004, 0, [(ref, 0, 8)])  # last_sect 8
        enc.rw(ring, c.BLKIF_OP_READ, 1005, sectors - 4, [(ref, 0, 7)])  # past the end
        enc.rw(ring, c.BLKIF_OP_READ, 1006, 0, [])  # a read without segments
        enc.rw(ring, c.BLKIF_OP_READ, 1007, 0, [(123456, 0, 7)])  # a gref never granted
        enc.rw(ring, c.BLKIF_OP_READ, 1008, 8, [(ref, 0, 7)])  # fine
    got = _raw_requests(fe, build, 8)
    assert got[1001] == (99, NOTSUP)
    for rid in range(1002, 1008):
        assert got[rid][1] == ERROR, rid
    assert got[1008] == (c.BLKIF_OP_READ, OKAY)
    assert fe.read_back("state") == str(int(S.Connected))
    workload(fe, image, seed=5, rounds=5)


def test_barrier_writes_and_flushes(service, vbd):
    fe, image, _, _ = vbd
    fe.connect(wants=FrontendWants(0, 1, 0, False))
    q = fe.queues[0]
    data = os.urandom(8192)
    q.pool.buffer[:8192] = data
    refs = q.pool.refs

    def build(enc, ring):
        enc.rw(ring, c.BLKIF_OP_WRITE_BARRIER, 7, 16, [(refs[0], 0, 7), (refs[1], 0, 7)])
        enc.rw(ring, c.BLKIF_OP_WRITE_BARRIER, 8, 0, [])  # an empty barrier: a flush
    got = _raw_requests(fe, build, 2)
    assert got == {7: (c.BLKIF_OP_WRITE_BARRIER, OKAY), 8: (c.BLKIF_OP_WRITE_BARRIER, OKAY)}
    assert image.read_bytes()[16 * 512:16 * 512 + 8192] == data


def test_direct_io_service(hv, tmp_path):
    """--direct: O_DIRECT on the image (granted pages are page-aligned)."""
    svc = Service(hv, tmp_path, "--direct")
    try:
        domid, devid = svc.new_vbd(tmp_path / "disk.img")
        fe = RawFrontend(svc, domid, devid)
        fe.connect(wants=FrontendWants(1, 2, 256, True))
        workload(fe, tmp_path / "disk.img", seed=11, rounds=20)
        fe.close()
        fe.shutdown()
    finally:
        assert svc.close() == 0
    assert "O_DIRECT" in svc.output() and "Traceback" not in svc.output()


def test_read_only_vbd_refuses_writes_and_discards(service, tmp_path):
    image = tmp_path / "ro.img"
    image.write_bytes(os.urandom(1 << 20))
    before = image.read_bytes()
    domid, devid = service.new_vbd(image, mode="r")
    fe = RawFrontend(service, domid, devid)
    try:
        fe.connect(wants=FrontendWants(0, 1, 0, False))
        assert fe.disk.readonly and fe.read_back("feature-discard") == "0"
        q = fe.queues[0]
        tags = [q.submit_write(0, os.urandom(4096)), q.submit_discard(0, 4096),
                q.submit_read(0, 8192)]
        done = fe.run(q, tags)
        # No discard is offered on a read-only VBD: it is an unknown operation there.
        assert [done[t].status for t in tags] == [ERROR, NOTSUP, OKAY]
        assert done[tags[2]].data == before[:8192]
        assert image.read_bytes() == before
    finally:
        fe.shutdown()


def test_ring_overrun_shuts_down_only_that_vbd(service, vbd, other):
    fe, image, domid, devid = vbd
    fe.connect(wants=FrontendWants(0, 1, 0, False))
    q = fe.queues[0]
    q.ring.sring.req_prod = q.ring.req_prod_pvt + q.ring.size + 5  # hostile producer
    q.port.notify()
    assert fe.backend_state([S.Closing]) == S.Closing
    assert "overrun" in error_node(service, domid, devid)
    workload(other[0], other[1], seed=3, rounds=10)
    assert other[0].read_back("state") == str(int(S.Connected))


def test_a_killed_worker_is_replaced_under_the_running_frontend(service, vbd, other):
    """Live restart: the successor re-attaches to the same rings, answers the
    request the dead worker had in flight, and the VBD never leaves Connected."""
    fe, image, domid, devid = vbd
    fe.connect(wants=FrontendWants(2, 2, 256, True))
    q = fe.queues[0]
    data = os.urandom(1 << 20)
    tags = [q.submit_write(0, data), q.submit_flush()]
    assert all(comp.ok for comp in fe.run(q, tags).values())
    pid = service.worker_pid(domid, devid)
    more = os.urandom(1 << 20)
    tag = q.submit_write(1 << 20, more)
    q.kick()  # on the ring, maybe taken, as the worker dies
    with service.dom0.watch(fe.back + "/state") as watch:
        assert watch.get(timeout=5) is not None  # a new watch fires once
        os.kill(pid, signal.SIGKILL)
        assert fe.run(q, [tag])[tag].ok  # by the successor (or the worker, as it died)
        deadline = time.monotonic() + 10
        while service.worker_pid(domid, devid) == pid:
            assert time.monotonic() < deadline, "no successor"
            time.sleep(0.05)
        assert watch.get(timeout=0.5) is None  # the state was never written again
    assert fe.read_back("state") == str(int(S.Connected))
    tags = [q.submit_read(0, 2 << 20), q.submit_flush()]
    done = fe.run(q, tags)
    assert done[tags[0]].data == data + more and done[tags[1]].ok
    assert image.read_bytes()[:2 << 20] == data + more
    workload(other[0], other[1], seed=4, rounds=5)
    workers = {(w["domid"], w["devid"]): w for w in service.status()["workers"]}
    assert workers[(domid, devid)]["restarts"] == 1
    assert workers[other[2]]["restarts"] == 0
    assert "killed by SIGKILL" in service.output()
    assert "vbd %d/%d: resumed the connection" % (domid, devid) in service.output()


def test_an_upgrade_restart_leaves_every_vbd_connected(hv, tmp_path):
    """SIGUSR1: the service and its workers exit 0 with the VBD still Connected;
    a request queued while no backend runs is answered by the next service."""
    svc = Service(hv, tmp_path)
    try:
        domid, devid = svc.new_vbd(tmp_path / "disk.img")
        fe = RawFrontend(svc, domid, devid)
        fe.connect(wants=FrontendWants(2, 2, 256, True))
        q = fe.queues[1]
        data = os.urandom(1 << 20)
        tags = [q.submit_write(0, data), q.submit_flush()]
        assert all(comp.ok for comp in fe.run(q, tags).values())
        with svc.dom0.watch(fe.back + "/state") as watch:
            assert watch.get(timeout=5) is not None  # a new watch fires once
            svc.proc.send_signal(signal.SIGUSR1)
            assert svc.proc.wait(30) == 0, svc.output()
            assert "detached 1 worker(s)" in svc.output()
            more = os.urandom(1 << 20)
            tag = q.submit_write(1 << 20, more)
            q.kick()  # nobody serves the ring now
            assert not q.complete()
            svc.start()
            written = fe.run(q, [tag])[tag]  # then read: overlapping I/O in flight is unordered
            read = q.submit_read(0, 2 << 20)
            done = fe.run(q, [read])
            assert watch.get(timeout=0.5) is None  # the state was never written again
        same = done[read].data == data + more  # not in the assert: pytest would diff 2 MiB
        assert written.ok and same, "the image does not hold both writes"
        assert fe.read_back("state") == str(int(S.Connected))
        assert svc.output().count("resumed the connection") == 1
        fe.shutdown()
    finally:
        assert svc.close() == 0, svc.output()


@pytest.mark.parametrize("options,fmt", [(["--engine", "python"], None), ([], "qcow2"),
                                         (["--engine", "python"], "qcow2")],
                         ids=["python-engine", "qcow2-through-nbd", "qcow2-python-nbd"])
def test_the_other_datapaths_restart_live_too(hv, tmp_path, options, fmt):
    """--engine python, and an image through NBD (the C engine's libnbd
    link, or the Python NBD ring server), journal their rings as the C engine
    does on a file: a killed worker's successor (with a new storage daemon
    for the image) and the next service after an upgrade resume."""
    if fmt:
        require_tool("qemu-img")
        require_tool("qemu-storage-daemon")
    svc = Service(hv, tmp_path, *options)
    image = tmp_path / ("disk.%s" % (fmt or "img"))
    try:
        domid, devid = svc.new_vbd(image, fmt=fmt)
        fe = RawFrontend(svc, domid, devid)
        fe.connect(wants=FrontendWants(1, 1, 32, True))
        q = fe.queues[0]
        data = [os.urandom(256 << 10) for _ in range(3)]
        with svc.dom0.watch(fe.back + "/state") as watch:
            assert watch.get(timeout=5) is not None  # a new watch fires once
            pid = svc.worker_pid(domid, devid)
            tag = q.submit_write(0, data[0])
            q.kick()  # on the ring, maybe taken, as the worker dies
            os.kill(pid, signal.SIGKILL)
            assert fe.run(q, [tag])[tag].ok
            svc.proc.send_signal(signal.SIGUSR1)
            assert svc.proc.wait(30) == 0, svc.output()
            tag = q.submit_write(256 << 10, data[1])
            q.kick()  # nobody serves the ring now
            svc.start()
            assert fe.run(q, [tag])[tag].ok
            assert fe.run(q, [q.submit_write(512 << 10, data[2])])
            read = q.submit_read(0, 768 << 10)
            got = fe.run(q, [read])[read].data
            assert watch.get(timeout=0.5) is None  # the state was never written again
        same = got == b"".join(data)
        assert same, "the image does not hold the three writes"
        assert svc.output().count("resumed the connection") == 2, svc.output()
        fe.shutdown()
    finally:
        assert svc.close() == 0, svc.output()
    if fmt:
        subprocess.run(["qemu-img", "check", "-q", str(image)], check=True)


def test_a_successor_notifies_the_frontend_once(hv, tmp_path):
    """A worker killed between publishing responses and notifying would leave
    the frontend waiting forever (the lab's qcow2 restart run hung so): the
    successor sends one event as it resumes, whatever the ring holds."""
    svc = Service(hv, tmp_path)
    try:
        domid, devid = svc.new_vbd(tmp_path / "disk.img")
        fe = RawFrontend(svc, domid, devid)
        fe.connect(wants=FrontendWants(1, 1, 32, True))
        q = fe.queues[0]
        assert fe.run(q, [q.submit_write(0, os.urandom(4096))])
        q.port.clear()  # every event so far taken: the ring is idle
        assert not q.port.wait(0.5)
        os.kill(svc.worker_pid(domid, devid), signal.SIGKILL)
        assert q.port.wait(30), "the successor never notified the frontend"
        deadline = time.monotonic() + 10  # it logs right after
        while "resumed the connection" not in svc.output():
            assert time.monotonic() < deadline, svc.output()
            time.sleep(0.05)
        fe.shutdown()
    finally:
        assert svc.close() == 0, svc.output()


def test_without_live_restart_a_killed_worker_closes_its_vbd_only(hv, tmp_path):
    svc = Service(hv, tmp_path, "--no-live-restart")
    try:
        domid, devid = svc.new_vbd(tmp_path / "disk.img")
        fe = RawFrontend(svc, domid, devid)
        fe.connect(wants=FrontendWants(2, 2, 256, True))
        q = fe.queues[0]
        data = os.urandom(1 << 20)
        tags = [q.submit_write(0, data), q.submit_flush()]
        assert all(comp.ok for comp in fe.run(q, tags).values())
        pid = svc.worker_pid(domid, devid)
        q.submit_write(1 << 20, os.urandom(1 << 20))  # in flight as the worker dies
        q.kick()
        os.kill(pid, signal.SIGKILL)
        # The restarted worker closes the dead connection; we start over.
        assert fe.backend_state([S.Closed]) == S.Closed
        assert svc.worker_pid(domid, devid) != pid
        fe.release()
        fe.xs.switch_state(fe.front + "/state", S.Closed)
        fe.xs.switch_state(fe.front + "/state", S.Initialising)
        fe.connect(wants=FrontendWants(0, 1, 0, False))
        q = fe.queues[0]
        tag = q.submit_read(0, 1 << 20)
        assert fe.run(q, [tag])[tag].data == data
        assert (tmp_path / "disk.img").read_bytes()[:1 << 20] == data
        fe.shutdown()
    finally:
        assert svc.close() == 0, svc.output()


def test_a_hung_worker_is_killed_and_restarted(hv, tmp_path):
    svc = Service(hv, tmp_path, "--hung-timeout", "3")
    try:
        domid, devid = svc.new_vbd(tmp_path / "disk.img")
        pid = svc.worker_pid(domid, devid)
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while svc.worker_pid(domid, devid) == pid:
            assert time.monotonic() < deadline, svc.output()
            time.sleep(0.1)
        assert "has not reported" in svc.output() and "killed by SIGKILL" in svc.output()
    finally:
        assert svc.close() == 0


def test_unservable_vbd_is_reported_not_restarted(service, tmp_path):
    domid, devid = service.new_vbd(tmp_path / "disk.img")
    service.dom0.write("/local/domain/0/backend/vbd/%d/%d/params" % (domid, devid), "/nope")
    # The worker may have started on the good path already; a fresh VBD shows it plainly.
    domid, devid = service.new_vbd(tmp_path / "gone.img")
    os.unlink(tmp_path / "gone.img")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        workers = {(w["domid"], w["devid"]): w for w in service.status()["workers"]}
        if workers.get((domid, devid), {}).get("status") == "failed":
            break
        time.sleep(0.05)
    else:
        raise AssertionError("VBD never marked failed: %s" % service.status())
    assert "cannot open backing store" in error_node(service, domid, devid)
    assert service.dom0.read_state(
        "/local/domain/0/backend/vbd/%d/%d/state" % (domid, devid)) == S.Closing


def test_an_unchanged_status_is_touched_not_rewritten(tmp_path):
    """The heartbeat of an idle worker costs a utime, not a new file."""
    path = str(tmp_path / "vbd-1-51712.json")
    text = status_mod.write_status(path, {"state": "Connected", "requests": 1})
    inode = os.stat(path).st_ino
    os.utime(path, (1, 1))
    assert status_mod.write_status(path, {"requests": 1, "state": "Connected"}, text) == text
    assert os.stat(path).st_ino == inode and os.stat(path).st_mtime > 1
    status_mod.write_status(path, {"state": "Connected", "requests": 2}, text)
    assert os.stat(path).st_ino != inode
    with open(path) as f:
        assert json.load(f) == {"state": "Connected", "requests": 2}


class _TickingVbd:
    """What the worker's main loop calls on a VBD, noting each tick's time."""

    label, servers = "vbd", ()

    def __init__(self, clock):
        self.clock, self.ticks = clock, []

    def tick(self):
        self.ticks.append(self.clock[0])

    def changed(self):
        pass

    def check_size(self):
        return False


def test_workers_started_together_do_not_tick_together(monkeypatch):
    """Each tick comes 0.5-1.5 s after the last, so workers started in the
    same instant spread their once-a-second work instead of doing it at once
    for as long as they live."""
    clock = [1000.0]
    monkeypatch.setattr(worker_mod.time, "monotonic", lambda: clock[0])
    vbds = [_TickingVbd(clock) for _ in range(2)]
    workers = [worker_mod.Worker(vbd, None, 1.0) for vbd in vbds]
    while clock[0] < 1200:
        for w in workers:
            w._step(0)
        clock[0] = round(clock[0] + 0.01, 2)
    gaps = [b - a for vbd in vbds for a, b in zip(vbd.ticks, vbd.ticks[1:])]
    assert len(gaps) > 250 and min(gaps) >= 0.5 and max(gaps) <= worker_mod.HEARTBEAT_MAX + 0.02
    first, second = vbds[0].ticks, vbds[1].ticks
    together = sum(any(abs(t - u) < 0.05 for u in second) for t in first)
    assert together < len(first) / 4


class _Reads:
    """A xenstore connection that notes the path of every read it makes."""

    def __init__(self, xs):
        self.xs, self.paths = xs, []

    def __getattr__(self, name):
        method = getattr(self.xs, name)

        def noted(path, *args):
            if name in ("exists", "read_str", "read_state"):
                self.paths.append(path)
            return method(path, *args)
        return noted


def test_a_frontend_rewriting_its_state_costs_one_read_an_event(tmp_path):
    """A guest that keeps rewriting its ``state`` (XSA-349's flood) fires the
    worker's watch each time: each event costs one read of that node, and our
    own directory is read again only after an event under it."""
    from blkif.backend.vbd import Vbd
    sock = str(tmp_path / "xenstored.sock")
    daemon = start_server(sock)
    try:
        with Xenstore.open(sock) as xs:
            back, front = "/local/domain/0/backend/vbd/5/51712", "/local/domain/5/device/vbd/51712"
            xs.write(back + "/state", str(int(S.Connected)))
            xs.write(front + "/state", str(int(S.Connected)))
            reads = _Reads(xs)
            vbd = Vbd(reads, None, back)
            vbd.frontend, vbd.storage, vbd.state = front, object(), S.Connected
            vbd.changed()  # the first time: both ends
            assert reads.paths == [back, back + "/blkif-resize-request", back + "/state",
                                   front + "/state"]
            reads.paths.clear()
            for _ in range(10):  # events of the frontend's node only
                vbd.changed()
            assert reads.paths == [front + "/state"] * 10
            reads.paths.clear()
            vbd.backend_changed = True  # what the worker's watch on our directory sets
            vbd.changed()
            assert back + "/state" in reads.paths and not vbd.backend_changed
    finally:
        stop_server(daemon)


def test_toolstack_close_and_removal(service, vbd):
    """``xl destroy``: libxl writes Closing and waits for Closed, then removes
    the directories; the worker stops with nothing left mapped."""
    fe, image, domid, devid = vbd
    fe.connect(wants=FrontendWants(1, 2, 256, True))
    workload(fe, image, seed=9, rounds=5)
    back = fe.back
    service.dom0.write(back + "/state", str(int(S.Closing)))
    assert service.dom0.wait_for_state(back + "/state", [S.Closed], 10) == S.Closed
    from blkif import toolstack
    toolstack.destroy(service.dom0, domid, "xvda")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        finished = [f for f in service.status()["finished"]
                    if (f["domid"], f["devid"]) == (domid, devid)]
        if finished:
            break
        time.sleep(0.05)
    assert finished and finished[-1]["rings_mapped"] == 0
    assert finished[-1]["channels_bound"] == 0 and finished[-1]["persistent_grants"] == 0
    assert not os.path.exists(os.path.join(service.state_dir, "vbd-%d-%d.json" % (domid, devid)))


def test_sigterm_finishes_requests_and_closes_every_vbd(hv, tmp_path):
    svc = Service(hv, tmp_path)
    try:
        domid, devid = svc.new_vbd(tmp_path / "disk.img")
        fe = RawFrontend(svc, domid, devid)
        fe.connect(wants=FrontendWants(0, 1, 256, False))
        q = fe.queues[0]
        data = os.urandom(2 << 20)
        tags = [q.submit_write(0, data), q.submit_flush()]
        q.kick()
        svc.proc.send_signal(signal.SIGTERM)
        done = fe.run(q, tags)
        assert all(comp.ok for comp in done.values())
        assert fe.backend_state([S.Closing, S.Closed]) in (S.Closing, S.Closed)
        fe.xs.switch_state(fe.front + "/state", S.Closed)
        start = time.monotonic()
        assert svc.stop() == 0
        assert time.monotonic() - start < 5
        assert fe.read_back("state") == str(int(S.Closed))
        assert (tmp_path / "disk.img").read_bytes()[:2 << 20] == data
        fe.shutdown()
    finally:
        svc.close()
    assert "Traceback" not in svc.output()


def test_stats_command(service, vbd):
    fe, image, domid, devid = vbd
    fe.connect(wants=FrontendWants(0, 1, 0, False))
    workload(fe, image, seed=1, rounds=5)
    status_after_tick(service, domid, devid)
    out = subprocess.run([sys.executable, "-m", "blkif", "stats", "--state-dir",
                          service.state_dir, "--json"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    vbds = {(v["domid"], v["devid"]): v for v in json.loads(out)["vbds"]}
    counters = vbds[(domid, devid)]["counters"]
    assert counters["requests"] == sum(counters["ops"].values()) >= 6
    table = subprocess.run([sys.executable, "-m", "blkif", "stats", "--state-dir",
                            service.state_dir], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout
    assert any(line.split()[:3] == [str(domid), str(devid), "Connected"]
               for line in table.splitlines())


@pytest.mark.parametrize("argv,code,text", [
    (["serve", "--platform", "xen", "--state-dir", "{tmp}"], 1, "/dev/xen"),
    (["serve", "--max-indirect-segments", "5000"], 2, "not in 0..4096"),
    (["serve", "--max-ring-page-order", "5"], 2, "not in 0..4"),
    (["stats", "--state-dir", "{tmp}/none"], 2, "no blkif service state"),
    (["serve", "--platform", "sim", "--hung-timeout", "2"], 2, "give at least 3"),
])
def test_cli_errors_are_one_line(tmp_path, argv, code, text):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "blkif", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == code
    assert len(proc.stderr.strip().splitlines()) == 1 and text in proc.stderr


class _Proc:
    pid = 4242


def _children(pid):
    with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
        return {int(p) for p in f.read().split()}


def test_a_new_vbd_goes_to_the_spare_worker_started_ahead(hv, tmp_path):
    svc = Service(hv, tmp_path)
    try:
        deadline = time.monotonic() + 10
        while not _children(svc.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        spare = _children(svc.proc.pid)
        assert len(spare) == 1  # waiting for a VBD, its imports done
        # As root its start-up yields the CPU to serving workers, until it serves.
        idle = os.SCHED_IDLE if os.geteuid() == 0 else os.SCHED_OTHER
        assert os.sched_getscheduler(min(spare)) == idle
        domid, devid = svc.new_vbd(tmp_path / "disk.img")
        assert svc.worker_pid(domid, devid) in spare
        fe = RawFrontend(svc, domid, devid)
        fe.backend_state([S.InitWait])
        assert os.sched_getscheduler(min(spare)) == os.SCHED_OTHER
        following = _children(svc.proc.pid) - spare
        assert len(following) == 1  # the next VBD's spare
        assert os.sched_getscheduler(min(following)) == idle
        fe.shutdown()
    finally:
        assert svc.close() == 0, svc.output()
    assert "Traceback" not in svc.output()


def test_crash_loop_backs_off_then_gives_up():
    parser = argparse.ArgumentParser()
    service_mod.add_arguments(parser)
    svc = service_mod.Service(parser.parse_args(["--platform", "sim", "--state-dir",
                                                 "/nonexistent", "--max-queues", "1"]))
    handle = service_mod.WorkerHandle(1, 51712, "/local/domain/0/backend/vbd/1/51712")
    handle.proc, handle.last_exit = _Proc(), "killed by SIGKILL"
    delays = []
    for _ in range(service_mod.MAX_CRASHES):
        before = time.monotonic()
        svc._crashed(handle)
        assert handle.status == "restarting"
        delays.append(handle.next_start - before)
    assert [round(d / service_mod.FIRST_BACKOFF) for d in delays] == [1, 2, 4, 8, 16]
    svc._crashed(handle)
    assert handle.status == "failed" and handle.restarts == service_mod.MAX_CRASHES


@pytest.mark.parametrize("engine", ["c", "python"])
def test_a_saturating_guest_leaves_the_worker_responsive(hv, tmp_path, engine):
    """A guest that keeps its ring full never starves the worker's main thread:
    the status file keeps its heartbeat (no hung-worker kill), and SIGTERM is
    acted on at once, with every request answered."""
    svc = Service(hv, tmp_path, "--engine", engine)
    try:
        domid, devid = svc.new_vbd(tmp_path / "disk.img")
        fe = RawFrontend(svc, domid, devid)
        fe.connect(wants=FrontendWants(0, 1, 0, False))
        q = fe.queues[0]
        status_file = os.path.join(svc.state_dir, "vbd-%d-%d.json" % (domid, devid))
        rng = random.Random(7)
        submitted, answered, beats = set(), set(), set()
        end = time.monotonic() + 3
        while time.monotonic() < end:
            while len(submitted) - len(answered) < 64:
                submitted.add(q.submit_read(rng.randrange(2048) * 4096, 4096))
            q.kick()
            q.port.wait(0.05)
            for comp in q.complete():
                assert comp.ok
                answered.add(comp.tag)
            beats.add(os.stat(status_file).st_mtime)
        assert len(answered) > 100
        assert len(beats) >= 2  # rewritten about once a second throughout
        svc.proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        assert fe.backend_state([S.Closing, S.Closed], timeout=5) in (S.Closing, S.Closed)
        assert time.monotonic() - start < 1.0
        done = fe.run(q, submitted - answered, timeout=10)
        assert all(comp.ok for comp in done.values())
        fe.xs.switch_state(fe.front + "/state", S.Closed)
        assert svc.stop() == 0
        fe.shutdown()
    finally:
        svc.close()
    assert "Traceback" not in svc.output()


@pytest.mark.parametrize("engine", ["c", "python"])
def test_max_persistent_grants_bounds_what_a_ring_keeps(hv, tmp_path, engine):
    """--max-persistent-grants 8: a ring keeps at most 8 grants mapped; what
    does not fit is mapped with its request, and the data is right."""
    svc = Service(hv, tmp_path, "--max-persistent-grants", "8", "--engine", engine)
    try:
        domid, devid = svc.new_vbd(tmp_path / "disk.img")
        fe = RawFrontend(svc, domid, devid)
        fe.connect(wants=FrontendWants(0, 1, 32, True))
        workload(fe, tmp_path / "disk.img", seed=5, rounds=10)
        counters = status_after_tick(svc, domid, devid)["counters"]
        assert 0 < counters["persistent_grants"] <= 8
        assert counters["mapped_grants"] > 0 and counters["errors"] == 0
        fe.close()
        fe.shutdown()
    finally:
        assert svc.close() == 0
    assert "Traceback" not in svc.output()


def test_only_events_naming_a_vbd_directory_ask_for_a_rescan():
    """A VBD's own nodes change many times while it connects; listing every
    VBD for each change would cost the supervisor (and xenstored) CPU in
    proportion to how many VBDs there are."""
    roots = ["/local/domain/0/backend/vbd", "/local/domain/0/backend/qdisk"]
    for path in ["/local/domain/0/backend/vbd", "/local/domain/0/backend/vbd/7",
                 "/local/domain/0/backend/qdisk/7/51712", "@releaseDomain"]:
        assert service_mod.vbd_level(path, roots), path
    for path in ["/local/domain/0/backend/vbd/7/51712/state",
                 "/local/domain/0/backend/qdisk/7/51712/queue-0/ring-ref"]:
        assert not service_mod.vbd_level(path, roots), path
