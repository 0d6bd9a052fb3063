"""Prometheus metrics of a running service, from its status files.

Workers are separate processes, and each already rewrites its status file
(``blkif.backend.status``) every second with counters per queue.  So metrics
are not pushed anywhere: :class:`StatusCollector` reads the state directory
at every scrape and turns each VBD's queues into metric families with labels
``domid``, ``devid`` and ``queue``.  ``blkif serve --metrics ADDRESS`` serves
it over HTTP (prometheus_client's own server, a thread of the supervisor);
``blkif stats --format prometheus`` prints the same text once.

Names follow Linux blkback's statistics (``/sys/.../statistics/rd_req``):
``blkif_oo_req_total``, ``blkif_rd_req_total``, ``blkif_wr_req_total``,
``blkif_f_req_total`` (flushes and barriers), ``blkif_ds_req_total``,
``blkif_rd_sect_total``, ``blkif_wr_sect_total`` (512-byte sectors), then
ours.  A counter restarts from zero when a worker restarts (Prometheus's
``rate`` handles resets).
"""
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.utils import floatToGoString

from blkif.abi.constants import SECTOR_SIZE
from blkif.backend import status
from blkif.backend.counters import latency_bounds
from blkif.errors import UsageError

LABELS = ("domid", "devid", "queue")

# (name, help, value of one queue's counters)
COUNTERS = (
    ("oo_req", "Requests that waited for a free request slot (blkback oo_req); "
               "always 0 here: every ring slot has its own", lambda c: 0),
    ("rd_req", "Read requests (blkback rd_req)", lambda c: c["ops"]["read"]),
    ("wr_req", "Write requests (blkback wr_req)", lambda c: c["ops"]["write"]),
    ("f_req", "Flush and barrier requests (blkback f_req)",
     lambda c: c["ops"]["flush_diskcache"] + c["ops"]["write_barrier"]),
    ("ds_req", "Discard requests (blkback ds_req)", lambda c: c["ops"]["discard"]),
    ("rd_sect", "512-byte sectors read (blkback rd_sect)",
     lambda c: c["read_bytes"] // SECTOR_SIZE),
    ("wr_sect", "512-byte sectors written (blkback wr_sect)",
     lambda c: c["write_bytes"] // SECTOR_SIZE),
    ("requests", "Requests taken off the ring", lambda c: c["requests"]),
    ("indirect_requests", "Indirect requests", lambda c: c["indirect"]),
    ("errors", "Requests answered with an error", lambda c: c["errors"]),
    ("persistent_grant_hits", "Pages found in the persistent grant cache",
     lambda c: c["grant_hits"]),
    ("persistent_grant_misses", "Pages not in the persistent grant cache, mapped",
     lambda c: c["grant_misses"]),
    ("persistent_grant_evictions", "Persistent grants unmapped to make room",
     lambda c: c["grant_evictions"]),
    ("persistent_grant_purges", "Persistent grants unmapped after going unused",
     lambda c: c["grant_purged"]),
    ("notifies", "Event channel notifications sent to the frontend", lambda c: c["notifies"]),
    ("events", "Event channel notifications received", lambda c: c["events"]),
)
GAUGES = (
    ("in_flight", "Requests taken and not yet answered", lambda c: c["in_flight"]),
    ("persistent_grants", "Persistent grants mapped now", lambda c: c["persistent_grants"]),
)


def families(state):
    """Metric families for ``state`` (:func:`blkif.backend.status.read_status`)."""
    counters = {name: CounterMetricFamily("blkif_" + name, doc, labels=LABELS)
                for name, doc, _ in COUNTERS}
    gauges = {name: GaugeMetricFamily("blkif_" + name, doc, labels=LABELS)
              for name, doc, _ in GAUGES}
    latency = HistogramMetricFamily(
        "blkif_request_latency_seconds",
        "From a request taken off the ring to its response", labels=LABELS)
    connected = GaugeMetricFamily("blkif_vbd_connected", "1 while the VBD is Connected",
                                  labels=("domid", "devid"))
    bounds = latency_bounds()
    for vbd in state["vbds"]:
        vbd_labels = [str(vbd["domid"]), str(vbd["devid"])]
        connected.add_metric(vbd_labels, int(vbd["state"] == "Connected"))
        for queue in vbd.get("queues", ()):
            labels = vbd_labels + [str(queue["queue"])]
            for name, _, value in COUNTERS:
                counters[name].add_metric(labels, value(queue))
            for name, _, value in GAUGES:
                gauges[name].add_metric(labels, value(queue))
            cumulative, buckets = 0, []
            for bound, count in zip(bounds, queue["latency"]):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            latency.add_metric(labels, buckets, queue["latency_ns"] / 1e9)
    restarts = CounterMetricFamily("blkif_worker_restarts", "Restarts of a VBD's worker",
                                   labels=("domid", "devid"))
    for worker in (state["service"] or {}).get("workers", ()):
        restarts.add_metric([str(worker["domid"]), str(worker["devid"])], worker["restarts"])
    return [connected, *counters.values(), *gauges.values(), latency, restarts]


class StatusCollector:
    """A prometheus_client collector reading ``state_dir`` at each scrape."""

    def __init__(self, state_dir):
        self.state_dir = state_dir

    def collect(self):
        try:
            state = status.read_status(self.state_dir)
        except UsageError:
            return []  # no state yet: nothing to report
        return families(state)


def registry(state_dir):
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StatusCollector(state_dir))
    return reg


def exposition(state_dir):
    """The text format (``blkif stats --format prometheus``)."""
    return generate_latest(registry(state_dir)).decode()


def parse_address(text):
    """``HOST:PORT``, ``[V6]:PORT`` or ``PORT`` -> (host, port); UsageError if not."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host = ""
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or int(port) > 65535:
        raise UsageError("--metrics %r: expected HOST:PORT or PORT" % text)
    return host, int(port)


def serve(address, state_dir):
    """Serve the metrics on ``address`` from a thread; OSError if it cannot bind.
    Returns the server, whose ``shutdown()`` stops it."""
    host, port = parse_address(address)
    server, _thread = start_http_server(port, host, registry=registry(state_dir))
    return server
