"""The capacity model: figures from the lab and Linux's sources, and its invariants."""
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blkif.abi import ABI_NAMES
from blkif.abi.constants import PAGE_SIZE
from blkif.errors import UsageError
from blkif.ring import ring_slots
from blkif.sizing import Backend, Blkfront, Host, plan

MIB = 1 << 20


def _host(segs=32, order=0, queues=4, vcpus=1, **kw):
    fe = Blkfront(max_indirect_segments=segs, max_ring_page_order=order, max_queues=queues,
                  vcpus=vcpus, memory_mib=kw.pop("memory_mib", None),
                  feature_persistent=kw.pop("persistent", True), trusted=kw.pop("trusted", True))
    return Host(frontend=fe, **kw)


def test_lab_config_b_preallocates_about_a_gibibyte():
    # xenlab.md: 2 vCPUs, max_indirect_segments=512 max_ring_page_order=4 against
    # blkback (256 offered): 512 slots x 257 pages x 2 queues; never loads in 512 MiB.
    result = plan(_host(segs=512, order=4, vcpus=2, memory_mib=512))
    assert result.negotiated["indirect_segments"] == 256
    assert result.negotiated["slots"] == 512 and result.negotiated["queues"] == 2
    assert result.value("guest_prealloc_bytes_per_vbd") == 512 * 257 * 2 * PAGE_SIZE
    levels = [level for level, limit, _ in result.warnings if limit == "guest memory"]
    assert levels == ["error"]
    # The lab's guest loaded it with 1.5 GiB: a warning, not an error.
    roomy = plan(_host(segs=512, order=4, vcpus=2, memory_mib=1536))
    assert [w[0] for w in roomy.warnings if w[1] == "guest memory"] == ["warn"]


def test_lab_backend_guest_figures():
    # docs/lab.md: 128 slots x 257 pages per queue, 257 MiB for two queues.
    host = _host(segs=256, order=2, queues=2, vcpus=2, backend=Backend.ours(max_queues=2))
    result = plan(host)
    assert result.value("guest_prealloc_bytes_per_vbd") == 257 * MIB
    assert result.value("guest_grants_per_vbd") == 2 * (4 + 128 * 257)
    # 65808 entries need 129 frames, more than the default 64: the checker says so.
    assert result.value("guest_grant_frames") == 129
    assert ("error", "grant table") in [w[:2] for w in result.warnings]


def test_defaults_one_page_ring_without_persistent_grants_preallocates_nothing():
    result = plan(_host(segs=0, persistent=False))
    assert result.negotiated["bounce"] is False
    assert result.value("guest_prealloc_bytes_per_vbd") == 0
    assert result.value("guest_grants_per_vbd") == 1 + 32 * 11
    assert result.value("dom0_maps_idle_per_vbd") == 1  # just the ring


def test_untrusted_backend_bounces_without_persistent_grants():
    trusted = plan(_host(segs=32, persistent=False))
    untrusted = plan(_host(segs=32, persistent=False, trusted=False))
    assert trusted.value("guest_prealloc_bytes_per_vbd") == 32 * 1 * PAGE_SIZE  # indirect pages
    assert untrusted.value("guest_prealloc_bytes_per_vbd") == 32 * 33 * PAGE_SIZE


def test_both_map_the_whole_ring_in_flight_ours_beside_its_cache():
    """The C engine has every request in flight, as blkback: past its cache of
    1056 a ring's requests are mapped for themselves."""
    ours = plan(_host(segs=256, order=2, queues=2, vcpus=2, backend=Backend.ours(max_queues=2)))
    linux = plan(_host(segs=256, order=2, queues=2, vcpus=2, backend=Backend(max_queues=2)))
    assert ours.value("dom0_maps_peak_per_vbd") == 2 * (4 + 1056 + 128 * 257)
    assert linux.value("dom0_maps_peak_per_vbd") == 2 * (4 + 128 * 257)
    small = plan(_host(segs=0, order=0, queues=1, vcpus=1, backend=Backend.ours(max_queues=1)))
    assert small.value("dom0_maps_peak_per_vbd") == 1 + 32 * 11  # all of it in the cache
    assert ours.value("dom0_maps_idle_per_vbd") == linux.value("dom0_maps_idle_per_vbd") == 2 * 1060


def test_host_of_many_guests_hits_maptrack():
    host = _host(segs=32, order=2, queues=2, vcpus=2, guests=20, disks=2)  # 40 x 8456
    result = plan(host)
    assert result.value("dom0_maps_peak") == 40 * result.value("dom0_maps_peak_per_vbd")
    assert any("gnttab_max_maptrack_frames" in text for _, _, text in result.warnings)
    assert "maptrack" not in [w[1] for w in plan(replace(host, guests=1, disks=1)).warnings]


def test_littles_law_and_the_knee():
    host = _host(segs=32, order=2, queues=2, vcpus=2, latency_ms=2.0, target_mbps=200.0)
    result = plan(host)
    assert result.value("max_iops_per_vbd") == 256 * 500
    assert result.value("max_bytes_per_s_per_vbd") == 32 * MIB * 500
    # 200 MB/s x 2 ms = 400 kB in flight: one page of ring and direct requests do it.
    assert result.value("knee") == {"ring_page_order": 0, "max_indirect_segments": 0,
                                    "inflight_bytes": 2 * 32 * 11 * PAGE_SIZE,
                                    "guest_grants_per_vbd": 2 * 32 * 11}
    far = plan(replace(host, latency_ms=50.0, target_mbps=2000.0))  # 100 MB in flight
    assert far.value("knee")["inflight_bytes"] >= 100e6
    assert plan(replace(host, latency_ms=1000.0, target_mbps=1e6)).value("knee") is None


@pytest.mark.parametrize("kw,message", [
    (dict(abi="sparc"), "unknown ABI"),
    (dict(disks=0), "disks 0 out of range"),
    (dict(latency_ms=0.0), "latency must be positive"),
    (dict(backend=Backend(kind="qdisk")), "unknown backend"),
])
def test_bad_values_are_usage_errors(kw, message):
    with pytest.raises(UsageError, match=message):
        plan(replace(_host(), **kw))


def test_every_figure_says_where_it_comes_from():
    result = plan(_host(segs=256, order=2, queues=2, vcpus=2, latency_ms=1.0, target_mbps=100.0))
    for figure in result.figures:
        assert any(src in figure.why for src in (
            ".c", ".h", "ring_slots", "Little", "x ", "blkif/")), figure
    assert set(result.as_dict()["explain"]) == {f.name for f in result.figures}


hosts = st.builds(
    _host,
    segs=st.integers(0, 4096), order=st.integers(0, 4), queues=st.integers(1, 16),
    vcpus=st.integers(1, 64), abi=st.sampled_from(sorted(ABI_NAMES)),
    persistent=st.booleans(), guests=st.integers(1, 50), disks=st.integers(1, 8),
    backend=st.builds(Backend, kind=st.sampled_from(["blkback", "blkif"]),
                      max_indirect_segments=st.integers(0, 4096), max_queues=st.integers(1, 16),
                      max_ring_page_order=st.integers(0, 4), persistent=st.booleans()),
)


@settings(max_examples=200, deadline=None)
@given(hosts)
def test_invariants(host):
    result = plan(host)
    n = result.negotiated
    assert n["slots"] == ring_slots(n["ring_pages"] * PAGE_SIZE, ABI_NAMES[host.abi].slot_size)[1]
    assert result.value("inflight_bytes_per_vbd") == (
        n["queues"] * n["slots"] * result.value("request_bytes"))
    assert n["queues"] <= min(host.frontend.vcpus, host.frontend.max_queues,
                              host.backend.max_queues)
    assert result.value("dom0_maps_idle_per_vbd") <= result.value("dom0_maps_peak_per_vbd")
    assert result.value("guest_grant_frames") * 512 >= result.value("guest_grants")
    assert result.value("dom0_maps_peak") == (
        host.guests * host.disks * result.value("dom0_maps_peak_per_vbd"))


@settings(max_examples=100, deadline=None)
@given(hosts, st.sampled_from(["max_indirect_segments", "max_queues", "max_ring_page_order"]))
def test_grants_and_memory_never_shrink_as_blkfront_asks_for_more(host, knob):
    fe = host.frontend
    limit = {"max_indirect_segments": 4096, "max_queues": 16, "max_ring_page_order": 4}[knob]
    bigger = replace(host, frontend=replace(fe, **{knob: min(getattr(fe, knob) * 2 + 1, limit)}))
    for name in ("guest_grants", "guest_prealloc_bytes", "inflight_bytes_per_vbd",
                 "dom0_maps_peak"):
        assert plan(bigger).value(name) >= plan(host).value(name), name
