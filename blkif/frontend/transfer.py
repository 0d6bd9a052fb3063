"""A transfer as the block-device API hands it out: :class:`IOHandle`, the
errors a caller sees, and the argument checks every disk makes before a
request is built (the connected disk's own limits are the device's).
"""
from blkif.abi.constants import (
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    SECTOR_SIZE,
)
from blkif.errors import BlkifError, LocalProtocolError

RSP_NAMES = {BLKIF_RSP_OKAY: "BLKIF_RSP_OKAY", BLKIF_RSP_ERROR: "BLKIF_RSP_ERROR",
             BLKIF_RSP_EOPNOTSUPP: "BLKIF_RSP_EOPNOTSUPP"}


class BlockIOError(BlkifError):
    """A transfer failed.  ``op`` is read/write/flush/discard; ``status`` the
    BLKIF_RSP_* the backend answered, or None if no answer was possible
    (the backend went away, the device is not connected, a timeout)."""

    def __init__(self, op, offset, length, status, reason):
        self.op, self.offset, self.length = op, offset, length
        self.status, self.reason = status, reason
        where = "" if op == "flush" else " of %d bytes at %d" % (length, offset)
        super().__init__("%s%s failed: %s" % (op, where, reason))


class NotConnected(BlkifError):
    """The device did not (re)connect in time, was detached, or failed."""


class IOHandle:
    """One submitted transfer.  ``done`` once it finished; then ``data`` holds
    what a read returned and ``error`` a :class:`BlockIOError` if it failed."""

    __slots__ = ("device", "op", "offset", "length", "done", "data", "error")

    def __init__(self, device, op, offset, length):
        self.device, self.op, self.offset, self.length = device, op, offset, length
        self.done, self.data, self.error = False, None, None

    def __repr__(self):
        state = "failed" if self.error else "done" if self.done else "pending"
        return "<IOHandle %s %d+%d %s>" % (self.op, self.offset, self.length, state)

    def result(self, timeout=None):
        """Wait (driving the device) up to ``timeout`` s (default: the device's).

        Returns the bytes read (None for other ops); raises the transfer's
        :class:`BlockIOError`, or one saying no answer came in time (the
        transfer then stays in flight: wait again or give up on the device).
        """
        if not self.done:
            timeout = self.device.options.timeout if timeout is None else timeout
            self.device.wait([self], timeout)
            if not self.done:
                raise BlockIOError(self.op, self.offset, self.length, None,
                                   "no answer within %.1fs" % timeout)
        if self.error is not None:
            raise self.error
        return self.data

    def _finish(self, status, data, reason=None):
        self.done = True
        if status == BLKIF_RSP_OKAY:
            self.data = bytes(data) if data is not None else None
        else:
            reason = reason or "backend answered %s" % RSP_NAMES.get(status, status)
            self.error = BlockIOError(self.op, self.offset, self.length, status, reason)


def describe(op, offset, length):
    return op if op == "flush" else "%s of %d bytes at %d" % (op, length, offset)


def check_range(op, offset, length):
    """Arguments any disk refuses: negative, empty, or not whole sectors."""
    if op == "flush":
        return
    for name, value in (("offset", offset), ("length", length)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise LocalProtocolError("%s: %s must be an int, not %r" % (op, name, value))
    what = describe(op, offset, length)
    if offset < 0 or length <= 0:
        raise LocalProtocolError("%s: offset must be >= 0 and length > 0" % what)
    if offset % SECTOR_SIZE or length % SECTOR_SIZE:
        raise LocalProtocolError("%s: not whole %d-byte sectors" % (what, SECTOR_SIZE))
