"""A running ``blkif serve`` on the sim platform, and a hand-driven frontend.

``Service`` starts our xenstored, the serve subprocess and hands out guest
domains.  ``RawFrontend`` negotiates with plain FrontQueues and the nodes of
:mod:`blkif.negotiate`, so a test chooses every value (or a bad one) itself
and can put any bytes on the ring.
"""
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time

from blkif import toolstack
from blkif.abi import NATIVE
from blkif.backend import status
from blkif.frontend.queue import FrontQueue
from blkif.negotiate import BackendOffer, Connection, DiskInfo, FrontendWants, QueueRing
from blkif.platform import open_platform
from blkif.platform.sim import SimHypervisor
from xenstore import XenbusState as S
from xenstore import Xenstore, domain_socket_path
from xenstore_fixtures import ROOT, start_server, stop_server

_domids = itertools.count(1)
TOOLSTACK_NODES = {"backend", "backend-id", "state", "virtual-device", "device-type"}


class Service:
    """xenstored + ``blkif serve --platform sim`` in ``tmp``; ``dom0`` is a
    connection to xenstore as the toolstack."""

    def __init__(self, hv, tmp, *options):
        self.hv = hv
        self.tmp = tmp
        self.sock = str(tmp / "xenstored.sock")
        self.state_dir = str(tmp / "state")
        self.xenstored = start_server(self.sock)
        self.log_path = str(tmp / "serve.log")
        self.log = open(self.log_path, "w")
        self.options = options
        self.start()
        self.dom0 = Xenstore.open(self.sock)

    def start(self):
        """Start ``blkif serve`` (again, once the last one exited)."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "blkif", "-v", "serve", "--platform", "sim",
             "--sim-path", self.hv.path, "--xenstore", self.sock,
             "--state-dir", self.state_dir, "--grace", "2", *self.options],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def new_vbd(self, image, mode="w", size=8 << 20, fmt=None):
        """A fresh guest domain with one VBD on ``image`` (created if missing:
        raw, or with qemu-img in format ``fmt``, then named ``fmt:image``)."""
        if not os.path.exists(image):
            if fmt is None:
                with open(image, "wb") as f:
                    f.truncate(size)
            else:
                subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(image), str(size)],
                               check=True)
        domid = next(_domids)
        toolstack.introduce(self.dom0, domid)
        params = str(image) if fmt is None else "%s:%s" % (fmt, image)
        devid = toolstack.create(self.dom0, domid, "xvda", params, mode)
        return domid, devid

    def status(self):
        with open(os.path.join(self.state_dir, "service.json")) as f:
            return json.load(f)

    def worker_pid(self, domid, devid, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                for w in self.status()["workers"]:
                    if (w["domid"], w["devid"]) == (domid, devid) and w["status"] == "running":
                        return w["pid"]
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise AssertionError("no running worker for %d/%d" % (domid, devid))

    def output(self):
        with open(self.log_path) as f:
            return f.read()

    def stop(self):
        """SIGTERM; returns the exit status (checks it comes within 10 s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("blkif serve ignored SIGTERM:\n" + self.output())
        return code

    def close(self):
        code = self.stop()
        self.dom0.close()
        stop_server(self.xenstored)
        self.log.close()
        return code


@contextlib.contextmanager
def sim_service(tmp_path_factory, name, *options):
    """A :class:`Service` on a hypervisor of its own, for a test module; it must
    stop cleanly, with no traceback in its log."""
    with SimHypervisor() as hv:
        svc = Service(hv, tmp_path_factory.mktemp(name), *options)
        yield svc
        assert svc.close() == 0, svc.output()
        assert "Traceback" not in svc.output()


class RawFrontend:
    """Domain ``domid``'s side of VBD ``devid``, negotiated by hand."""

    def __init__(self, service, domid, devid):
        self.xs = Xenstore.open(domain_socket_path(service.sock, domid))
        self.platform = open_platform("sim", domid=domid, path=service.hv.path)
        self.front = toolstack.frontend_path(domid, devid)
        self.back = self.xs.read_str(self.front + "/backend")  # vbd or qdisk
        self.queues = []

    def read_back(self, key):
        return self.xs.read_str("%s/%s" % (self.back, key), None)

    def backend_state(self, states, timeout=10):
        return self.xs.wait_for_state(self.back + "/state", states, timeout)

    def offer(self):
        self.backend_state([S.InitWait])
        return BackendOffer.read(self.read_back)

    def setup(self, abi=NATIVE, wants=FrontendWants(max_queues=4), extra=None, pool_pages=600):
        """Grant rings, write the nodes (plus ``extra``), switch Initialised."""
        order, nqueues, indirect, persistent = wants.choose(self.offer())
        self.queues = [FrontQueue(self.platform, 0, abi, order, indirect, pool_pages)
                       for _ in range(nqueues)]
        conn = Connection(tuple(QueueRing(tuple(q.ring_refs), q.port.port) for q in self.queues),
                          order, abi.protocol if abi is not NATIVE else "", persistent)
        nodes = dict(conn.nodes(), **(extra or {}))
        for txn in self.xs.transactions():
            with txn:
                for key in txn.list(self.front):  # an earlier connection's nodes
                    if key not in TOOLSTACK_NODES:
                        txn.rm("%s/%s" % (self.front, key))
                for key, value in nodes.items():
                    txn.write("%s/%s" % (self.front, key), value)
                txn.switch_state(self.front + "/state", S.Initialised)
        return conn

    def connect(self, **kwargs):
        conn = self.setup(**kwargs)
        assert self.backend_state([S.Connected, S.Closing]) == S.Connected
        self.xs.switch_state(self.front + "/state", S.Connected)
        self.disk = DiskInfo.read(self.read_back)
        return conn

    def run(self, queue, tags, timeout=10):
        """Drive ``queue`` until every tag completed; {tag: Completion}."""
        done = {}
        queue.kick()
        deadline = time.monotonic() + timeout
        while not set(tags) <= set(done):
            if time.monotonic() > deadline:
                raise AssertionError("requests never completed: %s"
                                     % sorted(set(tags) - set(done)))
            queue.port.wait(0.2)
            for comp in queue.complete():
                done[comp.tag] = comp
            queue.kick()
        return done

    def close(self):
        """Closing, wait for the backend, release, Closed."""
        self.xs.switch_state(self.front + "/state", S.Closing)
        self.backend_state([S.Closing, S.Closed])
        self.xs.switch_state(self.front + "/state", S.Closed)
        self.backend_state([S.Closed])
        self.release()

    def release(self):
        for q in self.queues:
            q.close()
        self.queues = []

    def shutdown(self):
        self.release()
        self.platform.close()
        self.xs.close()


def error_node(service, domid, devid):
    return service.dom0.read_str("/local/domain/0/error/backend/vbd/%d/%d/error"
                                 % (domid, devid), None)


def status_after_tick(service, domid, devid, timeout=5.0):
    """A worker's status file once it has ticked since the call (rewritten,
    or touched if unchanged): what it says covers everything done before."""
    path = status.vbd_file(service.state_dir, domid, devid)
    since = time.time()
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.stat(path).st_mtime > since:
                return status.read_vbd(service.state_dir, domid, devid)
        except FileNotFoundError:
            pass
        assert time.monotonic() < deadline, "no status tick in %.0f s: %s" % (timeout, path)
        time.sleep(0.05)
