"""Disks larger than 2 TiB: sector numbers past 2**32 end to end.

blkif.h's ``blkif_sector_t`` is 64 bits; a backend (or frontend) that kept
sectors in 32 bits would wrap a write at 3 TiB onto sector 2**32 lower.  A
sparse raw file and a qcow2 image, each 4 TiB, served by ``blkif serve`` on
the sim: our frontend writes just past 2 TiB and near the end, reads back,
and the bytes are checked where they must be in the file (or, for qcow2,
through ``qemu-io``) and absent where a wrap would have put them.
"""
import os
import subprocess

import pytest

from backend_fixtures import RawFrontend, sim_service
from blkif import toolstack
from blkif.negotiate import FrontendWants
from helpers import require_tool

SIZE = 4 << 40
AT = [(2 << 40) + (1 << 20), SIZE - (64 << 10)]  # past sector 2**32, and the last 64 KiB
ONE_QUEUE = FrontendWants(0, 1, 0, False)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with sim_service(tmp_path_factory, "serve") as svc:
        yield svc


def _connected(service, domid, params):
    toolstack.introduce(service.dom0, domid)
    devid = toolstack.create(service.dom0, domid, "xvda", params)
    fe = RawFrontend(service, domid, devid)
    fe.connect(wants=ONE_QUEUE)
    return fe


def _write_and_read(fe):
    q = fe.queues[0]
    assert fe.disk.sectors * 512 == SIZE
    blocks = {}
    for i, offset in enumerate(AT):
        blocks[offset] = bytes([0x40 + i]) * (64 << 10)
        tag = q.submit_write(offset, blocks[offset])
        assert fe.run(q, [tag])[tag].ok
        tag = q.submit_read(offset, 64 << 10)
        comp = fe.run(q, [tag])[tag]
        assert comp.ok and comp.data == blocks[offset]
    tag = q.submit_flush()
    assert fe.run(q, [tag])[tag].ok
    return blocks


def test_a_sparse_raw_file_of_4_tib(service, tmp_path):
    image = tmp_path / "big.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    fe = _connected(service, 71, str(image))
    try:
        blocks = _write_and_read(fe)
        fe.close()
    finally:
        fe.shutdown()
    with open(image, "rb") as f:
        for offset, data in blocks.items():
            f.seek(offset)
            assert f.read(len(data)) == data
            f.seek(offset - (2 << 40))  # where 32-bit sectors would have put it
            assert f.read(len(data)) == bytes(len(data))


def test_a_qcow2_image_of_4_tib(service, tmp_path):
    for tool in ("qemu-img", "qemu-io", "qemu-storage-daemon"):
        require_tool(tool)
    image = tmp_path / "big.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE)],
                   check=True)
    fe = _connected(service, 72, "qcow2:%s" % image)
    try:
        blocks = _write_and_read(fe)
        fe.close()
    finally:
        fe.shutdown()
        service.dom0.rm(toolstack.backend_path(0, 72, toolstack.vdev_to_devid("xvda")))
    for offset, data in blocks.items():
        for where, byte in ((offset, data[0]), (offset - (2 << 40), 0)):
            proc = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-U", "-c",
                                   "read -P 0x%02x %d 65536" % (byte, where), str(image)],
                                  capture_output=True, text=True)
            assert proc.returncode == 0 and "Pattern verification failed" not in proc.stdout, \
                (where, proc.stdout, proc.stderr)
