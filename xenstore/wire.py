# The xenstore wire format of xen/include/public/io/xs_wire.h, sans-I/O.
#
# Every message is a 16-byte header ``struct xsd_sockmsg`` (type, req_id,
# tx_id, len as native uint32) followed by ``len`` payload bytes, at most
# XENSTORE_PAYLOAD_MAX.  Payloads are NUL-separated strings; which string is
# NUL-terminated differs per operation (see docs/xenstore.md).  This module
# only frames and unframes: it never touches a socket, so the daemon, the
# tests and the fuzzer all drive it with plain bytes.
#
# ``PacketReader.feed`` takes any chunking of a byte stream and returns the
# complete packets; a header announcing more than XENSTORE_PAYLOAD_MAX bytes
# is a protocol violation (xenstored drops such a client), reported as
# ``ProtocolError`` after which the reader refuses further input.
import enum
import struct
from dataclasses import dataclass

from .errors import ProtocolError

XENSTORE_PAYLOAD_MAX = 4096
XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048

HEADER = struct.Struct("=IIII")  # type, req_id, tx_id, len


class Op(enum.IntEnum):
    """``enum xsd_sockmsg_type``; names without the ``XS_`` prefix."""

    CONTROL = 0  # XS_DEBUG
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    # 20 was XS_RESTRICT, removed
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    INVALID = 0xFFFF


#: ``xsd_errors`` in table order: the only error strings on the wire.
XSD_ERRORS = (
    "EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC",
    "EIO", "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN",
    "E2BIG", "EPERM",
)


@dataclass(frozen=True)
class Packet:
    """One message either way; ``type`` may be any uint32 (unknown ops too)."""

    type: int
    req_id: int
    tx_id: int
    payload: bytes

    def __post_init__(self):
        for name in ("type", "req_id", "tx_id"):
            value = getattr(self, name)
            if not 0 <= value <= 0xFFFFFFFF:
                raise ValueError("%s out of uint32 range: %r" % (name, value))
        if len(self.payload) > XENSTORE_PAYLOAD_MAX:
            raise ValueError("payload of %d bytes exceeds XENSTORE_PAYLOAD_MAX"
                             % len(self.payload))

    def encode(self):
        """The packet as wire bytes (header + payload)."""
        return HEADER.pack(self.type, self.req_id, self.tx_id,
                           len(self.payload)) + self.payload

    @property
    def op_name(self):
        try:
            return Op(self.type).name
        except ValueError:
            return "UNKNOWN(%d)" % self.type


def reply(request, payload, type=None):
    """A reply to ``request``: same req_id and tx_id, as xenstored echoes them."""
    return Packet(request.type if type is None else type,
                  request.req_id, request.tx_id, payload)


def error_reply(request, name):
    """An XS_ERROR reply carrying one of :data:`XSD_ERRORS`, NUL-terminated."""
    if name not in XSD_ERRORS:
        name = "EINVAL"  # xenstored's fallback for untranslatable errors
    return reply(request, name.encode() + b"\0", type=Op.ERROR)


def watch_event(path, token):
    """An XS_WATCH_EVENT: ``path\\0token\\0``, req_id and tx_id 0."""
    return Packet(Op.WATCH_EVENT, 0, 0, path + b"\0" + token + b"\0")


def split_strings(payload):
    """NUL-terminated strings at the start of ``payload`` and the unterminated rest.

    ``b"a\\0b\\0c"`` gives ``([b"a", b"b"], b"c")``; this is xenstored's
    ``get_strings`` plus the trailing bytes it leaves to the caller.
    """
    parts = payload.split(b"\0")
    return parts[:-1], parts[-1]


class PacketReader:
    """Incremental decoder of a client's byte stream into :class:`Packet`.

    Call :meth:`feed` with whatever ``recv`` returned; it returns the packets
    completed so far.  After a :class:`ProtocolError` the stream is out of
    sync and every later call raises again: close the connection.
    """

    def __init__(self, max_payload=XENSTORE_PAYLOAD_MAX):
        self._buf = bytearray()
        self._max = max_payload
        self._error = None

    def feed(self, data):
        if self._error is not None:
            raise ProtocolError(self._error)
        self._buf += data
        packets = []
        while len(self._buf) >= HEADER.size:
            type_, req_id, tx_id, length = HEADER.unpack_from(self._buf)
            if length > self._max:
                self._error = ("payload length %d exceeds XENSTORE_PAYLOAD_MAX"
                               % length)
                raise ProtocolError(self._error)
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            payload = bytes(self._buf[HEADER.size:end])
            del self._buf[:end]
            packets.append(Packet(type_, req_id, tx_id, payload))
        return packets

    @property
    def pending(self):
        """Bytes received but not yet part of a complete packet."""
        return len(self._buf)
