# Node permissions and path syntax, shared by the client and the daemon.
#
# A node's permissions are a list of ``Perm``: the first names the owner and
# the access every domain not listed gets; each later one grants one domain
# an access.  On the wire each is a string: a letter from ACCESS then the
# decimal domid ("n0", "r5", "b7").  The owner, and privileged domains, get
# everything (read, write, and the right to change permissions); see
# ``access_for``, which follows xenstored's perm_for_conn().
import re
from dataclasses import dataclass

from .errors import UsageError

#: Permission letter -> (may read, may write).
ACCESS = {
    "n": (False, False),
    "r": (True, False),
    "w": (False, True),
    "b": (True, True),
}

READ, WRITE, OWNER = 1, 2, 4
#: Permission letter -> bitmask of READ/WRITE it grants.
ACCESS_BITS = {"n": 0, "r": READ, "w": WRITE, "b": READ | WRITE}

DOMID_MAX = 0x7FEF  # DOMID_FIRST_RESERVED - 1

_PERM_RE = re.compile(r"\A([nrwb])([0-9]{1,10})\Z")
_PATH_CHARS_RE = re.compile(r"\A[A-Za-z0-9_@/-]*\Z")


@dataclass(frozen=True)
class Perm:
    """One permission entry: ``access`` ("n", "r", "w" or "b") for ``domid``."""

    access: str
    domid: int

    def __post_init__(self):
        if self.access not in ACCESS:
            raise UsageError("permission access must be one of n/r/w/b, not %r"
                             % (self.access,))
        if not isinstance(self.domid, int) or not 0 <= self.domid <= 0xFFFFFFFF:
            raise UsageError("permission domid out of range: %r" % (self.domid,))

    def __str__(self):
        return "%s%d" % (self.access, self.domid)

    @classmethod
    def parse(cls, text):
        """``Perm.parse("r5") == Perm("r", 5)``; raises UsageError if malformed."""
        if isinstance(text, Perm):
            return text
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        match = _PERM_RE.match(text)
        if not match or int(match.group(2)) > 0xFFFFFFFF:
            raise UsageError("malformed xenstore permission %r" % (text,))
        return cls(match.group(1), int(match.group(2)))

    @property
    def bits(self):
        return ACCESS_BITS[self.access]


def parse_perms(perms):
    """A tuple of Perm from Perm objects or strings like ``["n0", "r5"]``."""
    if isinstance(perms, (str, bytes, Perm)):
        perms = [perms]
    result = tuple(Perm.parse(p) for p in perms)
    if not result:
        raise UsageError("a permission list needs at least the owner entry")
    return result


def access_for(domid, perms, privileged=False, target=None):
    """READ|WRITE|OWNER bits that domain ``domid`` has on a node with ``perms``.

    ``target`` is the domain ``domid`` acts for (XS_SET_TARGET), if any.
    """
    ids = (domid,) if target is None else (domid, target)
    if privileged or perms[0].domid in ids:
        return READ | WRITE | OWNER
    for perm in perms[1:]:
        if perm.domid in ids:
            return perm.bits
    return perms[0].bits


def check_path(path, allow_special=False):
    """Raise UsageError unless ``path`` is a syntactically valid xenstore path.

    Valid: characters ``A-Za-z0-9_@/-``, no ``//``, no trailing ``/`` except
    the root itself; absolute up to XENSTORE_ABS_PATH_MAX, relative up to
    XENSTORE_REL_PATH_MAX; ``@name`` only where special paths are allowed
    (watches, permissions).  The daemon applies the same rules.
    """
    if not isinstance(path, str):
        raise UsageError("xenstore path must be str, not %r" % (path,))
    if not path_is_valid(path, allow_special):
        raise UsageError("invalid xenstore path %r" % (path,), path)
    return path


def path_is_valid(path, allow_special=False):
    """True if ``path`` passes :func:`check_path`."""
    from .wire import XENSTORE_ABS_PATH_MAX, XENSTORE_REL_PATH_MAX
    if not path or not _PATH_CHARS_RE.match(path):
        return False
    if path.startswith("@"):
        return allow_special and len(path) <= XENSTORE_REL_PATH_MAX
    if "//" in path or (path.endswith("/") and path != "/"):
        return False
    limit = XENSTORE_ABS_PATH_MAX if path.startswith("/") else XENSTORE_REL_PATH_MAX
    return len(path) <= limit
