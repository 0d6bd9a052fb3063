"""``backendtype=qdisk`` disks as libxl makes them, served by ``blkif serve``.

``blkif-device-model`` is started with the argv libxl 4.17 gives a PV guest's
device model and judged as libxl judges it (QMP socket, ``running`` node,
QMP answers); the VBD is a qcow2 image under ``backend/qdisk`` written by our
frontend; ``xl destroy`` is imitated as libxl does it (SIGHUP to the device
model, both directories removed with no handshake) and ``qemu-img`` checks
the image afterwards.  The real thing is the lab's ``qdisk`` phase.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from backend_fixtures import RawFrontend, sim_service
from blkif import devicemodel, toolstack
from blkif.backend.service import served_types
from blkif.errors import UsageError
from blkif.negotiate import FrontendWants
from helpers import require_tool
from test_storage import SIZE, make_base, qemu_img, write_workload
from xenstore import XenbusState as S
from xenstore_fixtures import ROOT

ONE_QUEUE = FrontendWants(0, 1, 0, False)


def libxl_argv(domid, run_dir):
    """What libxl 4.17 execs a PV guest's device model with (xenlab.md)."""
    return ["-xen-domid", str(domid), "-no-shutdown",
            "-chardev", "socket,id=libxl-cmd,path=%s/qmp-libxl-%d,server=on,wait=off"
            % (run_dir, domid),
            "-mon", "chardev=libxl-cmd,mode=control",
            "-chardev", "socket,id=libxenstat-cmd,path=%s/qmp-libxenstat-%d,server=on,wait=off"
            % (run_dir, domid),
            "-mon", "chardev=libxenstat-cmd,mode=control",
            "-nodefaults", "-no-user-config", "-xen-attach", "-name", "guest%d" % domid,
            "-vnc", "none", "-display", "none", "-nographic", "-machine", "xenpv",
            "-m", "257"]


# -- sans-I/O -------------------------------------------------------------

def test_the_qmp_sockets_and_domain_come_from_libxls_argv(tmp_path):
    domid, paths = devicemodel.parse_qemu_argv(libxl_argv(7, tmp_path))
    assert domid == 7
    assert paths == ["%s/qmp-libxl-7" % tmp_path, "%s/qmp-libxenstat-7" % tmp_path]
    # QEMU's older spelling of a server socket, and a chardev no monitor uses
    old = ["-xen-domid", "3", "-chardev", "socket,id=m,path=/r/q,server,nowait",
           "-chardev", "socket,id=serial,path=/r/s,server=on", "-mon", "chardev=m,mode=control"]
    assert devicemodel.parse_qemu_argv(old) == (3, ["/r/q"])


@pytest.mark.parametrize("argv,words", [
    (["-chardev", "socket,id=m,path=/q,server=on", "-mon", "chardev=m,mode=control"],
     "no -xen-domid"),
    (["-xen-domid", "x1"], "not a domain id"),
    (["-xen-domid", "1", "-mon", "chardev=m,mode=control"], "no QMP socket"),
    (["-xen-domid", "1", "-chardev", "socket,id=m,path=/q,server=off",
      "-mon", "chardev=m,mode=control"], "no QMP socket"),
    (["-xen-domid"], "needs a value"),
])
def test_an_argv_we_cannot_serve_is_a_usage_error(argv, words):
    with pytest.raises(UsageError, match=words):
        devicemodel.parse_qemu_argv(argv)


def test_qmp_answers():
    assert devicemodel.answer({"execute": "qmp_capabilities", "id": 1}) == (
        {"return": {}, "id": 1}, False)
    assert devicemodel.answer({"execute": "query-chardev", "id": "x"}) == (
        {"return": [], "id": "x"}, False)
    assert devicemodel.answer({"execute": "quit"}) == ({"return": {}}, True)
    reply, _ = devicemodel.answer({"execute": "device_add", "id": 2})
    assert reply["error"]["class"] == "CommandNotFound" and reply["id"] == 2
    assert devicemodel.answer([1])[0]["error"]["class"] == "GenericError"


def test_served_types(tmp_path):
    loaded, absent = tmp_path / "xen_blkback", tmp_path / "absent"
    loaded.mkdir()
    assert served_types("auto", "xen", str(absent)) == ("vbd", "qdisk")
    assert served_types("auto", "xen", str(loaded)) == ("qdisk",)
    assert served_types("auto", "sim", str(loaded)) == ("vbd", "qdisk")
    assert served_types("qdisk,qdisk", "xen", str(loaded)) == ("qdisk",)
    with pytest.raises(UsageError, match="xen-blkback is loaded"):
        served_types("vbd,qdisk", "xen", str(loaded))
    for bad in ("tap", "", "vbd,,nbd"):
        with pytest.raises(UsageError, match="--types"):
            served_types(bad, "xen", str(absent))


# -- processes --------------------------------------------------------------

@pytest.fixture(scope="module")
def service(tmp_path_factory):
    for name in ("qemu-img", "qemu-storage-daemon"):
        require_tool(name)
    with sim_service(tmp_path_factory, "serve", "--types", "qdisk") as svc:
        yield svc


def start_device_model(service, domid, run_dir, state_dir=None):
    env = dict(os.environ, XENSTORED_PATH=service.sock,
               BLKIF_STATE_DIR=state_dir or service.state_dir)
    return subprocess.Popen([sys.executable, "-m", "blkif.devicemodel",
                             *libxl_argv(domid, run_dir)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_running(service, dm, domid, timeout=15):
    node = "/local/domain/0/device-model/%d/state" % domid
    deadline = time.monotonic() + timeout
    while service.dom0.read_str(node, None) != "running":
        assert dm.poll() is None, dm.stdout.read()
        assert time.monotonic() < deadline, "the device model never wrote running"
        time.sleep(0.05)


def qmp(path, *commands):
    """libxl's side of a QMP exchange: the greeting, then a reply per command."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        reader = sock.makefile("r")
        messages = [json.loads(reader.readline())]
        for i, name in enumerate(commands):
            sock.sendall(json.dumps({"execute": name, "id": i}).encode() + b"\r\n")
            messages.append(json.loads(reader.readline()))
        return messages


def wait_service_state(service, timeout=15):
    """service.json once the service watches xenstore (the device model checks it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if service.status()["state"] == "running":
                return service.status()
        except (OSError, ValueError):
            pass
        assert time.monotonic() < deadline, service.output()
        time.sleep(0.05)


def test_a_qcow2_disk_lives_and_dies_as_xl_makes_it(service, tmp_path):
    assert wait_service_state(service)["types"] == ["qdisk"]
    base, copy = make_base(tmp_path)
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", image)
    domid = 61
    toolstack.introduce(service.dom0, domid)
    dm = start_device_model(service, domid, tmp_path)
    try:
        wait_running(service, dm, domid)
        greeting, caps, chardevs, other = qmp(
            "%s/qmp-libxl-%d" % (tmp_path, domid), "qmp_capabilities", "query-chardev",
            "query-status")
        assert greeting["QMP"]["version"]["qemu"]["major"] >= 4
        assert caps == {"return": {}, "id": 0} and chardevs == {"return": [], "id": 1}
        assert other["error"]["class"] == "CommandNotFound"
        qmp("%s/qmp-libxenstat-%d" % (tmp_path, domid))  # the second socket greets too

        devid = toolstack.create(service.dom0, domid, "xvda", "qcow2:%s" % image, kind="qdisk")
        back = toolstack.backend_path(0, domid, devid, "qdisk")
        fe = RawFrontend(service, domid, devid)
        try:
            assert fe.back == back
            fe.connect(wants=ONE_QUEUE)
            assert fe.disk.sectors * 512 == SIZE
            write_workload(fe, copy, seed=5)
            # xl destroy (seen in the lab): SIGHUP to the device model; the
            # backend switched to Closing and both directories removed at once,
            # with no wait; the guest's grants go once the backend let go
            dm.send_signal(signal.SIGHUP)
            assert dm.wait(10) == 0, dm.stdout.read()
            service.dom0.write(back + "/state", str(int(S.Closing)))
            for txn in service.dom0.transactions():
                with txn:
                    txn.rm(toolstack.frontend_path(domid, devid))
                    txn.rm(back)
            _wait_gone(service, domid, devid, image)
            time.sleep(1)  # a late state write would bring the directory back
            assert not service.dom0.exists(back)
            assert not any((w["domid"], w["devid"]) == (domid, devid)
                           for w in service.status()["workers"])
        finally:
            fe.shutdown()
    finally:
        if dm.poll() is None:
            dm.kill()
        out = dm.stdout.read()
    assert "device model running" in out and "SIGHUP" in out, out
    assert not os.path.exists("%s/qmp-libxl-%d" % (tmp_path, domid))
    qemu_img("check", "-q", "-f", "qcow2", image)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", image, copy)


def _wait_gone(service, domid, devid, image, timeout=15):
    deadline = time.monotonic() + timeout
    while any((w["domid"], w["devid"]) == (domid, devid) for w in service.status()["workers"]) \
            or subprocess.run(["pgrep", "-f", "qemu-storage-daemon.*%s" % image],
                              capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the VBD's worker or daemon outlived xl destroy"
        time.sleep(0.1)


def test_the_device_model_ends_with_its_domain(service, tmp_path):
    wait_service_state(service)
    domid = 62
    toolstack.introduce(service.dom0, domid)
    dm = start_device_model(service, domid, tmp_path)
    try:
        wait_running(service, dm, domid)
        service.dom0.rm("/local/domain/%d" % domid)
        assert dm.wait(15) == 0
    finally:
        if dm.poll() is None:
            dm.kill()
    assert "domain 62 is gone" in dm.stdout.read()


def test_a_vbd_type_disk_is_left_to_the_kernel(service, tmp_path):
    """A service serving qdisk only never touches backend/vbd (kernel blkback's)."""
    wait_service_state(service)
    image = tmp_path / "raw.img"
    image.write_bytes(bytes(1 << 20))
    domid = 63
    toolstack.introduce(service.dom0, domid)
    devid = toolstack.create(service.dom0, domid, "xvdb", str(image))
    qdisk = toolstack.create(service.dom0, domid, "xvdc", str(image), "r", kind="qdisk")
    fe = RawFrontend(service, domid, qdisk)
    try:
        fe.offer()  # the qdisk VBD reaches InitWait...
        time.sleep(1)  # ...and the vbd one, created first, stays untouched
        back = toolstack.backend_path(0, domid, devid)
        assert service.dom0.read_state(back + "/state") == S.Initialising
        assert (domid, devid) not in [(w["domid"], w["devid"])
                                      for w in service.status()["workers"]]
    finally:
        fe.shutdown()
        toolstack.destroy(service.dom0, domid, "xvdb")
        toolstack.destroy(service.dom0, domid, "xvdc")


@pytest.mark.parametrize("case", ["no service", "vbd only"])
def test_without_a_qdisk_service_the_device_model_refuses(tmp_path, case):
    """xl create then fails ("device model did not start"), with the reason in its log."""
    state = tmp_path / "state"
    state.mkdir()
    if case == "vbd only":
        (state / "service.json").write_text(json.dumps(
            {"pid": os.getpid(), "state": "running", "types": ["vbd"]}))
    env = dict(os.environ, BLKIF_STATE_DIR=str(state), XENSTORED_PATH=str(tmp_path / "none"))
    proc = subprocess.run([sys.executable, "-m", "blkif.devicemodel", *libxl_argv(5, tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()[-1:]
    assert line.startswith("blkif-device-model: error: ")
    assert ("no blkif serve is running" if case == "no service"
            else "does not serve qdisk") in line
    assert "Traceback" not in proc.stderr
    assert not os.path.exists("%s/qmp-libxl-5" % tmp_path)


def test_help_says_how_it_is_started():
    proc = subprocess.run([sys.executable, "-m", "blkif.devicemodel", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: blkif-device-model")
    assert "device_model_override" in proc.stdout and not proc.stderr
