# XenbusState and the helpers a split driver needs on top of a client.
#
# The state machine itself is in xen/include/public/io/xenbus.h: each end
# publishes its state in its own ``state`` node as a decimal string, and
# watches the other end's.  These helpers take the full path of a ``state``
# node (".../backend/vbd/5/51712/state"); they work on any object with the
# client's ``read``/``write``/``watch`` methods (``Xenstore`` or a
# ``Transaction`` for the read/write ones).
import enum
import time

from .errors import BadValue, NoEntry, WaitTimeout


class XenbusState(enum.IntEnum):
    """``enum xenbus_state`` of xen/include/public/io/xenbus.h."""

    Unknown = 0
    Initialising = 1
    InitWait = 2        # finished early init, waiting for the peer's details
    Initialised = 3     # ready to connect (frontend published its rings)
    Connected = 4
    Closing = 5         # the device is being torn down
    Closed = 6
    Reconfiguring = 7
    Reconfigured = 8


def read_state(xs, path):
    """The state in node ``path``; a missing node reads as Unknown, as Linux's
    xenbus_read_driver_state.  A value that is not a known state raises
    BadValue naming the path."""
    try:
        raw = xs.read(path)
    except NoEntry:
        return XenbusState.Unknown
    text = raw.decode("ascii", "replace").strip()
    try:
        return XenbusState(int(text))
    except ValueError:
        raise BadValue(path, raw, "a XenbusState number 0..8") from None


def switch_state(xs, path, state):
    """Publish ``state`` in node ``path`` (decimal, as every Xen driver writes)."""
    state = XenbusState(state)
    xs.write(path, str(int(state)))
    return state


def wait_for_state(xs, path, states, timeout):
    """Block until node ``path`` holds one of ``states``; return the state seen.

    Watch-based: each change of the node wakes us, no polling.  Raises
    WaitTimeout (a TimeoutError naming the path and the last state seen) after
    ``timeout`` seconds, ConnectionLost if the connection dies.
    """
    if isinstance(states, (int, XenbusState)):
        states = (states,)
    wanted = frozenset(XenbusState(s) for s in states)
    deadline = time.monotonic() + timeout
    with xs.watch(path) as watch:
        state = read_state(xs, path)
        while state not in wanted:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or watch.get(timeout=remaining) is None:
                raise WaitTimeout(path, "/".join(s.name for s in sorted(wanted)),
                                  state.name, timeout)
            state = read_state(xs, path)
        return state
