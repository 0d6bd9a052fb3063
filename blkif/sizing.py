"""Capacity model: what a VBD configuration costs and what it can carry.

``plan(Host(...))`` negotiates one VBD the way Linux blkfront does against the
chosen backend, then counts, per queue, VBD, guest and host: grant entries the
guest needs, memory blkfront preallocates, grants dom0 keeps mapped (maptrack),
bytes in flight and the throughput Little's law allows.  Every figure carries
its formula and the code it comes from (``Figure.why``), so ``--explain`` and
docs/calc.md say the same thing.  Pure: no I/O, no platform.

Where implementations differ the figure names the one it describes: guest-side
figures are Linux xen-blkfront's; dom0 maps are Linux xen-blkback's or our
backend's (``Backend.kind``).
"""
from dataclasses import asdict, dataclass, field, replace

from blkif.abi import ABI_NAMES
from blkif.abi.constants import (
    BLKIF_MAX_INDIRECT_SEGMENTS,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_SEGS_PER_INDIRECT_FRAME,
    PAGE_SIZE,
    XENBUS_MAX_RING_GRANT_ORDER,
)
from blkif.backend.engine import MAX_PERSISTENT_GRANTS
from blkif.errors import UsageError
from blkif.negotiate import MAX_QUEUES, BackendOffer, FrontendWants
from blkif.ring import ring_slots

# Xen (xen/common/grant_table.c, xen/include/public/grant_table.h, 4.17).
GRANTS_PER_FRAME = PAGE_SIZE // 8  # grant_entry_v1_t is 8 bytes: 512 per frame
MAX_GRANT_FRAMES = 64  # opt_max_grant_frames; xl's max_grant_frames=-1 takes it
MAPTRACK_PER_FRAME = PAGE_SIZE // 16  # struct grant_mapping is 16 bytes: 256
MAX_MAPTRACK_FRAMES = 1024  # opt_max_maptrack_frames (gnttab_max_maptrack_frames)
# Linux drivers/xen/grant-table.c: NR_RESERVED_ENTRIES, kept for console/xenstore.
GNTTAB_RESERVED_ENTRIES = 8
# Linux xen-blkfront.c: struct grant (gref, page, list node) and one
# struct scatterlist per segment (x86_64, no CONFIG_DEBUG_SG).
BLKFRONT_GRANT_STRUCT = 32
SCATTERLIST_SIZE = 32
# Linux xen-blkback: common.h MAX_INDIRECT_SEGMENTS; blkback.c max_persistent_grants.
BLKBACK_MAX_INDIRECT_SEGMENTS = 256
BLKBACK_MAX_PERSISTENT_GRANTS = 1056
BACKENDS = ("blkback", "blkif")


@dataclass(frozen=True)
class Blkfront:
    """Linux xen-blkfront's module parameters (their defaults) and the
    guest's vCPUs and memory (MiB; None: unknown)."""

    max_indirect_segments: int = 32
    max_ring_page_order: int = 0
    max_queues: int = 4
    feature_persistent: bool = True
    trusted: bool = True
    vcpus: int = 1
    memory_mib: int = None


@dataclass(frozen=True)
class Backend:
    """What dom0's backend offers: ``blkback`` (Linux xen-blkback's module
    parameters) or ``blkif`` (our ``blkif serve``)."""

    kind: str = "blkback"
    max_ring_page_order: int = XENBUS_MAX_RING_GRANT_ORDER
    max_queues: int = 4
    max_indirect_segments: int = BLKBACK_MAX_INDIRECT_SEGMENTS
    persistent: bool = True
    max_persistent_grants: int = BLKBACK_MAX_PERSISTENT_GRANTS

    @classmethod
    def ours(cls, **kw):
        """Our backend: its persistent grant cap is ``blkif serve``'s default
        unless given (``--max-persistent-grants``)."""
        kw.setdefault("max_persistent_grants", MAX_PERSISTENT_GRANTS)
        return cls(kind="blkif", **kw)


@dataclass(frozen=True)
class Host:
    """A host to size: ``guests`` guests of ``disks`` VBDs each, all alike."""

    frontend: Blkfront = field(default_factory=Blkfront)
    backend: Backend = field(default_factory=Backend)
    abi: str = "x86_64"
    disks: int = 1
    guests: int = 1
    max_grant_frames: int = MAX_GRANT_FRAMES  # each guest's (xl config)
    max_maptrack_frames: int = MAX_MAPTRACK_FRAMES  # dom0's (Xen command line)
    latency_ms: float = None  # per request, for Little's law
    target_mbps: float = None  # what the disk behind it can do (MB/s)


@dataclass(frozen=True)
class Figure:
    name: str
    value: object
    unit: str
    why: str  # formula with the numbers, then its source


@dataclass
class Plan:
    host: Host
    negotiated: dict
    figures: list
    warnings: list  # (level, limit, text): "error" will be hit, "warn" may, "note" costs

    def value(self, name):
        return next(f.value for f in self.figures if f.name == name)

    def as_dict(self):
        return {
            "config": asdict(self.host),
            "negotiated": self.negotiated,
            "figures": {f.name: f.value for f in self.figures},
            "units": {f.name: f.unit for f in self.figures},
            "explain": {f.name: f.why for f in self.figures},
            "warnings": [{"level": lvl, "limit": limit, "text": text}
                         for lvl, limit, text in self.warnings],
        }


def _check(host):
    """UsageError naming the first value out of its range."""
    fe, be = host.frontend, host.backend
    if host.abi not in ABI_NAMES:
        raise UsageError("unknown ABI %r (choose from %s)"
                         % (host.abi, ", ".join(sorted(ABI_NAMES))))
    if be.kind not in BACKENDS:
        raise UsageError("unknown backend %r (choose from %s)" % (be.kind, ", ".join(BACKENDS)))
    for name, value, low, high in (
        ("ring page order", fe.max_ring_page_order, 0, XENBUS_MAX_RING_GRANT_ORDER),
        ("max indirect segments", fe.max_indirect_segments, 0, BLKIF_MAX_INDIRECT_SEGMENTS),
        ("queues", fe.max_queues, 1, MAX_QUEUES),
        ("vcpus", fe.vcpus, 1, 4096),
        ("disks", host.disks, 1, 4096),
        ("guests", host.guests, 1, 32768),
        ("backend ring page order", be.max_ring_page_order, 0, XENBUS_MAX_RING_GRANT_ORDER),
        ("backend queues", be.max_queues, 1, MAX_QUEUES),
        ("backend indirect segments", be.max_indirect_segments, 0, BLKIF_MAX_INDIRECT_SEGMENTS),
        ("max persistent grants", be.max_persistent_grants, 0, 1 << 24),
        ("max grant frames", host.max_grant_frames, 1, 1 << 20),
        ("max maptrack frames", host.max_maptrack_frames, 1, 1 << 20),
    ):
        if not low <= value <= high:
            raise UsageError("%s %d out of range %d..%d" % (name, value, low, high))
    for name, value in (("latency", host.latency_ms), ("target MB/s", host.target_mbps),
                        ("guest memory", fe.memory_mib)):
        if value is not None and value <= 0:
            raise UsageError("%s must be positive, not %s" % (name, value))


def negotiate(host):
    """What one VBD uses: Linux blkfront's choice against the backend's offer.

    talk_to_blkback: ring order = min(max_ring_page_order, max-ring-page-order);
    queues = min(max_queues, vCPUs (xlblk_init caps it at nr_cpu_ids),
    multi-queue-max-queues); blkfront_gather_backend_features: segments =
    min(max_indirect_segments, feature-max-indirect-segments), 0 when not above
    11; persistent when both want it; bounce buffers (XSA-403: ``info->bounce``)
    with persistent grants or an untrusted backend.  The same rules as
    blkif.negotiate.FrontendWants.choose, which computes them.
    """
    fe, be = host.frontend, host.backend
    wants = FrontendWants(fe.max_ring_page_order, min(fe.max_queues, fe.vcpus),
                          fe.max_indirect_segments, fe.feature_persistent)
    offer = BackendOffer(be.max_ring_page_order, be.max_queues, be.max_indirect_segments,
                         be.persistent)
    order, queues, segments, persistent = wants.choose(offer)
    pages = 1 << order
    slots = ring_slots(pages * PAGE_SIZE, ABI_NAMES[host.abi].slot_size)[1]
    grants = segments or BLKIF_MAX_SEGMENTS_PER_REQUEST
    return {
        "ring_page_order": order,
        "ring_pages": pages,
        "slots": slots,
        "queues": queues,
        "indirect_segments": segments,
        "segments_per_request": grants,
        "indirect_pages_per_request": -(-segments // BLKIF_SEGS_PER_INDIRECT_FRAME),
        "persistent": persistent,
        "bounce": persistent or not fe.trusted,
    }


def plan(host):
    """Every figure for ``host``, with warnings.  UsageError for a bad value."""
    _check(host)
    n = negotiate(host)
    be = host.backend
    q, slots, pages = n["queues"], n["slots"], n["ring_pages"]
    segs, ind = n["segments_per_request"], n["indirect_pages_per_request"]
    figures = []

    def add(name, value, unit, why):
        figures.append(Figure(name, value, unit, why))
        return value

    per_request = add("request_bytes", segs * PAGE_SIZE, "bytes",
                      "%d segments x %d: one request's data (blkif.h: segments of one page; "
                      "indirect: feature-max-indirect-segments)" % (segs, PAGE_SIZE))
    inflight = add("inflight_bytes_per_vbd", q * slots * per_request, "bytes",
                   "%d queues x %d slots x %d bytes: every slot of every ring holding a "
                   "full request (ring.h __CONST_RING_SIZE; blkif/ring.py ring_slots)"
                   % (q, slots, per_request))
    # Guest grant entries: blkfront_setup_indirect fills each queue's grant
    # list with (grants + INDIRECT_GREFS(grants)) * BLK_RING_SIZE entries; the
    # ring pages are granted apart (xenbus_setup_ring).
    per_slot = segs + ind
    grants_queue = slots * per_slot
    grants_vbd = add("guest_grants_per_vbd", q * (pages + grants_queue), "grant entries",
                     "%d queues x (%d ring pages + %d slots x (%d segments + %d indirect pages)): "
                     "xen-blkfront.c blkfront_setup_indirect/fill_grant_buffer, "
                     "talk_to_blkback" % (q, pages, slots, segs, ind))
    grants_guest = add("guest_grants", host.disks * grants_vbd + GNTTAB_RESERVED_ENTRIES,
                       "grant entries",
                       "%d disks x %d + %d reserved (Linux grant-table.c NR_RESERVED_ENTRIES); "
                       "other devices (netfront) come on top"
                       % (host.disks, grants_vbd, GNTTAB_RESERVED_ENTRIES))
    frames = add("guest_grant_frames", -(-grants_guest // GRANTS_PER_FRAME), "frames",
                 "ceil(%d / %d entries per v1 frame) against max_grant_frames %d (Xen "
                 "grant_table.c opt_max_grant_frames, xl max_grant_frames)"
                 % (grants_guest, GRANTS_PER_FRAME, host.max_grant_frames))
    # Guest memory: with bounce buffers every grant-list entry gets its own
    # page (fill_grant_buffer); without, only the indirect descriptor pages
    # are preallocated (blkfront_setup_indirect).
    if n["bounce"]:
        pre_pages, rule = q * grants_queue, "bounce buffers: a page per grant"
    else:
        pre_pages, rule = q * slots * ind, "no bounce buffers: indirect pages only"
    pre_vbd = add("guest_prealloc_bytes_per_vbd", pre_pages * PAGE_SIZE, "bytes",
                  "%s: %d pages x %d (xen-blkfront.c fill_grant_buffer, "
                  "blkfront_setup_indirect; bounce = persistent or untrusted, XSA-403)"
                  % (rule, pre_pages, PAGE_SIZE))
    book = q * (grants_queue * BLKFRONT_GRANT_STRUCT
                + slots * (segs * 8 + segs * SCATTERLIST_SIZE + ind * 8))
    book_vbd = add("guest_bookkeeping_bytes_per_vbd", book, "bytes",
                   "%d queues x (%d grant structs x %d + %d slots x (grants_used %d x 8 + "
                   "sg %d x %d + indirect_grants %d x 8)); kmalloc rounding not counted "
                   "(blkfront_setup_indirect)" % (q, grants_queue, BLKFRONT_GRANT_STRUCT,
                                                  slots, segs, segs, SCATTERLIST_SIZE, ind))
    guest_mem = add("guest_prealloc_bytes", host.disks * (pre_vbd + book_vbd), "bytes",
                    "%d disks x (%d + %d): what blkfront takes from the guest once the "
                    "disks connect" % (host.disks, pre_vbd, book_vbd))
    # dom0 maps.  blkback maps every segment of every request in flight
    # (xen_blkbk_map), keeping up to max_persistent_grants per ring mapped
    # between requests; so does our C engine (every request of a batch in
    # flight), whose requests that find the cache full of pages in use are
    # mapped for themselves.
    cap = be.max_persistent_grants if n["persistent"] else 0
    kept = min(grants_queue, cap)
    if be.kind == "blkback":
        peak_queue = pages + grants_queue
        peak_why = ("blkback maps every request in flight (blkback.c xen_blkbk_map, "
                    "persistent ones kept up to max_persistent_grants %d)" % cap)
    else:
        spill = grants_queue if grants_queue > cap else 0
        peak_queue = pages + kept + spill
        peak_why = ("ours maps its cache (up to %d per ring, blkif/backend/engine.py "
                    "MAX_PERSISTENT_GRANTS) plus, once it is full, the requests in flight "
                    "mapped for themselves (csrc/engine.c map_pages)" % cap)
    add("dom0_maps_idle_per_vbd", q * (pages + kept), "grants",
        "%d queues x (%d ring pages + min(%d grants, %d persistent kept)): mapped between "
        "requests" % (q, pages, grants_queue, cap))
    peak_vbd = add("dom0_maps_peak_per_vbd", q * peak_queue, "grants",
                   "%d queues x %d: %s" % (q, peak_queue, peak_why))
    vbds = host.guests * host.disks
    maps = add("dom0_maps_peak", vbds * peak_vbd, "grants",
               "%d guests x %d disks x %d" % (host.guests, host.disks, peak_vbd))
    mt_frames = add("dom0_maptrack_frames", -(-maps // MAPTRACK_PER_FRAME), "frames",
                    "ceil(%d / %d entries per maptrack frame) against max_maptrack_frames %d "
                    "(Xen grant_table.c struct grant_mapping, opt_max_maptrack_frames)"
                    % (maps, MAPTRACK_PER_FRAME, host.max_maptrack_frames))
    add("dom0_mapped_bytes_peak", maps * PAGE_SIZE, "bytes",
        "%d grants x %d: each mapping occupies a dom0 page frame (blkback's page pool, "
        "gntdev's ballooned pages) while it lasts" % (maps, PAGE_SIZE))
    add("host_guest_prealloc_bytes", host.guests * guest_mem, "bytes",
                   "%d guests x %d" % (host.guests, guest_mem))
    if host.latency_ms:
        seconds = host.latency_ms / 1000.0
        add("max_iops_per_vbd", int(q * slots / seconds), "requests/s",
            "Little's law: %d requests in flight / %g ms" % (q * slots, host.latency_ms))
        add("max_bytes_per_s_per_vbd", int(inflight / seconds), "bytes/s",
            "Little's law: %d bytes in flight / %g ms" % (inflight, host.latency_ms))
    if host.latency_ms and host.target_mbps:
        add("knee", knee(host), "configuration",
            "the smallest ring order and segments whose bytes in flight cover target x "
            "latency = %d bytes; more only costs grants and memory"
            % (host.target_mbps * 1e6 * host.latency_ms / 1000.0))
    warnings = _warnings(host, n, frames, mt_frames, guest_mem, grants_queue, cap)
    return Plan(host, n, figures, warnings)


def knee(host):
    """The cheapest blkfront setting (fewest guest grants) whose bytes in
    flight reach target x latency, within what the backend offers: a dict of
    ring_page_order, max_indirect_segments, inflight_bytes and
    guest_grants_per_vbd; None when even the largest falls short."""
    need = host.target_mbps * 1e6 * host.latency_ms / 1000.0
    best = None
    for order in range(XENBUS_MAX_RING_GRANT_ORDER + 1):
        for segs in (0, 32, 64, 128, 256, 512, 1024, 2048, 4096):
            fe = replace(host.frontend, max_ring_page_order=order, max_indirect_segments=segs)
            n = negotiate(replace(host, frontend=fe))
            inflight = n["queues"] * n["slots"] * n["segments_per_request"] * PAGE_SIZE
            cost = n["queues"] * n["slots"] * (n["segments_per_request"]
                                               + n["indirect_pages_per_request"])
            if inflight >= need and (best is None or cost < best[0]):
                best = (cost, {"ring_page_order": order, "max_indirect_segments": segs,
                               "inflight_bytes": inflight, "guest_grants_per_vbd": cost})
    return best and best[1]


def _warnings(host, n, frames, mt_frames, guest_mem, grants_queue, cap):
    """[(level, limit, text)]: each limit this host will hit, and what to change."""
    out = []
    fe, be = host.frontend, host.backend
    if frames > host.max_grant_frames:
        out.append(("error", "grant table", (
            "each guest needs %d grant frames, its table allows %d: blkfront stalls waiting "
            "for grant references once the rings fill; raise max_grant_frames in the guest's "
            "xl config (or /etc/xen/xl.conf) to %d, or lower xen_blkfront "
            "max_indirect_segments, max_ring_page_order or max_queues")
            % (frames, host.max_grant_frames, frames)))
    if mt_frames > host.max_maptrack_frames:
        out.append(("error", "maptrack", (
            "dom0 maps up to %d maptrack frames' worth of grants, Xen allows %d: mappings "
            "fail (GNTST_no_space) and I/O errors; raise gnttab_max_maptrack_frames on Xen's "
            "command line to %d, or run fewer VBDs per backend domain")
            % (mt_frames, host.max_maptrack_frames, mt_frames)))
    if fe.memory_mib:
        share = guest_mem / float(fe.memory_mib << 20)
        if share >= 0.75:
            out.append(("error", "guest memory", (
                "blkfront preallocates %d MiB of the guest's %d MiB: it will not finish "
                "loading; give the guest more memory, or lower xen_blkfront "
                "max_indirect_segments / max_ring_page_order / max_queues, or set "
                "xen_blkfront feature_persistent=0") % (guest_mem >> 20, fe.memory_mib)))
        elif share >= 0.4:
            out.append(("warn", "guest memory",
                        "blkfront preallocates %d MiB, %d%% of the guest's %d MiB"
                        % (guest_mem >> 20, share * 100, fe.memory_mib)))
    if n["persistent"] and grants_queue > cap:
        where = ("xen_blkback parameter max_persistent_grants" if be.kind == "blkback"
                 else "blkif/backend/engine.py MAX_PERSISTENT_GRANTS")
        out.append(("note", "persistent grants", (
            "%s keeps %d grants per ring mapped, blkfront may use %d: the rest are mapped "
            "and unmapped per request (%s)") % (be.kind, cap, grants_queue, where)))
    if fe.max_indirect_segments > n["indirect_segments"] > 0:
        out.append(("note", "indirect segments",
                    "blkfront asks for %d indirect segments, the backend offers %d"
                    % (fe.max_indirect_segments, n["indirect_segments"])))
    return out
