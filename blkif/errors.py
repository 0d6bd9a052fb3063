"""One error root for the package (h11's split between the two sides).

``LocalProtocolError``: we were asked to do something the protocol forbids
(a bug or a bad argument on our side).  ``RemoteProtocolError``: the peer
broke the protocol; a backend answers with an error response or shuts that
one device down, never the process.
"""


class BlkifError(Exception):
    """Root of every error this package raises on purpose."""


class LocalProtocolError(BlkifError):
    """We misused the protocol or an API; fix the caller."""


class RemoteProtocolError(BlkifError):
    """The other end broke the protocol; fail its request or its device."""


class UsageError(BlkifError):
    """A command-line argument is invalid; the CLI prints it and exits 2."""
