"""xenstore.wire: one table of cases drives encode and decode; the reader
survives any chunking and rejects oversize payloads for good."""
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import require_header
from xenstore.errors import ProtocolError
from xenstore.wire import (HEADER, XENSTORE_PAYLOAD_MAX, XSD_ERRORS, Op, Packet,
                           PacketReader, error_reply, split_strings, watch_event)

#: (packet, its wire bytes) on x86_64 (native little-endian uint32s).
CASES = [
    (Packet(Op.READ, 7, 0, b"/a\0"),
     struct.pack("<IIII", 2, 7, 0, 3) + b"/a\0"),
    (Packet(Op.WRITE, 1, 9, b"/a\0value"),
     struct.pack("<IIII", 11, 1, 9, 8) + b"/a\0value"),
    (Packet(Op.TRANSACTION_START, 0xFFFFFFFF, 0, b"\0"),
     struct.pack("<IIII", 6, 0xFFFFFFFF, 0, 1) + b"\0"),
    (watch_event(b"/x", b"tok"),
     struct.pack("<IIII", 15, 0, 0, 7) + b"/x\0tok\0"),
    (Packet(Op.DIRECTORY_PART, 3, 0, b""), struct.pack("<IIII", 22, 3, 0, 0)),
]


@pytest.mark.parametrize("packet,raw", CASES)
def test_encode(packet, raw):
    assert packet.encode() == raw


@pytest.mark.parametrize("packet,raw", CASES)
def test_decode(packet, raw):
    assert PacketReader().feed(raw) == [packet]


def test_op_numbers_match_xs_wire_h():
    text = open(require_header("/usr/include/xen/io/xs_wire.h")).read()
    body = text[text.index("enum xsd_sockmsg_type"):text.index("XS_TYPE_COUNT")]
    names = [line.strip().rstrip(",").split()[0] for line in body.splitlines()[2:]
             if line.strip().startswith("XS_") and "XS_DEBUG" not in line]
    value = 0
    for name in names:
        if name == "XS_RESET_WATCHES":
            value = Op.SET_TARGET + 2
        assert Op[name[3:]] == value, name
        value += 1
    assert HEADER.size == 16


def test_error_names_match_xs_wire_h():
    text = open(require_header("/usr/include/xen/io/xs_wire.h")).read()
    names = [line.split("(")[1].split(")")[0] for line in text.splitlines()
             if line.strip().startswith("XSD_ERROR(E")]
    assert tuple(names) == XSD_ERRORS


def test_error_reply_is_nul_terminated_and_echoes_ids():
    request = Packet(Op.READ, 42, 5, b"/x\0")
    assert error_reply(request, "ENOENT") == Packet(Op.ERROR, 42, 5, b"ENOENT\0")
    assert error_reply(request, "EWHATEVER").payload == b"EINVAL\0"


def test_split_strings():
    assert split_strings(b"a\0b\0c") == ([b"a", b"b"], b"c")
    assert split_strings(b"") == ([], b"")


def test_oversize_payload_is_a_protocol_error_and_sticks():
    reader = PacketReader()
    with pytest.raises(ProtocolError):
        reader.feed(struct.pack("=IIII", 2, 1, 0, XENSTORE_PAYLOAD_MAX + 1))
    with pytest.raises(ProtocolError):
        reader.feed(Packet(Op.READ, 1, 0, b"/\0").encode())


def test_packet_validates_itself():
    with pytest.raises(ValueError):
        Packet(Op.READ, 1, 0, b"x" * (XENSTORE_PAYLOAD_MAX + 1))
    with pytest.raises(ValueError):
        Packet(Op.READ, -1, 0, b"")


packets = st.builds(Packet, st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF),
                    st.integers(0, 0xFFFFFFFF),
                    st.binary(max_size=XENSTORE_PAYLOAD_MAX))


@settings(max_examples=200, deadline=None)
@given(st.lists(packets, max_size=5), st.lists(st.integers(1, 5000), max_size=20))
def test_any_chunking_yields_the_same_packets(sent, cuts):
    stream = b"".join(p.encode() for p in sent)
    reader, got, pos = PacketReader(), [], 0
    for cut in cuts:
        got += reader.feed(stream[pos:pos + cut])
        pos += cut
    got += reader.feed(stream[pos:])
    assert got == sent
    assert reader.pending == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_reader(data):
    reader = PacketReader()
    try:
        for packet in reader.feed(data):
            assert len(packet.payload) <= XENSTORE_PAYLOAD_MAX
    except ProtocolError:
        pass
