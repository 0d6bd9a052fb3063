"""The calculator (blkif.sizing) against what real Xen guests use.

The guest init loads xen-blkfront last and reports MemFree just before and
once /dev/xvda exists (``memfree_before_kb``/``memfree_after_kb``): the drop is
what blkfront took, which must match ``guest_prealloc_bytes`` within
MEMORY_TOLERANCE.  Where filling every ring costs at most 16 MiB per queue it
then reads ``nr_requests x max_hw_sectors_kb`` at once from each CPU
(``fill_kb``), so blkfront uses every grant it preallocated.

``xl debug-keys g`` then makes Xen print each domain's grant table
(grant_table.c ``gnttab_usage_print``: frames in use and the maximum, maptrack
frames and their maximum, one line per entry another domain has mapped) on its
serial console, which the host reads from logs/serial.log.  Against our
backend, ``blkif stats`` gives what it keeps mapped.  Checked: the
guest's maximum is sizing.MAX_GRANT_FRAMES and dom0's maptrack maximum is
sizing.MAX_MAPTRACK_FRAMES (the defaults the calculator assumes); the guest's
frames in use and its entries dom0 has mapped stay within the prediction.
"""
import os
import re
import time

from blkif import sizing

# Allowed distance between measured and predicted blkfront memory: the
# prediction leaves out blk-mq's tags, the gendisk, the module, kmalloc
# rounding, and per-CPU page lists that MemFree does not count.
MEMORY_TOLERANCE = (0.05, 4 << 20)  # 5% of the prediction plus 4 MiB
# Entries a guest has mapped by dom0 besides its disks': console and xenstore.
OTHER_MAPPED = 2


def host_for(params, memory_mib, vcpus, backend, **backend_options):
    """The sizing.Host of a lab guest: blkfront ``params`` ("a=1,b=2") against
    ``backend`` ("blkback" or "blkif") in a dom0 of ``vcpus`` vCPUs;
    ``backend_options`` are sizing.Backend fields the lab changes."""
    p = dict(item.split("=") for item in params.split(","))
    fe = sizing.Blkfront(max_indirect_segments=int(p.get("max_indirect_segments", 32)),
                         max_ring_page_order=int(p.get("max_ring_page_order", 0)),
                         max_queues=int(p.get("max_queues", 4)), vcpus=vcpus,
                         memory_mib=memory_mib)
    be = (sizing.Backend(max_queues=vcpus, **backend_options) if backend == "blkback"
          else sizing.Backend.ours(max_queues=vcpus, **backend_options))
    return sizing.Host(frontend=fe, backend=be)


def memory_check(values, host):
    """(status, detail): blkfront's MemFree drop against the prediction."""
    try:
        used = (int(values["memfree_before_kb"]) - int(values["memfree_after_kb"])) << 10
    except (KeyError, ValueError):
        return "fail", "the guest reported no memfree_before_kb/memfree_after_kb"
    predicted = sizing.plan(host).value("guest_prealloc_bytes")
    share, fixed = MEMORY_TOLERANCE
    slack = predicted * share + fixed
    status = "pass" if abs(used - predicted) <= slack else "fail"
    return status, "blkfront took %.1f MiB, predicted %.1f MiB (tolerance +-%.1f MiB)" % (
        used / 2.0**20, predicted / 2.0**20, slack / 2.0**20)


def backend_maps_check(summary, host):
    """(status, detail): what our backend keeps mapped between requests (its
    rings and persistent grants, from ``blkif stats``) against
    ``dom0_maps_idle_per_vbd``."""
    try:
        held = summary["persistent_grants"] + summary["rings_mapped"] * (
            1 << summary["ring_page_order"])
    except (KeyError, TypeError):
        return "fail", "blkif stats shows no persistent_grants/rings_mapped/ring_page_order"
    predicted = sizing.plan(host).value("dom0_maps_idle_per_vbd")
    return ("pass" if held <= predicted else "fail",
            "our backend keeps %d grants mapped (%d persistent + %d rings of %d pages), "
            "predicted at most %d" % (held, summary["persistent_grants"], summary["rings_mapped"],
                                      1 << summary["ring_page_order"], predicted))


_HEADER = re.compile(r"grant-table for remote d(?:omain:)?\s*(\d+)")
_FRAMES = re.compile(r"(\d+) frames \((\d+) max\), (\d+) maptrack frames \((\d+) max\)")
_ENTRY = re.compile(r"\(XEN\)\s+\[\s*(?:0x)?[0-9a-f]+\]\s+\d+\s+0x")


def parse_grant_dump(text):
    """The last ``gnttab_usage_print_all`` output in a Xen console log ->
    ``{domid: {"frames", "max_frames", "maptrack_frames", "max_maptrack_frames",
    "mapped"}}`` (the frame figures absent where Xen printed none)."""
    start = text.rfind("gnttab_usage_print_all [")
    if start < 0:
        return {}
    out, current = {}, None
    for line in text[start:].splitlines():
        m = _HEADER.search(line)
        if m:
            current = out.setdefault(int(m.group(1)), {"mapped": 0})
            continue
        if current is None:
            continue
        m = _FRAMES.search(line)
        if m:
            current.update(zip(("frames", "max_frames", "maptrack_frames",
                                "max_maptrack_frames"), map(int, m.groups())))
        elif _ENTRY.search(line):
            current["mapped"] += 1
        elif "gnttab_usage_print_all ]" in line:
            break
    return out


def grant_checks(dump, domid, host, filled):
    """[(check, status, detail)] of a grant dump against the prediction for
    guest ``domid``; ``filled`` is whether the guest filled its rings."""
    guest, dom0 = dump.get(domid), dump.get(0, {})
    if not guest or "frames" not in guest:
        return [("grant table", "fail", "no grant table of d%d in Xen's 'g' output" % domid)]
    result = sizing.plan(host)
    frames = result.value("guest_grant_frames")
    idle = result.value("dom0_maps_idle_per_vbd") + OTHER_MAPPED
    rows = [
        ("grant table max", "pass" if guest["max_frames"] == host.max_grant_frames else "fail",
         "d%d may grow to %d frames; the calculator assumes %d"
         % (domid, guest["max_frames"], host.max_grant_frames)),
        ("grant frames", "pass" if guest["frames"] <= frames else "fail",
         "d%d uses %d frames after %s, predicted at most %d (%d entries)"
         % (domid, guest["frames"], "filling its rings" if filled else "its workload",
            frames, result.value("guest_grants"))),
        ("grants mapped by dom0", "pass" if guest["mapped"] <= idle else "fail",
         "dom0 keeps %d of d%d's entries mapped, predicted at most %d "
         "(persistent grants and rings, plus console and xenstore)"
         % (guest["mapped"], domid, idle)),
    ]
    if "max_maptrack_frames" in dom0:
        ok = dom0["max_maptrack_frames"] == host.max_maptrack_frames
        rows.append(("dom0 maptrack max", "pass" if ok else "fail",
                     "dom0 may use %d maptrack frames (%d in use); the calculator assumes %d"
                     % (dom0["max_maptrack_frames"], dom0["maptrack_frames"],
                        host.max_maptrack_frames)))
    return rows


def grant_dump(lab, phase, timeout=30):
    """Run ``xl debug-keys g`` in dom0 and parse the dump from the serial log."""
    lab.sh("%s: xl debug-keys g" % phase, "xl debug-keys g")
    deadline = time.monotonic() + timeout
    while True:
        with open(os.path.join(lab.logs, "serial.log"), errors="replace") as f:
            text = f.read()
        tail = text[text.rfind("gnttab_usage_print_all ["):]
        if "gnttab_usage_print_all ]" in tail or time.monotonic() > deadline:
            return parse_grant_dump(text)
        time.sleep(0.5)
