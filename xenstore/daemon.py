# The xenstored protocol core, sans-I/O: connections in, packets out.
#
# ``Xenstored.connect(domid)`` gives a ``Connection`` acting as that domain
# (0 is privileged); the I/O layer feeds each decoded request to
# ``Xenstored.handle`` and sends whatever lands in every connection's
# ``outbox`` (replies to this request, watch events for anyone).  A
# connection whose ``closing`` is set must be dropped by the I/O layer.
#
# Dispatch follows xenstored's wire_funcs table: OPS maps each op to its
# handler and flags (PRIV: dom0 only, else EACCES; NOTID: the tx_id is not
# looked up).  Unknown ops, and the reply-only WATCH_EVENT and ERROR, answer
# ENOSYS.  A request naming a transaction this connection did not start
# answers ENOENT.  Requests are answered one at a time, in order.
import logging
from collections import deque

from .perms import DOMID_MAX, READ, Perm, access_for
from .errors import UsageError
from .store import MUTATIONS, Caller, Change, Store, StoreError
from .wire import (XENSTORE_ABS_PATH_MAX, XENSTORE_PAYLOAD_MAX, Op,
                   error_reply, reply, split_strings, watch_event)

log = logging.getLogger("xenstore.daemon")

PRIV, NOTID = 1, 2
DOMID_SELF = 0x7FF0
#: Bytes of unsent output after which a connection is dropped as not reading.
MAX_OUTPUT = 4 << 20
_VALID = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                   b"0123456789-/_@")


class Watch:
    __slots__ = ("path", "token", "prefix_len")

    def __init__(self, path, token, prefix_len):
        self.path = path            # canonical
        self.token = token          # bytes
        self.prefix_len = prefix_len  # stripped from event paths (relative watch)

    def matches(self, change):
        """The rule (xenstored's): does ``change`` fire this watch?  ``fire``
        finds the same watches through an index (a test holds them equal)."""
        if change.exact:
            return change.path == self.path
        return (self.path == "/" or change.path == self.path
                or change.path.startswith(self.path + "/"))


class Domain:
    """A domain known to the daemon: dom0 from the start, others by INTRODUCE."""

    def __init__(self, domid):
        self.domid = domid
        self.target = None
        self.connections = set()
        self.tokens = None  # requests it may make now (a token bucket; None: full)
        self.stamp = 0.0  # when ``tokens`` was last brought up to date
        self.held_back = 0  # requests that had to wait for a token

    @property
    def path(self):
        return "/local/domain/%d" % self.domid

    def count(self, what):
        return sum(len(getattr(c, what)) for c in self.connections)


class Connection:
    """One client connection; ``outbox`` holds Packets for the I/O layer."""

    def __init__(self, conn_id, domain, on_watches=lambda: None, on_output=lambda conn: None):
        self.id = conn_id
        self.domain = domain
        self.watches = []           # change only through the methods below
        self._on_watches = on_watches  # the daemon's index of watches is stale
        self._on_output = on_output    # something to send, or closing
        self.transactions = {}
        self.outbox = deque()
        self.outbytes = 0
        self.closing = None     # a reason once the I/O layer should drop it

    @property
    def domid(self):
        return self.domain.domid

    @property
    def caller(self):
        return Caller(self.domid, self.domid == 0, self.domain.target)

    def send(self, packet):
        if self.closing:
            return
        self.outbox.append(packet)
        self.outbytes += 16 + len(packet.payload)
        self._on_output(self)
        if self.outbytes > MAX_OUTPUT:
            self.close("client does not read its replies and events")

    def sent(self, packet):
        """The I/O layer took ``packet`` out of the outbox."""
        self.outbytes -= 16 + len(packet.payload)

    def add_watch(self, watch):
        self.watches.append(watch)
        self._on_watches()

    def remove_watch(self, index):
        del self.watches[index]
        self._on_watches()

    def clear_watches(self):
        if self.watches:
            self.watches.clear()
            self._on_watches()

    def close(self, reason):
        if self.closing is None:
            self.closing = reason
            self.clear_watches()
            self.transactions.clear()
            self.outbox.clear()
            self._on_output(self)

    def __repr__(self):
        return "<Connection %d domid=%d>" % (self.id, self.domid)


class Xenstored:
    """The daemon's state and request handling, independent of any socket.

    ``on_introduce(domid)`` and ``on_release(domid)`` are called when a domain
    appears or goes, so the I/O layer can open or close its socket.
    """

    def __init__(self, quotas=None, on_introduce=None, on_release=None):
        self.store = Store(quotas)
        self.domains = {0: Domain(0)}
        self.connections = {}
        self._next_conn = 1
        self._watch_index = None  # watched path -> [(conn id, position, conn, watch)]
        self.outgoing = set()  # connections with something to send, or closing: the I/O layer's
        self.on_introduce = on_introduce or (lambda domid: None)
        self.on_release = on_release or (lambda domid: None)

    @property
    def quotas(self):
        return self.store.quotas

    # Connections.

    def connect(self, domid=0):
        domain = self.domains[domid]
        conn = Connection(self._next_conn, domain, self._watches_changed, self.outgoing.add)
        self._next_conn += 1
        domain.connections.add(conn)
        self.connections[conn.id] = conn
        return conn

    def disconnect(self, conn):
        conn.close(conn.closing or "disconnected")
        conn.domain.connections.discard(conn)
        self.connections.pop(conn.id, None)

    # Requests.

    def admit(self, conn, now):
        """Seconds until ``conn`` may make its next request (0.0: now, and
        counted).  An unprivileged domain makes ``burst`` requests at once,
        then ``rate`` a second: one flooding its nodes (XSA-349) or watches
        cannot take the daemon's whole CPU from the others.  ``now`` is a
        monotonic clock in seconds."""
        rate, burst = self.quotas.get("rate", 0), self.quotas.get("burst", 1)
        domain = conn.domain
        if conn.domid == 0 or rate <= 0:
            return 0.0
        if domain.tokens is None:
            domain.tokens = float(burst)
        else:
            domain.tokens = min(float(burst), domain.tokens + (now - domain.stamp) * rate)
        domain.stamp = now
        if domain.tokens >= 1.0:
            domain.tokens -= 1.0
            return 0.0
        if not domain.held_back:
            log.info("domid=%d over %d requests/s: its requests now wait their turn",
                     conn.domid, rate)
        domain.held_back += 1
        return (1.0 - domain.tokens) / rate

    def handle(self, conn, packet):
        """Process one request from ``conn``; replies and events go to outboxes."""
        if conn.closing:
            return
        entry = OPS.get(packet.type)
        if entry is None:
            log.info("domid=%d conn=%d unknown op %s: ENOSYS", conn.domid,
                     conn.id, packet.op_name)
            conn.send(error_reply(packet, "ENOSYS"))
            return
        handler, flags = entry
        if flags & PRIV and conn.domid != 0:
            conn.send(error_reply(packet, "EACCES"))
            return
        tx = None
        if not flags & NOTID and packet.tx_id:
            tx = conn.transactions.get(packet.tx_id)
            if tx is None:
                conn.send(error_reply(packet, "ENOENT"))
                return
        try:
            payload = handler(self, conn, tx, packet)
        except StoreError as e:
            conn.send(error_reply(packet, e.name))
            return
        if payload is None:
            return
        if len(payload) > XENSTORE_PAYLOAD_MAX:
            conn.send(error_reply(packet, "E2BIG"))
        else:
            conn.send(reply(packet, payload))

    # Helpers shared by the handlers.

    def canonical(self, conn, raw, allow_special=False):
        """The absolute path for ``raw`` bytes from ``conn``, or EINVAL."""
        if raw is None or not raw or not _VALID.issuperset(raw):
            raise StoreError("EINVAL")
        path = raw.decode("ascii")
        if path.startswith("@"):
            if not allow_special:
                raise StoreError("EINVAL")
            if len(path) > self.quotas["path"]:
                raise StoreError("EINVAL")
            return path
        if not path.startswith("/"):
            path = conn.domain.path + "/" + path
        if (path.endswith("/") and path != "/") or "//" in path:
            raise StoreError("EINVAL")
        if len(path) > XENSTORE_ABS_PATH_MAX:
            raise StoreError("EINVAL")
        if conn.domid != 0:
            local = 0
            parts = path.split("/", 4)
            if path.startswith("/local/domain/") and len(parts) == 5 and \
                    parts[3].isdigit():
                local = len("/".join(parts[:4])) + 1
            if len(path) - local > self.quotas["path"]:
                raise StoreError("EINVAL")
        return path

    def run(self, conn, tx, method, *args):
        """A store operation, in ``tx`` if given; fires watches outside one."""
        if tx is not None:
            return tx.apply(method, *args)
        result = self.store.apply(conn.caller, method, *args)
        if method in MUTATIONS:
            self.fire(result)
        return result

    def _watches_changed(self):
        self._watch_index = None

    def _watchers(self, change):
        """The watches ``change`` fires, in connection order and each
        connection's watch order (as a scan of every watch would find them)."""
        if self._watch_index is None:
            self._watch_index = {}
            for conn in self.connections.values():
                for position, watch in enumerate(conn.watches):
                    self._watch_index.setdefault(watch.path, []).append(
                        (conn.id, position, conn, watch))
        index, path = self._watch_index, change.path
        found = list(index.get(path, ()))
        if not change.exact:
            cut = path.find("/", 1)
            while cut > 0:
                found += index.get(path[:cut], ())
                cut = path.find("/", cut + 1)
            if path != "/":
                found += index.get("/", ())
        found.sort(key=lambda entry: entry[:2])
        return found

    def fire(self, changes):
        """Send WATCH_EVENTs for ``changes`` to every permitted watcher."""
        for change in changes:
            path = change.path.encode("ascii")
            allowed = {}  # conn id -> whether it may see the change
            for conn_id, _, conn, watch in self._watchers(change):
                if conn.closing:
                    continue
                if conn_id not in allowed:
                    caller = conn.caller
                    allowed[conn_id] = any(
                        access_for(caller.domid, perms, caller.privileged, caller.target) & READ
                        for perms in change.visible_to)
                if allowed[conn_id]:
                    self._event(conn, path[watch.prefix_len:], watch.token)

    def fire_special(self, name):
        node = self.store.tree.lookup(name)
        root = self.store.tree.lookup("/")
        self.fire([Change(name, True, (node.perms, root.perms))])

    @staticmethod
    def _event(conn, path, token):
        if len(path) + len(token) + 2 <= XENSTORE_PAYLOAD_MAX:
            conn.send(watch_event(path, token))

    # Domains.

    def introduce(self, domid):
        """Make domain ``domid`` known (idempotent: a repeat resets its state)."""
        domain = self.domains.get(domid)
        if domain is None:
            self.domains[domid] = Domain(domid)
            log.info("domid=%d introduced", domid)
            self.on_introduce(domid)
            self.fire_special("@introduceDomain")
        else:
            for conn in domain.connections:
                conn.clear_watches()
                conn.transactions.clear()

    def release(self, domid):
        domain = self.domains.pop(domid)
        for conn in list(domain.connections):
            # Closing drops its watches: no events for what the toolstack removes.
            conn.close("domain %d released" % domid)
        for other in self.domains.values():
            if other.target == domid:
                other.target = None
        log.info("domid=%d released", domid)
        self.on_release(domid)
        self.fire_special("@releaseDomain")


# Argument parsing, as xenstored's onearg()/get_strings().

def _onearg(payload):
    if not payload or payload.find(b"\0") != len(payload) - 1:
        raise StoreError("EINVAL")
    return payload[:-1]


def _strings(payload, count=None, at_least=None):
    strings, _rest = split_strings(payload)
    if count is not None and len(strings) != count:
        raise StoreError("EINVAL")
    if at_least is not None and len(strings) < at_least:
        raise StoreError("EINVAL")
    return strings


def _number(raw, limit=0xFFFFFFFF):
    if not raw.isdigit() or len(raw) > 10 or int(raw) > limit:
        raise StoreError("EINVAL")
    return int(raw)


def _perms_bytes(perms):
    return b"".join(str(p).encode() + b"\0" for p in perms)


# Handlers: (daemon, conn, tx, packet) -> reply payload bytes, or None when
# the handler sent its own reply.  StoreError becomes an XS_ERROR reply.

def do_read(d, conn, tx, pkt):
    return d.run(conn, tx, "read", d.canonical(conn, _onearg(pkt.payload)))


def do_directory(d, conn, tx, pkt):
    names = d.run(conn, tx, "directory", d.canonical(conn, _onearg(pkt.payload)))
    return b"".join(n.encode() + b"\0" for n in names)


def do_directory_part(d, conn, tx, pkt):
    path_raw, offset_raw = _strings(pkt.payload, count=2)
    path = d.canonical(conn, path_raw)
    names = d.run(conn, tx, "directory", path)
    gen = d.run(conn, tx, "node_generation", path)
    children = b"".join(n.encode() + b"\0" for n in names)
    offset = int(offset_raw) if offset_raw.isdigit() else 0
    head = str(gen).encode() + b"\0"
    if offset >= len(children):
        return head + b"\0"
    maxlen = XENSTORE_PAYLOAD_MAX - len(head) - 1
    chunk_end = offset
    for name in children[offset:].split(b"\0")[:-1]:
        if (chunk_end - offset) + len(name) >= maxlen:
            break
        chunk_end += len(name) + 1
    body = children[offset:chunk_end]
    if chunk_end == len(children):
        body += b"\0"
    return head + body


def do_get_perms(d, conn, tx, pkt):
    path = d.canonical(conn, _onearg(pkt.payload), allow_special=True)
    return _perms_bytes(d.run(conn, tx, "get_perms", path))


def do_write(d, conn, tx, pkt):
    if b"\0" not in pkt.payload:
        raise StoreError("EINVAL")
    raw, value = pkt.payload.split(b"\0", 1)
    d.run(conn, tx, "write", d.canonical(conn, raw), value)
    return b"OK\0"


def do_mkdir(d, conn, tx, pkt):
    d.run(conn, tx, "mkdir", d.canonical(conn, _onearg(pkt.payload)))
    return b"OK\0"


def do_rm(d, conn, tx, pkt):
    d.run(conn, tx, "rm", d.canonical(conn, _onearg(pkt.payload)))
    return b"OK\0"


def do_set_perms(d, conn, tx, pkt):
    strings = _strings(pkt.payload, at_least=2)
    path = d.canonical(conn, strings[0], allow_special=True)
    try:
        perms = tuple(Perm.parse(s.decode("ascii")) for s in strings[1:])
    except (UsageError, UnicodeDecodeError):
        raise StoreError("EINVAL")
    d.run(conn, tx, "set_perms", path, perms)
    return b"OK\0"


def do_watch(d, conn, tx, pkt):
    raw, token = _strings(pkt.payload, count=2)
    relative = not raw.startswith((b"/", b"@"))
    path = d.canonical(conn, raw, allow_special=True)
    for watch in conn.watches:
        if watch.path == path and watch.token == token:
            raise StoreError("EEXIST")
    if conn.domid != 0 and conn.domain.count("watches") >= d.quotas["watches"]:
        raise StoreError("E2BIG")
    watch = Watch(path, token, len(conn.domain.path) + 1 if relative else 0)
    conn.add_watch(watch)
    conn.send(reply(pkt, b"OK\0"))
    # We fire once up front, as xenstored does.
    d._event(conn, path.encode()[watch.prefix_len:], token)
    return None


def do_unwatch(d, conn, tx, pkt):
    raw, token = _strings(pkt.payload, count=2)
    path = d.canonical(conn, raw, allow_special=True)
    for i, watch in enumerate(conn.watches):
        if watch.path == path and watch.token == token:
            conn.remove_watch(i)
            return b"OK\0"
    raise StoreError("ENOENT")


def do_transaction_start(d, conn, tx, pkt):
    if tx is not None:
        raise StoreError("EBUSY")
    if conn.domid != 0 and (conn.domain.count("transactions")
                            >= d.quotas["transactions"]):
        raise StoreError("ENOSPC")
    tx = d.store.begin(conn.caller)
    conn.transactions[tx.id] = tx
    return str(tx.id).encode() + b"\0"


def do_transaction_end(d, conn, tx, pkt):
    arg = _onearg(pkt.payload)
    if arg not in (b"T", b"F"):
        raise StoreError("EINVAL")
    if tx is None:
        raise StoreError("ENOENT")
    del conn.transactions[tx.id]
    if arg == b"T":
        d.fire(d.store.commit(tx))
    return b"OK\0"


def do_introduce(d, conn, tx, pkt):
    strings = _strings(pkt.payload, at_least=3)
    domid = _number(strings[0], DOMID_MAX)
    if not strings[2].isdigit() or int(strings[2]) <= 0 or domid == 0:
        raise StoreError("EINVAL")
    d.introduce(domid)
    return b"OK\0"


def _known_domain(d, raw):
    domid = _number(raw)
    if domid == 0:
        raise StoreError("EINVAL")
    if domid not in d.domains:
        raise StoreError("ENOENT")
    return domid


def do_release(d, conn, tx, pkt):
    d.release(_known_domain(d, _onearg(pkt.payload)))
    return b"OK\0"


def do_resume(d, conn, tx, pkt):
    _known_domain(d, _onearg(pkt.payload))
    return b"OK\0"


def do_set_target(d, conn, tx, pkt):
    raw_domid, raw_target = _strings(pkt.payload, at_least=2)[:2]
    domid, target = _number(raw_domid), _number(raw_target)
    if domid not in d.domains or target not in d.domains:
        raise StoreError("ENOENT")
    d.domains[domid].target = target
    return b"OK\0"


def do_get_domain_path(d, conn, tx, pkt):
    return b"/local/domain/%d\0" % _number(_onearg(pkt.payload))


def do_is_domain_introduced(d, conn, tx, pkt):
    domid = _number(_onearg(pkt.payload))
    return b"T\0" if domid == DOMID_SELF or domid in d.domains else b"F\0"


def do_reset_watches(d, conn, tx, pkt):
    conn.clear_watches()
    conn.transactions.clear()
    return b"OK\0"


#: XS_CONTROL commands we answer; the rest of xenstore-control's are EINVAL.
CONTROL_COMMANDS = ("help", "print", "check")


def do_control(d, conn, tx, pkt):
    strings = _strings(pkt.payload, at_least=1)
    command = strings[0].decode("ascii", "replace")
    if command == "help":
        return "".join(c + "\n" for c in CONTROL_COMMANDS).encode() + b"\0"
    if command == "print":
        log.info("control print: %s", b" ".join(strings[1:]).decode("ascii", "replace"))
        return b"OK\0"
    if command == "check":
        return b"OK\0"
    raise StoreError("EINVAL")


#: Op -> (handler, flags), xenstored's wire_funcs.
OPS = {
    Op.CONTROL: (do_control, PRIV),
    Op.DIRECTORY: (do_directory, 0),
    Op.READ: (do_read, 0),
    Op.GET_PERMS: (do_get_perms, 0),
    Op.WATCH: (do_watch, NOTID),
    Op.UNWATCH: (do_unwatch, NOTID),
    Op.TRANSACTION_START: (do_transaction_start, 0),
    Op.TRANSACTION_END: (do_transaction_end, 0),
    Op.INTRODUCE: (do_introduce, PRIV),
    Op.RELEASE: (do_release, PRIV),
    Op.GET_DOMAIN_PATH: (do_get_domain_path, 0),
    Op.WRITE: (do_write, 0),
    Op.MKDIR: (do_mkdir, 0),
    Op.RM: (do_rm, 0),
    Op.SET_PERMS: (do_set_perms, 0),
    Op.IS_DOMAIN_INTRODUCED: (do_is_domain_introduced, PRIV),
    Op.RESUME: (do_resume, PRIV),
    Op.SET_TARGET: (do_set_target, PRIV),
    Op.RESET_WATCHES: (do_reset_watches, 0),
    Op.DIRECTORY_PART: (do_directory_part, 0),
}
