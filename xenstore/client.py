# The xenstore client: pyxs underneath (see _router.py), our API on top.
#
# Conventions every method follows:
# - Paths are ``str``; relative ones are under the connection's own
#   /local/domain/<domid>.  A syntactically bad path raises UsageError before
#   anything is sent.
# - Values read are ``bytes``; ``write`` takes bytes, str (UTF-8) or int.
# - A missing node raises NoEntry naming the path, unless the caller passed a
#   ``default``, which is then returned instead (``read(p, None)``).
# - Any other refusal raises the ErrorReply subclass for its errno name; a
#   dead connection or a reply not arriving within ``timeout`` raises
#   ConnectionLost, after which the object is closed.
#
# Threads: plain requests may come from several threads at once (each waits
# for its own reply).  A Transaction or a Watch belongs to one thread.
import itertools
import logging
import os
import queue
import random
import stat
import threading
import time
from typing import NamedTuple

from pyxs.exceptions import PyXSError

from . import xenbus
from ._router import DEAD, Router, SocketConnection, XenBusConnection, make_packet
from .errors import (BadValue, Conflict, ConnectionLost, ErrorReply, NoEntry,
                     ProtocolError, TransactionConflict, UsageError)
from .perms import check_path, parse_perms, Perm
from .wire import Op

log = logging.getLogger("xenstore.client")

DEFAULT_SOCKET = "/var/run/xenstored/socket"
XENBUS_DEVICE = "/dev/xen/xenbus"
DEFAULT_TIMEOUT = 30.0
DEFAULT_ATTEMPTS = 16
_RAISE = object()
_CLOSED = object()

#: Spellings read_bool accepts; Xen drivers write "0" and "1".
BOOLS = {b"1": True, b"0": False, b"true": True, b"false": False,
         b"y": True, b"n": False}


class WatchEvent(NamedTuple):
    """A fired watch: the node that changed (relative if the watch was) and token."""

    path: str
    token: str


def _encode_path(path, allow_special=False):
    return check_path(path, allow_special).encode("ascii") + b"\0"


def _encode_value(value):
    if isinstance(value, bytes):
        return value
    if isinstance(value, bool):
        return b"1" if value else b"0"
    if isinstance(value, (str, int)):
        return str(value).encode("utf-8")
    raise UsageError("xenstore values are bytes, str or int, not %r" % (value,))


class _Ops:
    """Node operations shared by Xenstore and Transaction (``_request`` differs)."""

    def _request(self, op, payload, path=None):
        raise NotImplementedError

    def read(self, path, default=_RAISE):
        """The value of node ``path`` as bytes (b"" for a directory node).

        Missing: return ``default`` if given, else raise NoEntry.
        """
        try:
            return self._request(Op.READ, _encode_path(path), path)
        except NoEntry:
            if default is _RAISE:
                raise
            return default

    def read_str(self, path, default=_RAISE):
        """The value decoded as UTF-8 (BadValue if it is not)."""
        raw = self.read(path, _RAISE if default is _RAISE else None)
        if raw is None:
            return default
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadValue(path, raw, "UTF-8 text") from None

    def read_int(self, path, default=_RAISE):
        """The value as a decimal integer ("%d"/"%u" as drivers write them).

        Missing: ``default`` or NoEntry; not a number: BadValue naming the path.
        """
        raw = self.read(path, _RAISE if default is _RAISE else None)
        if raw is None:
            return default
        text = raw.strip()
        digits = text[1:] if text[:1] in (b"-", b"+") else text
        if not digits.isdigit():
            raise BadValue(path, raw, "a decimal integer")
        return int(text)

    def read_bool(self, path, default=_RAISE):
        """The value as a flag: "1"/"0" (also "true"/"false", "y"/"n")."""
        raw = self.read(path, _RAISE if default is _RAISE else None)
        if raw is None:
            return default
        try:
            return BOOLS[raw.strip().lower()]
        except KeyError:
            raise BadValue(path, raw, "a flag 0 or 1") from None

    def write(self, path, value):
        """Set node ``path`` to ``value``, creating it and missing parents
        (which inherit their parent's permissions)."""
        self._request(Op.WRITE, _encode_path(path) + _encode_value(value), path)

    def mkdir(self, path):
        """Create ``path`` (and parents) with an empty value; no-op if it exists."""
        self._request(Op.MKDIR, _encode_path(path), path)

    def rm(self, path):
        """Remove ``path`` and everything below it.  A missing node whose parent
        exists is fine; a missing parent raises NoEntry."""
        self._request(Op.RM, _encode_path(path), path)

    def list(self, path):
        """Names of the children of ``path``, in creation order."""
        try:
            payload = self._request(Op.DIRECTORY, _encode_path(path), path)
        except ErrorReply as e:
            if e.name != "E2BIG":
                raise
            return self._list_in_parts(path)
        return [n.decode("ascii") for n in payload.split(b"\0")[:-1]]

    def _list_in_parts(self, path):
        # DIRECTORY_PART replies "<generation>\0" + children; a final extra
        # NUL ends the list; a changed generation means start over.
        names, offset, generation = [], 0, None
        while True:
            payload = self._request(
                Op.DIRECTORY_PART,
                _encode_path(path) + str(offset).encode() + b"\0", path)
            gen, _, chunk = payload.partition(b"\0")
            if generation is not None and gen != generation:
                names, offset, generation = [], 0, None
                continue
            generation = gen
            done = chunk in (b"", b"\0") or chunk.endswith(b"\0\0")
            if chunk.endswith(b"\0\0"):
                chunk = chunk[:-1]
            if chunk not in (b"", b"\0"):
                names.extend(n.decode("ascii") for n in chunk.split(b"\0")[:-1])
                offset += len(chunk)
            if done:
                return names

    def exists(self, path):
        """True if ``path`` exists (EACCES still raises: we cannot tell)."""
        return self.read(path, None) is not None

    def get_perms(self, path):
        """The node's permissions as a list of Perm, owner first."""
        payload = self._request(Op.GET_PERMS, _encode_path(path, True), path)
        return [Perm.parse(p.decode("ascii")) for p in payload.split(b"\0")[:-1]]

    def set_perms(self, path, perms):
        """Set permissions: Perm objects or strings, owner first (["n0", "r5"])."""
        perms = parse_perms(perms)
        payload = _encode_path(path, True) + b"".join(
            str(p).encode() + b"\0" for p in perms)
        self._request(Op.SET_PERMS, payload, path)

    # Typed XenbusState helpers (xenbus.py), for drivers.

    def read_state(self, path):
        """XenbusState in node ``path`` (Unknown if missing)."""
        return xenbus.read_state(self, path)

    def switch_state(self, path, state):
        """Write XenbusState ``state`` into node ``path``."""
        return xenbus.switch_state(self, path, state)


class Xenstore(_Ops):
    """A connection to xenstored: ours, a real one, or /dev/xen/xenbus.

    Open with :meth:`open` and close (or use ``with``).  See the module
    comment for the conventions of every method.
    """

    def __init__(self, router, timeout=DEFAULT_TIMEOUT, where=None):
        self._router = router
        self._rq_ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._watches = set()
        self._lock = threading.Lock()
        self.timeout = timeout
        self.where = where

    @classmethod
    def open(cls, path=None, timeout=DEFAULT_TIMEOUT):
        """Connect and return a ready Xenstore.

        ``path``: a Unix socket or the xenbus device.  None means
        ``$XENSTORED_PATH``, else /var/run/xenstored/socket if present, else
        /dev/xen/xenbus if present.  A guest of our embedded daemon passes
        ``domain_socket_path(main_socket, domid)``.  Raises ConnectionLost if
        nothing answers there.
        """
        if path is None:
            path = os.environ.get("XENSTORED_PATH")
        if path is None:
            path = DEFAULT_SOCKET
            if not os.path.exists(path) and os.path.exists(XENBUS_DEVICE):
                path = XENBUS_DEVICE
        try:
            is_device = stat.S_ISCHR(os.stat(path).st_mode)
        except OSError:
            is_device = False
        connection = XenBusConnection(path) if is_device else SocketConnection(path)
        router = Router(connection)
        try:
            router.start()
        except (PyXSError, OSError) as e:
            router.terminate()
            raise ConnectionLost("cannot connect to xenstored at %s: %s"
                                 % (path, e)) from None
        return cls(router, timeout, path)

    def __repr__(self):
        return "<Xenstore %s%s>" % (self.where, " closed" if self.closed else "")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def closed(self):
        return self._router.dead

    def close(self):
        """Close the connection and stop its thread; idempotent."""
        watches = list(self._watches)
        for watch in watches:
            watch._detach()
        self._router.terminate()
        for watch in watches:
            watch._join()

    def _request(self, op, payload, path=None, tx_id=0):
        router = self._router
        if router.dead:
            raise ConnectionLost("xenstore connection to %s is closed (%s)"
                                 % (self.where, router.error), path)
        rq_id = next(self._rq_ids) & 0xFFFFFFFF
        try:
            rvar = router.send(make_packet(op, payload, rq_id, tx_id))
        except (PyXSError, OSError) as e:
            raise ConnectionLost("xenstore send to %s failed: %s"
                                 % (self.where, e), path) from None
        deadline = time.monotonic() + self.timeout
        with rvar.condition:
            while rvar.target is None and not router.dead:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                rvar.condition.wait(min(remaining, 0.5))
        packet = rvar.target
        if packet is None or packet is DEAD:
            if packet is None and not router.dead:
                log.error("no reply from xenstored at %s within %.1fs; closing",
                          self.where, self.timeout)
                self.close()
                raise ConnectionLost("no reply from xenstored within %.1fs (%s)"
                                     % (self.timeout, Op(op).name), path)
            raise ConnectionLost("xenstore connection to %s lost (%s)"
                                 % (self.where, router.error), path)
        if packet.op == Op.ERROR:
            name = packet.payload.rstrip(b"\0").decode("ascii", "replace")
            raise ErrorReply.from_name(name, path, Op(op).name)
        if packet.op != op:
            raise ProtocolError("xenstored answered %s with op %d"
                                % (Op(op).name, packet.op), path)
        return packet.payload

    # Watches.

    def watch(self, path, token=None, callback=None):
        """Watch ``path`` (or "@introduceDomain"/"@releaseDomain").

        Returns a Watch.  Events are (path, token) WatchEvent tuples; as in
        xenstored, one fires right away, then one per change at or below the
        path (removal included).  Without ``callback``, iterate the Watch or
        call ``get(timeout)``; with it, ``callback(event)`` runs on a thread
        of its own.  ``Watch.close()`` (or ``with``) unwatches.
        """
        if token is None:
            token = "xs-%d-%d" % (os.getpid(), next(self._tokens))
        watch = Watch(self, path, token, callback)
        watch._register()
        return watch

    def reset_watches(self):
        """XS_RESET_WATCHES: drop every watch and transaction of this connection."""
        self._request(Op.RESET_WATCHES, b"")

    # Transactions.

    def transaction(self):
        """One attempt: ``with xs.transaction() as t: ...`` commits on a clean
        exit, aborts on an exception, and raises Conflict (EAGAIN) if another
        writer won; prefer :meth:`transactions`, which retries."""
        return Transaction(self, retrying=False)

    def transactions(self, attempts=DEFAULT_ATTEMPTS):
        """Retrying transactions: run the body again until it commits::

            for t in xs.transactions():
                with t:
                    t.write("n", t.read_int("n") + 1)

        Each attempt is a fresh transaction; a conflicting commit (EAGAIN)
        starts the next one after a short random back-off.  After
        ``attempts`` conflicts, raises TransactionConflict.  Any other
        exception in the body aborts the transaction and propagates.
        """
        for attempt in range(attempts):
            tx = Transaction(self, retrying=True)
            yield tx
            if tx.state == "committed":
                return
            if tx.state != "conflicted":
                raise UsageError("use each transaction from transactions() "
                                 "in a with block")
            time.sleep(random.uniform(0, 0.0005 * (2 ** min(attempt, 6))))
        raise TransactionConflict(attempts)

    def transact(self, body, attempts=DEFAULT_ATTEMPTS):
        """``body(t)`` in a retrying transaction; returns what the last run returned."""
        for tx in self.transactions(attempts):
            with tx:
                result = body(tx)
        return result

    # Domains.

    def domain_path(self, domid):
        """XS_GET_DOMAIN_PATH: "/local/domain/<domid>"."""
        payload = self._request(Op.GET_DOMAIN_PATH, b"%d\0" % domid)
        return payload.rstrip(b"\0").decode("ascii")

    def introduce_domain(self, domid, mfn=0, port=1):
        """XS_INTRODUCE (dom0 only).  Our daemon then opens the domain's socket,
        ``domain_socket_path(main, domid)``; a real one maps its ring page."""
        self._request(Op.INTRODUCE, b"%d\0%d\0%d\0" % (domid, mfn, port))

    def release_domain(self, domid):
        """XS_RELEASE (dom0 only): forget the domain; fires @releaseDomain."""
        self._request(Op.RELEASE, b"%d\0" % domid)

    def is_domain_introduced(self, domid):
        """XS_IS_DOMAIN_INTRODUCED (dom0 only)."""
        return self._request(Op.IS_DOMAIN_INTRODUCED, b"%d\0" % domid) == b"T\0"

    def wait_for_state(self, path, states, timeout):
        """Block until node ``path`` holds one of ``states`` (XenbusState or
        a collection of them); return it.  WaitTimeout after ``timeout`` s."""
        return xenbus.wait_for_state(self, path, states, timeout)


class Watch:
    """A registered watch; see :meth:`Xenstore.watch`."""

    def __init__(self, xs, path, token, callback=None):
        check_path(path, allow_special=True)
        self.xs = xs
        self.path = path
        self.token = token
        self.callback = callback
        self._token = token.encode("ascii")
        self._queue = queue.Queue()
        self._thread = None
        self.closed = False

    def __repr__(self):
        return "<Watch %s token=%s>" % (self.path, self.token)

    def _register(self):
        router = self.xs._router
        with self.xs._lock:
            if self._token in router.watch_queues:
                raise UsageError("watch token %r already in use on this connection"
                                 % self.token, self.path)
            router.watch_queues[self._token] = self._queue
            self.xs._watches.add(self)
        try:
            self.xs._request(Op.WATCH, _encode_path(self.path, True) + self._token
                             + b"\0", self.path)
        except BaseException:
            self._detach()
            raise
        if self.callback is not None:
            self._thread = threading.Thread(target=self._dispatch, daemon=True,
                                            name="xenstore-watch-%s" % self.token)
            self._thread.start()

    def get(self, timeout=None):
        """The next event, or None if ``timeout`` s pass first.

        Raises ConnectionLost if the connection died, UsageError if closed.
        """
        if self.closed and self._queue.empty():
            raise UsageError("watch on %s is closed" % self.path, self.path)
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is None:
            self._queue.put(None)   # keep telling every later caller
            raise ConnectionLost("xenstore connection lost while watching %s"
                                 % self.path, self.path)
        if item is _CLOSED:
            raise UsageError("watch on %s is closed" % self.path, self.path)
        return WatchEvent(item[0].decode("ascii", "replace"),
                          item[1].decode("ascii", "replace"))

    def __iter__(self):
        """Events until the watch is closed (then the iteration just ends)."""
        while True:
            try:
                event = self.get()
            except UsageError:
                if self.closed:
                    return
                raise
            yield event

    def _dispatch(self):
        try:
            for event in self:
                try:
                    self.callback(event)
                except Exception:  # noqa: BLE001 - one bad callback must not kill the watch
                    log.exception("watch callback for %s failed", self.path)
        except ConnectionLost:
            log.warning("xenstore connection lost; watch on %s ends", self.path)

    def _detach(self):
        self.closed = True
        with self.xs._lock:
            if self.xs._router.watch_queues.get(self._token) is self._queue:
                del self.xs._router.watch_queues[self._token]
            self.xs._watches.discard(self)
        self._queue.put(_CLOSED)

    def close(self):
        """UNWATCH and stop delivering; idempotent, safe after the connection died."""
        if self.closed:
            return
        try:
            if not self.xs.closed:
                self.xs._request(Op.UNWATCH, _encode_path(self.path, True)
                                 + self._token + b"\0", self.path)
        except (ConnectionLost, ErrorReply):
            pass
        finally:
            self._detach()
            self._join()

    def _join(self):
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    unwatch = close

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Transaction(_Ops):
    """One xenstore transaction; use in ``with``.  Reads see the snapshot the
    transaction started from plus its own writes; nothing is visible to others
    (nor fires watches) before commit."""

    def __init__(self, xs, retrying=False):
        self.xs = xs
        self.id = None
        self.state = "new"      # new, open, committed, aborted, conflicted
        self._retrying = retrying

    def __repr__(self):
        return "<Transaction %s %s>" % (self.id, self.state)

    def _request(self, op, payload, path=None):
        if self.state != "open":
            raise UsageError("transaction is %s, not open" % self.state, path)
        return self.xs._request(op, payload, path, tx_id=self.id)

    def __enter__(self):
        if self.state != "new":
            raise UsageError("a transaction can only be entered once")
        payload = self.xs._request(Op.TRANSACTION_START, b"\0")
        self.id = int(payload.rstrip(b"\0"))
        self.state = "open"
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.state != "open":
            return False
        if exc_type is not None:
            self._end(b"F", "aborted")
            if isinstance(exc, Conflict) and self._retrying:
                self.state = "conflicted"
                return True
            return False
        try:
            self.xs._request(Op.TRANSACTION_END, b"T\0", tx_id=self.id)
        except Conflict:
            self.state = "conflicted"
            if self._retrying:
                return True
            raise
        self.state = "committed"
        return False

    def abort(self):
        """End the transaction without committing (also what an exception does)."""
        if self.state == "open":
            self._end(b"F", "aborted")

    def _end(self, how, state):
        self.state = state
        try:
            self.xs._request(Op.TRANSACTION_END, how + b"\0", tx_id=self.id)
        except (ConnectionLost, ErrorReply) as e:
            log.debug("ending transaction %s: %s", self.id, e)
