"""Negotiation: each end's nodes read back by the other, Linux's layouts, every
cap enforced, and every state pair of both tables."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkif.errors import RemoteProtocolError
from blkif.negotiate import (
    BACKEND_ON_FRONTEND,
    FRONTEND_ON_BACKEND,
    BackendOffer,
    Connection,
    DiskInfo,
    FrontendWants,
    QueueRing,
    backend_action,
    frontend_action,
)
from xenstore import XenbusState as S

OFFER = BackendOffer(max_queues=4, discard=True, discard_secure=True)


def test_offer_nodes_match_what_linux_blkback_writes():
    nodes = BackendOffer(max_queues=2, discard=True).nodes()
    assert nodes == {
        "feature-flush-cache": "1", "feature-barrier": "1", "feature-persistent": "1",
        "max-ring-page-order": "4", "multi-queue-max-queues": "2",
        "feature-max-indirect-segments": "256", "feature-discard": "1",
        "discard-granularity": "4096", "discard-alignment": "0", "discard-secure": "0",
    }


@given(
    order=st.integers(0, 4), queues=st.integers(1, 16), indirect=st.integers(0, 4096),
    persistent=st.booleans(), discard=st.booleans(), secure=st.booleans(),
)
def test_offer_reads_back(order, queues, indirect, persistent, discard, secure):
    offer = BackendOffer(order, queues, indirect, persistent, discard=discard,
                         discard_secure=discard and secure)
    assert BackendOffer.read(offer.nodes().get) == offer


def test_absent_offer_nodes_mean_the_oldest_backend():
    offer = BackendOffer.read({}.get)
    assert (offer.max_ring_page_order, offer.max_queues, offer.max_indirect_segments,
            offer.persistent, offer.flush, offer.discard) == (0, 1, 0, False, False, False)


@pytest.mark.parametrize("bad", [{"max-ring-page-order": "5"},
                                 {"feature-max-indirect-segments": "4097"},
                                 {"multi-queue-max-queues": "x"}])
def test_offer_out_of_range_is_named(bad):
    with pytest.raises(RemoteProtocolError, match=list(bad)[0]):
        BackendOffer.read(bad.get)


def test_single_queue_single_page_layout():
    conn = Connection(queues=(QueueRing((8,), 5),))
    assert conn.nodes() == {"feature-persistent": "0", "ring-ref": "8", "event-channel": "5"}


def test_multi_queue_multi_page_layout_as_linux_writes_it():
    conn = Connection(
        queues=(QueueRing((1, 2, 3, 4), 10), QueueRing((5, 6, 7, 8), 11)),
        ring_page_order=2, protocol="x86_64-abi", persistent=True)
    nodes = conn.nodes()
    assert nodes["ring-page-order"] == "2" and nodes["multi-queue-num-queues"] == "2"
    assert nodes["queue-1/ring-ref3"] == "8" and nodes["queue-0/event-channel"] == "10"
    assert "ring-ref" not in nodes and "event-channel" not in nodes
    assert Connection.read(nodes.get, OFFER) == conn


@given(
    order=st.integers(0, 4), nqueues=st.integers(1, 4), persistent=st.booleans(),
    protocol=st.sampled_from(["", "x86_64-abi", "x86_32-abi", "arm-abi"]),
    data=st.data(),
)
def test_connection_reads_back(order, nqueues, persistent, protocol, data):
    refs = st.integers(0, 2**32 - 1)
    queues = tuple(
        QueueRing(tuple(data.draw(refs) for _ in range(1 << order)), data.draw(refs))
        for _ in range(nqueues))
    conn = Connection(queues, order, protocol, persistent)
    assert Connection.read(conn.nodes().get, OFFER) == conn


def test_persistent_needs_both_ends():
    nodes = Connection((QueueRing((1,), 2),), persistent=True).nodes()
    assert Connection.read(nodes.get, OFFER).persistent
    assert not Connection.read(nodes.get, BackendOffer(persistent=False)).persistent


GOOD = {"ring-ref": "1", "event-channel": "2"}


@pytest.mark.parametrize("change,named", [
    ({"ring-page-order": "5"}, "ring-page-order"),
    ({"ring-page-order": "1", "ring-ref0": "1"}, "ring-ref1"),
    ({"multi-queue-num-queues": "5"}, "multi-queue-num-queues"),
    ({"multi-queue-num-queues": "0"}, "multi-queue-num-queues"),
    ({"protocol": "x86_16-abi"}, "x86_16-abi"),
    ({"ring-ref": None}, "ring-ref"),
    ({"event-channel": "-1"}, "event-channel"),
    ({"event-channel": "4294967296"}, "event-channel"),
    ({"ring-ref": "0x10"}, "ring-ref"),
])
def test_bad_frontend_nodes_are_refused_by_name(change, named):
    nodes = dict(GOOD, **change)
    with pytest.raises(RemoteProtocolError, match=named):
        Connection.read(nodes.get, OFFER)


def test_disk_info_round_trip_and_checks():
    disk = DiskInfo(sectors=2048, sector_size=4096, physical_sector_size=4096, info=4)
    assert DiskInfo.read(disk.nodes().get) == disk and disk.readonly
    with pytest.raises(RemoteProtocolError, match="sector-size"):
        DiskInfo.read({"sectors": "8", "sector-size": "1000"}.get)
    with pytest.raises(RemoteProtocolError, match="missing node sectors"):
        DiskInfo.read({"sector-size": "512"}.get)


def test_frontend_takes_the_smaller_of_each_limit():
    wants = FrontendWants(max_ring_page_order=2, max_queues=8, max_indirect_segments=32)
    assert wants.choose(OFFER) == (2, 4, 32, True)
    # Indirect no larger than a direct request is not worth using.
    assert FrontendWants(max_indirect_segments=8).choose(OFFER)[2] == 0


STATES = list(S)


@pytest.mark.parametrize("own", STATES)
@pytest.mark.parametrize("other", STATES)
def test_every_state_pair_has_a_defined_action(own, other):
    assert backend_action(own, other) in (None, "init_wait", "connect", "closing", "closed",
                                          "remove", "fatal")
    assert frontend_action(own, other) in (None, "setup", "connect", "close")


def test_tables_cover_every_state():
    assert set(BACKEND_ON_FRONTEND) == set(S) == set(FRONTEND_ON_BACKEND)


def test_linux_backend_transitions():
    assert backend_action(S.InitWait, S.Initialised) == "connect"
    assert backend_action(S.InitWait, S.Connected) == "connect"
    assert backend_action(S.Connected, S.Connected) is None
    assert backend_action(S.Closed, S.Connected) is None  # stale: wait for Initialising
    assert backend_action(S.Connected, S.Closing) == "closing"
    assert backend_action(S.Closing, S.Closed) == "closed"
    assert backend_action(S.Closed, S.Initialising) == "init_wait"  # reconnect
    assert backend_action(S.InitWait, S.Initialising) is None
    assert backend_action(S.Connected, S.Unknown) == "remove"
    assert backend_action(S.Connected, S.Reconfiguring) == "fatal"


def test_linux_frontend_transitions():
    assert frontend_action(S.Initialising, S.InitWait) == "setup"
    assert frontend_action(S.Initialised, S.InitWait) is None
    assert frontend_action(S.Initialised, S.Connected) == "connect"
    assert frontend_action(S.Initialising, S.Connected) == "connect"
    assert frontend_action(S.Connected, S.Closing) == "close"
    assert frontend_action(S.Closed, S.Closed) is None
