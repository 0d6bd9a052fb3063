# One error root for the xenstore package, split like h11's: what the daemon
# answered (``ErrorReply`` and its per-errno subclasses), what broke underneath
# (``ConnectionLost``), what a peer sent that breaks the protocol
# (``ProtocolError``), and what our caller got wrong (``UsageError``).  Every
# error that concerns a node carries its ``path`` and names it in its message.
import errno as _errno


class XenstoreError(Exception):
    """Root of every error this package raises on purpose.

    ``path`` is the node concerned, or None when no node is.
    """

    def __init__(self, message, path=None):
        super().__init__(message)
        self.path = path


class UsageError(XenstoreError, ValueError):
    """We were called wrongly (bad path, bad permission string); fix the caller."""


class ProtocolError(XenstoreError):
    """A peer broke the wire protocol; drop that connection, nothing else."""


class ConnectionLost(XenstoreError):
    """The connection to xenstored failed, closed, or a reply timed out.

    The client object is unusable afterwards; open a new one.
    """


class ErrorReply(XenstoreError):
    """xenstored answered XS_ERROR; ``name`` is the errno name (``"EACCES"``).

    Catch a subclass for the common cases (``NoEntry``, ``PermissionDenied``,
    ``Conflict``) or inspect ``name``/``errno`` for the rest.
    """

    name = None

    def __init__(self, name, path=None, op=None):
        self.name = name
        self.op = op
        self.errno = getattr(_errno, name, None)
        where = " on %s" % path if path is not None else ""
        what = " (%s)" % op if op else ""
        super().__init__("xenstore %s%s%s" % (name, what, where), path)

    @staticmethod
    def from_name(name, path=None, op=None):
        """The most specific subclass for an errno name."""
        cls = ERROR_CLASSES.get(name, ErrorReply)
        return cls(name, path=path, op=op)


class NoEntry(ErrorReply):
    """ENOENT: the node (or the transaction) does not exist."""


class PermissionDenied(ErrorReply):
    """EACCES or EPERM: the connection's domain may not do this."""


class Conflict(ErrorReply):
    """EAGAIN: a transaction lost a race; run the whole transaction again."""


class QuotaExceeded(ErrorReply):
    """ENOSPC or E2BIG: a per-domain quota or size limit was hit."""


#: errno name -> the ErrorReply subclass raised for it.
ERROR_CLASSES = {
    "ENOENT": NoEntry,
    "EACCES": PermissionDenied,
    "EPERM": PermissionDenied,
    "EAGAIN": Conflict,
    "ENOSPC": QuotaExceeded,
    "E2BIG": QuotaExceeded,
}


class TransactionConflict(XenstoreError):
    """A retried transaction still conflicted after ``attempts`` tries."""

    def __init__(self, attempts):
        super().__init__("xenstore transaction still conflicting (EAGAIN) "
                         "after %d attempts" % attempts)
        self.attempts = attempts


class BadValue(XenstoreError, ValueError):
    """A node's value does not parse as the type asked for (``read_int``...)."""

    def __init__(self, path, value, expected):
        super().__init__("xenstore node %s holds %r, expected %s"
                         % (path, value, expected), path)
        self.value = value
        self.expected = expected


class WaitTimeout(XenstoreError, TimeoutError):
    """``wait_for_state`` ran out of time; ``last`` is the last state seen."""

    def __init__(self, path, wanted, last, timeout):
        super().__init__("xenstore node %s did not reach %s within %.1fs "
                         "(last state %s)" % (path, wanted, timeout, last), path)
        self.wanted = wanted
        self.last = last
