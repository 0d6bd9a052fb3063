"""Metrics: a real ``blkif serve --metrics`` on the sim platform, our frontend
doing known I/O on two queues, and the HTTP endpoint scraped and parsed with
prometheus_client's own parser; ``blkif stats --format prometheus`` says the same."""
import contextlib
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from backend_fixtures import Service
from prometheus_client.parser import text_string_to_metric_families

from blkif.abi import ffi
from blkif.backend import metrics
from blkif.backend.counters import LATENCY_BUCKETS, RingCounters, latency_bounds, latency_bucket
from blkif.errors import UsageError
from blkif.frontend import BlockDevice, FrontendOptions
from blkif.platform import open_platform
from blkif.platform.sim import SimHypervisor
from xenstore import Xenstore, domain_socket_path
from xenstore_fixtures import ROOT


READS, WRITES, FLUSHES, DISCARDS = 12, 7, 3, 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(url):
    with urllib.request.urlopen(url, timeout=5) as rsp:
        assert rsp.headers["Content-Type"].startswith("text/plain")
        return rsp.read().decode()


def _samples(text, domid):
    """{(sample name, queue[, le]): value} for ``domid``'s VBD."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("domid") != str(domid):
                continue
            key = (s.name, s.labels.get("queue")) + ((s.labels["le"],) if "le" in s.labels else ())
            out[key] = s.value
    return out


def _total(samples, name):
    return sum(v for k, v in samples.items() if k[0] == name and len(k) == 2)


@contextlib.contextmanager
def _device(service, domid, options):
    with Xenstore.open(domain_socket_path(service.sock, domid)) as xs, \
            open_platform("sim", domid=domid, path=service.hv.path) as platform:
        dev = BlockDevice.attach(xs, platform, domid, "xvda", options)
        try:
            yield dev
        finally:
            dev.detach()


@pytest.mark.parametrize("engine", ["c", "python"])
def test_scraped_metrics_count_what_the_frontend_did(tmp_path, engine):
    port = _free_port()
    with SimHypervisor() as hv:
        service = Service(hv, tmp_path, "--metrics", "127.0.0.1:%d" % port,
                          "--engine", engine, "--max-queues", "2")
        try:
            domid, devid = service.new_vbd(tmp_path / "disk.img")
            with _device(service, domid, FrontendOptions(max_queues=2, timeout=10)) as dev:
                for i in range(WRITES):
                    dev.write(i * 8192, bytes([i]) * 8192)  # 16 sectors each
                for i in range(READS):
                    assert dev.read(i * 4096, 4096) == bytes([i // 2]) * 4096
                for _ in range(FLUSHES):
                    dev.flush()
                for i in range(DISCARDS):
                    dev.discard((64 + i) * 4096, 4096)
                deadline = time.monotonic() + 10
                while True:  # the worker's status file is rewritten every second
                    samples = _samples(_scrape("http://127.0.0.1:%d/metrics" % port), domid)
                    if _total(samples, "blkif_requests_total") >= READS + WRITES + FLUSHES \
                            + DISCARDS or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
            text = subprocess.run(
                [sys.executable, "-m", "blkif", "stats", "--state-dir", service.state_dir,
                 "--format", "prometheus"], cwd=ROOT, capture_output=True, text=True,
                check=True).stdout
        finally:
            assert service.close() == 0, service.output()
    assert "Traceback" not in service.output()

    assert {k[1] for k in samples if k[0] == "blkif_rd_req_total"} == {"0", "1"}
    assert _total(samples, "blkif_rd_req_total") == READS
    assert _total(samples, "blkif_wr_req_total") == WRITES
    assert _total(samples, "blkif_f_req_total") == FLUSHES
    assert _total(samples, "blkif_ds_req_total") == DISCARDS
    assert _total(samples, "blkif_rd_sect_total") == READS * 8
    assert _total(samples, "blkif_wr_sect_total") == WRITES * 16
    assert _total(samples, "blkif_oo_req_total") == 0
    assert _total(samples, "blkif_errors_total") == 0
    requests = _total(samples, "blkif_requests_total")
    assert requests == READS + WRITES + FLUSHES + DISCARDS
    assert _total(samples, "blkif_request_latency_seconds_count") == requests
    assert 0 < _total(samples, "blkif_request_latency_seconds_sum") < requests * 1.0
    for queue in ("0", "1"):
        buckets = sorted((float(k[2]), v) for k, v in samples.items()
                         if k[0] == "blkif_request_latency_seconds_bucket" and k[1] == queue)
        assert len(buckets) == LATENCY_BUCKETS
        counts = [v for _, v in buckets]
        assert counts == sorted(counts)  # cumulative
        assert counts[-1] == samples[("blkif_request_latency_seconds_count", queue)]
    if engine == "c":  # the Python reference has no persistent-grant cache counters per page
        assert _total(samples, "blkif_persistent_grant_hits_total") + _total(
            samples, "blkif_persistent_grant_misses_total") > 0
    # the one-shot text, read after the service stopped, has the same counters
    after = _samples(text, domid)
    for name in ("blkif_rd_req_total", "blkif_wr_sect_total", "blkif_requests_total"):
        assert _total(after, name) == _total(samples, name)


def test_latency_buckets_agree_with_the_engine():
    assert len(ffi.new("struct eng_stats *").latency) == LATENCY_BUCKETS
    bounds = latency_bounds()
    assert bounds[0] == 32e-6 and bounds[-1] == float("inf")
    for ns in (0, 31_999, 32_000, 63_999, 64_000, 10**9, 10**12):
        bucket = latency_bucket(ns)
        assert (bucket == 0 or ns >= bounds[bucket - 1] * 1e9) and ns < bounds[bucket] * 1e9
    c = RingCounters()
    c.observe(50_000)
    assert c.latency[1] == 1 and c.latency_ns == 50_000


@pytest.mark.parametrize("text,expect", [
    ("9100", ("0.0.0.0", 9100)), ("127.0.0.1:9100", ("127.0.0.1", 9100)),
    ("[::1]:9100", ("::1", 9100)), (":9100", ("0.0.0.0", 9100)),
])
def test_metrics_address(text, expect):
    assert metrics.parse_address(text) == expect


@pytest.mark.parametrize("text", ["", "host:", "host:http", "1:70000", "-1"])
def test_bad_metrics_address_is_a_usage_error(text):
    with pytest.raises(UsageError):
        metrics.parse_address(text)


def test_metrics_address_in_use_is_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with SimHypervisor() as hv:
            proc = subprocess.run(
                [sys.executable, "-m", "blkif", "serve", "--platform", "sim", "--sim-path",
                 hv.path, "--xenstore", str(tmp_path / "none.sock"), "--state-dir",
                 str(tmp_path), "--metrics", "127.0.0.1:%d" % port],
                cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Address already in use" in proc.stderr
