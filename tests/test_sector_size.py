"""4K-sector storage end to end: ``blkif serve`` on the sim platform serving a
real 4K-sector device (a loop device with 4096-byte logical sectors), a
frontend negotiated by hand putting raw requests on the ring, and our own
frontend doing I/O; both engines."""
import contextlib
import os

import pytest

import helpers
from backend_fixtures import RawFrontend, Service
from blkif.abi import constants as c
from blkif.frontend import BlockDevice, FrontendOptions
from blkif.negotiate import FrontendWants
from blkif.platform import open_platform
from blkif.platform.sim import SimHypervisor
from xenstore import XenbusState as S
from xenstore import Xenstore, domain_socket_path

MIB = 1 << 20
OKAY, ERROR = c.BLKIF_RSP_OKAY, c.BLKIF_RSP_ERROR
R, W, DISCARD = c.BLKIF_OP_READ, c.BLKIF_OP_WRITE, c.BLKIF_OP_DISCARD


def _raw(fe, build, count):
    """Responses {id: (operation, status)} to the requests ``build`` puts on queue 0."""
    import time

    q = fe.queues[0]
    build(q.encoder, q.ring)
    if q.ring.push_requests():
        q.port.notify()
    got, deadline = {}, time.monotonic() + 10
    while len(got) < count:
        assert time.monotonic() < deadline, got
        q.port.wait(0.2)
        while q.ring.pending_responses():
            rid, op, status = q.encoder.take_response(q.ring)
            got[rid] = (op, status)
    return got


@contextlib.contextmanager
def _device(service, domid):
    with Xenstore.open(domain_socket_path(service.sock, domid)) as xs, \
            open_platform("sim", domid=domid, path=service.hv.path) as platform:
        dev = BlockDevice.attach(xs, platform, domid, "xvda", FrontendOptions(timeout=10))
        try:
            yield dev
        finally:
            dev.detach()


@pytest.mark.parametrize("engine", ["c", "python"])
def test_a_4k_sector_device(tmp_path, engine):
    backing = tmp_path / "4k.img"
    backing.write_bytes(bytes(8 * MIB))
    with helpers.loop_device(backing, sector_size=4096) as dev, SimHypervisor() as hv:
        service = Service(hv, tmp_path, "--engine", engine)
        try:
            domid, devid = service.new_vbd(dev)
            fe = RawFrontend(service, domid, devid)
            try:
                fe.connect(wants=FrontendWants(0, 1, 0, False))
                # blkif.h: sector-size is the device's, sectors stay 512-byte units
                assert (fe.disk.sector_size, fe.disk.physical_sector_size) == (4096, 4096)
                assert fe.disk.sectors == 8 * MIB // 512
                assert fe.read_back("discard-granularity") == "4096"
                assert fe.read_back("discard-alignment") == "0"
                assert fe.read_back("discard-secure") == "0"
                ref = fe.queues[0].pool.refs[0]

                def build(enc, ring):
                    enc.rw(ring, R, 1, 8, [(ref, 0, 7)])  # one whole 4 KiB sector
                    enc.rw(ring, R, 2, 4, [(ref, 0, 7)])  # starts inside a sector
                    enc.rw(ring, W, 3, 8, [(ref, 0, 3)])  # half a sector
                    enc.discard(ring, 4, 16, 4)  # half a sector
                    enc.discard(ring, 5, 16, 8)
                    enc.rw(ring, W, 6, 24, [(ref, 0, 7)])
                got = _raw(fe, build, 6)
                assert got == {1: (R, OKAY), 2: (R, ERROR), 3: (W, ERROR),
                               4: (DISCARD, ERROR), 5: (DISCARD, OKAY), 6: (W, OKAY)}
                assert fe.read_back("state") == str(int(S.Connected))  # refused, not closed
                fe.close()
            finally:
                fe.shutdown()
            with _device(service, domid) as disk:
                assert disk.negotiated["sector_size"] == 4096
                payload = os.urandom(3 * 4096)
                disk.write(5 * 4096, payload)
                disk.flush()
                assert disk.read(5 * 4096, len(payload)) == payload
        finally:
            assert service.close() == 0, service.output()
        with open(dev, "rb") as f:  # through the device itself: what the backend wrote
            f.seek(5 * 4096)
            assert f.read(len(payload)) == payload
    assert "Traceback" not in service.output()


def test_the_backend_sees_only_what_was_sent_to_it(tmp_path):
    """XSA-403 (trusted=0): a 512-byte write out of a larger buffer puts those
    512 bytes in a granted page and nothing else of the caller's memory."""
    with SimHypervisor() as hv:
        service = Service(hv, tmp_path)
        try:
            domid, devid = service.new_vbd(tmp_path / "disk.img")
            service.dom0.write("/local/domain/%d/device/vbd/%d/trusted" % (domid, devid), "0")
            with _device(service, domid) as disk:
                secret = b"S" * 4096
                caller = bytearray(secret + b"p" * 512 + secret)
                disk.write(4096, memoryview(caller)[4096:4096 + 512])
                assert disk.negotiated["trusted"] is False and disk.negotiated["bounce"]
                granted = b"".join(bytes(q.pool.buffer) for q in disk.queues)
                assert granted.count(b"p") == 512 and b"S" not in granted
                assert granted.strip(b"\0") == b"p" * 512
        finally:
            assert service.close() == 0, service.output()
