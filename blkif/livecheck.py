"""``blkif calc --check``: read a live host's limits into a sizing.Host.

Every input is injectable, so tests feed fake trees and command output:
``root`` prefixes /sys, /proc and /etc (default "/"), ``xl_info`` is a
callable returning ``xl info``'s text (or None where there is no xl),
``state_dir`` is our service's state directory.

dom0 (xen_blkback loaded, ``xl info`` answers, or our state files): Xen's
limits from its command line (``gnttab_max_frames``,
``gnttab_max_maptrack_frames``), the guests' default grant table size from
/etc/xen/xl.conf, blkback's parameters and its VBDs under
/sys/bus/xen-backend/devices, or the VBDs our service connected.  A guest
(xen_blkfront loaded): blkfront's parameters, vCPUs, MemTotal and its xvd disks.
What is not on this host (the other end's settings) stays as given.
"""
import glob
import json
import os
import re
import subprocess
from dataclasses import replace

from blkif import sizing
from blkif.errors import BlkifError


def read_params(root, module):
    """``{name: text}`` of /sys/module/<module>/parameters; {} when not loaded."""
    out = {}
    for path in sorted(glob.glob(os.path.join(root, "sys/module", module, "parameters", "*"))):
        try:
            with open(path) as f:
                out[os.path.basename(path)] = f.read().strip()
        except OSError:
            continue
    return out


def parse_xl_info(text):
    """``xl info`` text -> ``{key: value}``."""
    out = {}
    for line in (text or "").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def cmdline_option(cmdline, name):
    """The integer value of ``name=N`` on a Xen command line, or None."""
    m = re.search(r"(?:^|\s)%s=(\d+)" % re.escape(name), cmdline or "")
    return int(m.group(1)) if m else None


def xl_conf(path):
    """``{key: int}`` of the numeric settings in xl.conf; {} if missing."""
    out = {}
    try:
        with open(path) as f:
            for line in f:
                m = re.match(r"\s*(\w+)\s*=\s*(-?\d+)\s*(#.*)?$", line)
                if m:
                    out[m.group(1)] = int(m.group(2))
    except OSError:
        pass
    return out


def run_xl_info():
    """``xl info`` output, or None where xl is missing or fails."""
    try:
        out = subprocess.run(["xl", "info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def _flag(text):
    return text.strip() in ("1", "Y", "y")


def _int(params, key, default):
    try:
        return int(params[key])
    except (KeyError, ValueError):
        return default


def our_vbds(state_dir):
    """The negotiated values of every VBD our service has connected."""
    out = []
    for path in sorted(glob.glob(os.path.join(state_dir or "", "vbd-*.json"))):
        try:
            with open(path) as f:
                vbd = json.load(f)
        except (OSError, ValueError):
            continue
        if vbd.get("negotiated"):
            out.append(vbd)
    return out


def inspect(host, root="/", xl_info=run_xl_info, state_dir=None):
    """(Host with what this system says, [what was read from where]).

    Raises BlkifError when the system shows neither end of a Xen block device.
    """
    found = []
    front = read_params(root, "xen_blkfront")
    back = read_params(root, "xen_blkback")
    info = parse_xl_info(xl_info()) if xl_info else {}
    ours = our_vbds(state_dir)
    if not (front or back or info or ours):
        raise BlkifError("no Xen block driver here: neither xen_blkfront nor xen_blkback "
                         "parameters under %s, no `xl info`, no VBDs in %s"
                         % (os.path.join(root, "sys/module"), state_dir or "(no state dir)"))
    if info:
        cmdline = info.get("xen_commandline", "")
        maptrack = cmdline_option(cmdline, "gnttab_max_maptrack_frames")
        host = replace(host, max_maptrack_frames=maptrack or sizing.MAX_MAPTRACK_FRAMES)
        found.append("xl info: xen_commandline gnttab_max_maptrack_frames=%s"
                     % (maptrack if maptrack else "(default %d)" % sizing.MAX_MAPTRACK_FRAMES))
        conf = xl_conf(os.path.join(root, "etc/xen/xl.conf"))
        frames = conf.get("max_grant_frames", -1)
        if frames < 0:
            frames = cmdline_option(cmdline, "gnttab_max_frames") or sizing.MAX_GRANT_FRAMES
        host = replace(host, max_grant_frames=frames)
        found.append("guests' max_grant_frames %d (xl.conf, else Xen's gnttab_max_frames)" % frames)
    if back:
        be = host.backend
        host = replace(host, backend=replace(
            be, kind="blkback",
            max_persistent_grants=_int(back, "max_persistent_grants", be.max_persistent_grants),
            max_ring_page_order=_int(back, "max_ring_page_order", be.max_ring_page_order),
            # 0 is blkback's "one per CPU" (xen_blkif_init)
            max_queues=min(_int(back, "max_queues", 0) or _cpus(root) or be.max_queues,
                           sizing.MAX_QUEUES),
            persistent=_flag(back.get("feature_persistent", "Y"))))
        vbds = len(glob.glob(os.path.join(root, "sys/bus/xen-backend/devices/vbd-*")))
        if vbds:
            host = replace(host, guests=vbds, disks=1)
        found.append("xen_blkback parameters: %s; %d VBDs" % (
            " ".join("%s=%s" % kv for kv in sorted(back.items())), vbds))
    elif ours:
        neg = ours[0]["negotiated"]
        host = replace(host, guests=len(ours), disks=1, backend=sizing.Backend.ours(
            max_ring_page_order=host.backend.max_ring_page_order,
            max_queues=max(v["negotiated"].get("queues", 1) for v in ours),
            max_indirect_segments=neg.get("max_indirect_segments", 0),
            persistent=any(v["negotiated"].get("persistent") for v in ours)))
        found.append("blkif serve state in %s: %d VBDs connected" % (state_dir, len(ours)))
    if front:
        fe = host.frontend
        host = replace(host, frontend=replace(
            fe,
            max_indirect_segments=_int(front, "max_indirect_segments", fe.max_indirect_segments),
            max_ring_page_order=_int(front, "max_ring_page_order", fe.max_ring_page_order),
            max_queues=min(_int(front, "max_queues", fe.max_queues), sizing.MAX_QUEUES),
            feature_persistent=_flag(front.get("feature_persistent", "Y")),
            trusted=_flag(front.get("trusted", "Y")),
            vcpus=_cpus(root) or fe.vcpus,
            memory_mib=_memtotal_mib(root) or fe.memory_mib))
        disks = len(glob.glob(os.path.join(root, "sys/block/xvd*")))
        host = replace(host, guests=1, disks=disks or host.disks)
        found.append("xen_blkfront parameters: %s; %d vCPUs, %s MiB, %d xvd disks" % (
            " ".join("%s=%s" % kv for kv in sorted(front.items())), host.frontend.vcpus,
            host.frontend.memory_mib, disks))
    return host, found


def _cpus(root):
    """Number of CPUs in /sys/devices/system/cpu/online ("0-3,5")."""
    try:
        with open(os.path.join(root, "sys/devices/system/cpu/online")) as f:
            text = f.read().strip()
    except OSError:
        return None
    count = 0
    for part in text.split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


def _memtotal_mib(root):
    try:
        with open(os.path.join(root, "proc/meminfo")) as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
