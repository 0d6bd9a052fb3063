"""blkif.lab.qdisk: the judgements of the qdisk phase (the phase itself runs in
``make lab``)."""
import hashlib
import os
import subprocess

from blkif.backend import status
from blkif.lab import phases, qdisk
from helpers import require_tool


def test_disks_and_xl_config():
    specs = qdisk.disks("/dev/loop3")
    text = phases.xl_config("lab-qdisk", "/k", "/r", specs, "x",
                            options={"device_model_override": "/v/bin/blkif-device-model"})
    assert 'disk = ["phy:/dev/loop3,xvda,w", "format=qcow2,vdev=xvdb,access=rw,' \
           'backendtype=qdisk,target=/run/lab/qdisk.qcow2"]' in text
    assert 'device_model_override = "/v/bin/blkif-device-model"' in text
    assert qdisk.device_model("/p/.venv/bin/python") == "/p/.venv/bin/blkif-device-model"


NODES_OUT = """\
/local/domain/0/backend/vbd/3/51712 4
/local/domain/3/device/vbd/51712 4
/local/domain/0/backend/qdisk/3/51728 4
/local/domain/3/device/vbd/51728 4
device-model running
"""


def test_both_connected():
    assert qdisk.both_connected(NODES_OUT, 3)[0] == "pass"
    status, detail = qdisk.both_connected(NODES_OUT.replace("51728 4", "51728 2", 1), 3)
    assert status == "fail" and "0/backend/qdisk/3/51728=2" in detail
    assert qdisk.both_connected(NODES_OUT.replace("running", ""), 3)[0] == "fail"
    assert qdisk.both_connected("\n".join(NODES_OUT.splitlines()[:2]), 3)[0] == "fail"


def test_serves_only_qdisk():
    line = "INFO blkif.backend.service: serving VBDs under %s (state in /run/blkif)"
    assert qdisk.serves_only_qdisk(line % "/local/domain/0/backend/qdisk")[0] == "pass"
    both = line % "/local/domain/0/backend/vbd and /local/domain/0/backend/qdisk"
    assert qdisk.serves_only_qdisk(both)[0] == "fail"
    assert qdisk.serves_only_qdisk("")[0] == "fail"


def test_image_checks_on_a_real_qcow2(tmp_path):
    require_tool("qemu-img")
    image = str(tmp_path / "d.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "4M"], check=True)
    data = b"\x5a" * 65536
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", image],
                   check=True, capture_output=True)
    md5s = {0: (1 << 20, 65536, hashlib.md5(data).hexdigest())}
    assert qdisk.qemu_img_check(image)[0] == "pass"
    assert qdisk.qcow2_matches(image, md5s, (2 << 20, 65536))[0] == "pass"
    assert qdisk.qcow2_matches(image, {0: (0, 65536, md5s[0][2])}, None)[0] == "fail"
    assert qdisk.qcow2_matches(image, md5s, (1 << 20, 4096))[0] == "fail"  # not zeros
    with open(image, "r+b") as f:  # break the header's magic
        f.write(b"XXXX")
    assert qdisk.qemu_img_check(image)[0] == "fail"


def test_the_readiness_wait_reads_the_service_status_as_written(tmp_path):
    """The shell loop the phase runs in dom0, against service.json as
    `blkif serve` writes it."""
    pidfile = tmp_path / "serve.pid"
    pidfile.write_text(str(os.getpid()))
    log = tmp_path / "serve.log"
    log.write_text("starting\n")

    def wait():
        script = qdisk.WAIT_SERVING.format(tries=2, seconds=1, state=tmp_path,
                                           pidfile=pidfile, log=log)
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                              timeout=30)

    status.write_status(str(tmp_path / "service.json"), {"pid": 1, "state": "starting"})
    assert wait().returncode == 1
    status.write_status(str(tmp_path / "service.json"), {"pid": 1, "state": "running"})
    assert wait().returncode == 0
