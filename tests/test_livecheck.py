"""``blkif calc --check`` over fake sysfs trees and fake ``xl info`` output."""
import json
import subprocess
import sys

import pytest

from blkif import livecheck, sizing
from blkif.errors import BlkifError

XL_INFO = """host                   : lab
xen_version            : 4.17.6-pre
xen_commandline        : placeholder dom0_mem=1G,max:1G gnttab_max_maptrack_frames=256 console=com1
nr_cpus                : 2
"""


def _tree(root, files):
    for path, text in files.items():
        p = root / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return str(root)


def _blkback(root, vbds=2, **params):
    params = dict(dict(max_persistent_grants=1056, max_ring_page_order=4, max_queues=2,
                       feature_persistent="Y"), **params)
    files = {"sys/module/xen_blkback/parameters/%s" % k: "%s\n" % v for k, v in params.items()}
    files.update({"sys/bus/xen-backend/devices/vbd-%d-51712/uevent" % (i + 1): ""
                  for i in range(vbds)})
    return _tree(root, files)


def _guest(root, **params):
    params = dict(dict(max_indirect_segments=512, max_ring_page_order=4, max_queues=4,
                       feature_persistent="Y", trusted="Y"), **params)
    files = {"sys/module/xen_blkfront/parameters/%s" % k: "%s\n" % v for k, v in params.items()}
    files.update({
        "sys/devices/system/cpu/online": "0-1\n",
        "proc/meminfo": "MemTotal:         503412 kB\nMemFree:  1 kB\n",
        "sys/block/xvda/size": "131072\n",
        "sys/block/xvdb/size": "131072\n",
        "sys/block/loop0/size": "0\n",
    })
    return _tree(root, files)


def test_dom0_reads_xen_limits_and_blkback(tmp_path):
    root = _blkback(tmp_path, vbds=3, max_persistent_grants=64)
    _tree(tmp_path, {"etc/xen/xl.conf": "# xl.conf\nmax_grant_frames=128\nautoballoon=\"off\"\n"})
    host, read = livecheck.inspect(sizing.Host(), root, lambda: XL_INFO)
    assert host.max_maptrack_frames == 256
    assert host.max_grant_frames == 128
    assert host.backend.kind == "blkback" and host.backend.max_persistent_grants == 64
    assert host.backend.max_queues == 2
    assert host.guests == 3
    assert any("xen_blkback parameters" in line for line in read)


def test_blkback_max_queues_0_means_one_per_cpu(tmp_path):
    root = _blkback(tmp_path, max_queues=0)
    _tree(tmp_path, {"sys/devices/system/cpu/online": "0-5\n"})
    host, _ = livecheck.inspect(sizing.Host(), root, None)
    assert host.backend.max_queues == 6


def test_dom0_defaults_when_the_command_line_and_xl_conf_say_nothing(tmp_path):
    host, _ = livecheck.inspect(sizing.Host(), _blkback(tmp_path),
                                lambda: "xen_commandline : console=com1\n")
    assert (host.max_grant_frames, host.max_maptrack_frames) == (64, 1024)
    xl = "xen_commandline : gnttab_max_frames=32\n"
    assert livecheck.inspect(sizing.Host(), str(tmp_path), lambda: xl)[0].max_grant_frames == 32


def test_guest_reads_blkfront_cpus_memory_disks(tmp_path):
    host, _ = livecheck.inspect(sizing.Host(), _guest(tmp_path), None)
    fe = host.frontend
    assert (fe.max_indirect_segments, fe.max_ring_page_order, fe.max_queues) == (512, 4, 4)
    assert (fe.vcpus, fe.memory_mib, host.disks) == (2, 491, 2)
    warnings = sizing.plan(host).warnings
    assert ("error", "guest memory") in [w[:2] for w in warnings]


def test_our_service_state(tmp_path):
    vbd = {"domid": 3, "negotiated": {"queues": 2, "ring_page_order": 2, "persistent": True,
                                      "max_indirect_segments": 256}}
    (tmp_path / "vbd-3-51712.json").write_text(json.dumps(vbd))
    (tmp_path / "vbd-4-51712.json").write_text(json.dumps(dict(vbd, negotiated={})))
    host, read = livecheck.inspect(sizing.Host(), str(tmp_path / "root"), None, str(tmp_path))
    assert host.backend.kind == "blkif" and host.guests == 1
    assert host.backend.max_indirect_segments == 256 and host.backend.max_queues == 2


def test_nothing_there_is_one_error(tmp_path):
    with pytest.raises(BlkifError, match="no Xen block driver here"):
        livecheck.inspect(sizing.Host(), str(tmp_path), lambda: None, str(tmp_path))


@pytest.mark.parametrize("text,expected", [
    ("dom0_mem=1G gnttab_max_maptrack_frames=4096", 4096),
    ("xgnttab_max_maptrack_frames=12", None),
    ("", None),
])
def test_cmdline_option(text, expected):
    assert livecheck.cmdline_option(text, "gnttab_max_maptrack_frames") == expected


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "blkif", "calc", *args],
                          capture_output=True, text=True)


def test_cli_check_guest_exits_1_and_names_the_parameter(tmp_path):
    out = _cli("--check", "--root", _guest(tmp_path), "--xl-info", "/dev/null",
               "--state-dir", str(tmp_path / "none"))
    assert out.returncode == 1, out.stderr
    assert "read: xen_blkfront parameters" in out.stdout
    assert "error: blkfront preallocates" in out.stdout and "max_indirect_segments" in out.stdout


def test_cli_check_healthy_dom0_exits_0_json(tmp_path):
    info = tmp_path / "xl-info.txt"
    info.write_text(XL_INFO.replace("gnttab_max_maptrack_frames=256", ""))
    out = _cli("--check", "--json", "--root", _blkback(tmp_path / "root"), "--xl-info", str(info),
               "--state-dir", str(tmp_path / "none"))
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["config"]["guests"] == 2
    assert not [w for w in result["warnings"] if w["level"] == "error"]


def test_cli_check_unreadable_xl_info_is_one_line(tmp_path):
    out = _cli("--check", "--xl-info", str(tmp_path / "missing"))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "--xl-info" in out.stderr
