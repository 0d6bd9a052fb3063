"""xenstore: a pyxs-based client and an embedded xenstored (issue 3).

See docs/xenstore.md.  The daemon: ``python -m xenstore serve --socket PATH``.
"""
from .client import Transaction, Watch, WatchEvent, Xenstore
from .errors import (BadValue, Conflict, ConnectionLost, ErrorReply, NoEntry,
                     PermissionDenied, ProtocolError, QuotaExceeded,
                     TransactionConflict, UsageError, WaitTimeout, XenstoreError)
from .perms import Perm
from .server import Server, domain_socket_path
from .xenbus import XenbusState, read_state, switch_state, wait_for_state

__all__ = [
    "Xenstore", "Transaction", "Watch", "WatchEvent",
    "BadValue", "Conflict", "ConnectionLost", "ErrorReply", "NoEntry",
    "PermissionDenied", "ProtocolError", "QuotaExceeded", "TransactionConflict",
    "UsageError", "WaitTimeout", "XenstoreError", "Perm", "Server",
    "domain_socket_path", "XenbusState", "read_state", "switch_state",
    "wait_for_state",
]
