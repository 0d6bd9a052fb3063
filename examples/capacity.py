"""Size a host: N guests x M disks, each guest's blkfront against dom0's blkback.

Change the numbers under "The host" and run: .venv/bin/python examples/capacity.py
It prints what each choice of blkfront parameters costs (guest grants and
memory, dom0 maps) and what it buys (Little's law at the latency given), marks
the ones that hit a limit, and names the cheapest that keeps the disk busy.
docs/calc.md has every formula and its source.
"""
from dataclasses import replace

from blkif.calc import human
from blkif.sizing import Backend, Blkfront, Host, plan

# The host.
GUESTS = 20
DISKS_PER_GUEST = 2
GUEST_VCPUS = 2
GUEST_MEMORY_MIB = 1024
LATENCY_MS = 2.0  # per request, measured on the storage
DISK_MBPS = 400.0  # what the storage can do per VBD

base = Host(
    frontend=Blkfront(vcpus=GUEST_VCPUS, max_queues=GUEST_VCPUS, memory_mib=GUEST_MEMORY_MIB),
    backend=Backend(max_queues=4),  # blkback: dom0 with 4 vCPUs
    guests=GUESTS, disks=DISKS_PER_GUEST, latency_ms=LATENCY_MS, target_mbps=DISK_MBPS,
)

print("%d guests x %d disks, %d vCPUs and %d MiB each; %g ms per request, %g MB/s per disk"
      % (GUESTS, DISKS_PER_GUEST, GUEST_VCPUS, GUEST_MEMORY_MIB, LATENCY_MS, DISK_MBPS))
print("%-22s %9s %11s %12s %10s %12s  %s" % (
    "blkfront order/segs", "in flight", "MB/s bound", "guest grants", "guest mem",
    "dom0 maps", "limits"))
for order, segments in ((0, 32), (0, 256), (2, 32), (2, 256), (4, 256), (4, 512)):
    host = replace(base, frontend=replace(base.frontend, max_ring_page_order=order,
                                          max_indirect_segments=segments))
    result = plan(host)
    hit = [limit for level, limit, _ in result.warnings if level == "error"]
    print("%-22s %9s %11.0f %12d %10s %12d  %s" % (
        "order %d, %d segs" % (order, segments),
        human(result.value("inflight_bytes_per_vbd")),
        min(result.value("max_bytes_per_s_per_vbd") / 1e6, DISK_MBPS),
        result.value("guest_grants"),
        human(result.value("guest_prealloc_bytes")),
        result.value("dom0_maps_peak"),
        "; ".join(hit) or "ok"))

knee = plan(base).value("knee")
print("cheapest that keeps %g MB/s busy at %g ms: max_ring_page_order=%d max_indirect_segments=%d"
      " (%s in flight per disk, %d guest grants per disk); more only costs grants and memory"
      % (DISK_MBPS, LATENCY_MS, knee["ring_page_order"], knee["max_indirect_segments"],
         human(knee["inflight_bytes"]), knee["guest_grants_per_vbd"]))
