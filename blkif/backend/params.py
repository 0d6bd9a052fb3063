"""The ``params`` node: what a VBD's storage is (sans-I/O: text in, Target out).

libxl writes ``params`` for its userspace backend as ``<format>:<target>``
(``aio:/images/a.img``, ``qcow2:/images/b.qcow2``); ``blkif vbd create`` and
libxl's ``phy`` backend write a bare path.  Targets that are NBD URIs name
storage on an NBD server (another machine, or a local daemon), alone or after
``raw:``/``aio:`` (what libxl writes for ``format=raw,target=nbd://...``).

Three kinds of target come out, and the backend serves each its own way:

- ``file``: a raw file or block device, served by the engine from its fd;
- ``image``: an image file in a format QEMU reads (:data:`FORMATS` gives
  libxl's name -> QEMU's driver), exported by a qemu-storage-daemon;
- ``nbd``: an NBD URI, talked to directly with libnbd.

:func:`parse_params` raises :class:`ParamsError` (one line saying what is
wrong) for anything else; nothing here touches the filesystem or network.
"""
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from blkif.errors import BlkifError

# libxl's format name (libxl__device_disk_string_of_format) -> QEMU block driver.
FORMATS = {
    "aio": "raw",
    "raw": "raw",
    "qcow": "qcow",
    "qcow2": "qcow2",
    "vhd": "vpc",
    "vmdk": "vmdk",
    "qed": "qed",
}
RAW_FORMATS = ("aio", "raw")
NBD_SCHEMES = ("nbd", "nbd+unix")
_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*)://", re.IGNORECASE)
_FORMAT_PREFIX = re.compile(r"^([a-z0-9]+):(.*)$", re.DOTALL | re.IGNORECASE)


class ParamsError(BlkifError):
    """``params`` does not name storage we can serve."""


@dataclass(frozen=True)
class Target:
    """A parsed ``params``: ``kind`` is "file", "image" or "nbd".

    ``path`` is the file, device or image (file, image); ``uri`` the NBD URI
    (nbd); ``driver`` QEMU's block driver (image); ``format`` the format name
    as written (None for a bare path or URI).
    """

    kind: str
    path: str = None
    uri: str = None
    driver: str = None
    format: str = None

    def __str__(self):
        where = self.uri if self.kind == "nbd" else self.path
        return "%s:%s" % (self.format, where) if self.format else where


def parse_params(text):
    """The :class:`Target` that ``params`` names; ParamsError if it names none."""
    text = text.strip()
    if not text:
        raise ParamsError("params is empty")
    fmt = None
    scheme = _SCHEME.match(text)
    if not scheme or scheme.group(1).lower() in FORMATS:  # "aio:///x" is a path
        prefix = _FORMAT_PREFIX.match(text)
        if prefix:
            fmt, text = prefix.group(1).lower(), prefix.group(2)
            if fmt not in FORMATS:
                raise ParamsError("unknown disk format %r in params (known: %s)"
                                  % (fmt, ", ".join(sorted(FORMATS))))
            if not text:
                raise ParamsError("params %r names no file" % (fmt + ":"))
    scheme = _SCHEME.match(text)
    if scheme:
        if fmt not in (None,) + RAW_FORMATS:
            raise ParamsError("format %s over a URI is not supported (export the image "
                              "from the storage host instead)" % fmt)
        return Target("nbd", uri=parse_nbd_uri(text), format=fmt)
    if fmt is None or fmt in RAW_FORMATS:
        return Target("file", path=text, format=fmt)
    return Target("image", path=text, driver=FORMATS[fmt], format=fmt)


def parse_nbd_uri(uri):
    """Check an NBD URI (the forms of the NBD URI spec we support); returns it.

    ``nbd://host[:port][/export]`` (TCP, port 10809 by default) and
    ``nbd+unix:///[export]?socket=/path`` (a Unix socket).  TLS (``nbds``)
    and other query parameters are refused rather than ignored.
    """
    scheme = _SCHEME.match(uri).group(1).lower()
    if scheme not in NBD_SCHEMES:
        raise ParamsError("unsupported URI scheme %r in params (supported: %s)"
                          % (scheme, ", ".join(NBD_SCHEMES)))
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise ParamsError("bad NBD URI %r: %s" % (uri, exc)) from None
    query = parse_qs(parts.query, keep_blank_values=True)
    if parts.fragment or parts.username or parts.password:
        raise ParamsError("bad NBD URI %r: no user, password or fragment allowed" % uri)
    if scheme == "nbd":
        if not parts.hostname:
            raise ParamsError("bad NBD URI %r: no host" % uri)
        if port == 0:
            raise ParamsError("bad NBD URI %r: port 0" % uri)
        if query:
            raise ParamsError("bad NBD URI %r: unsupported query %r" % (uri, parts.query))
    else:
        if parts.netloc:
            raise ParamsError("bad NBD URI %r: nbd+unix takes no host" % uri)
        sockets = query.pop("socket", [])
        if len(sockets) != 1 or not sockets[0].startswith("/"):
            raise ParamsError("bad NBD URI %r: needs one ?socket=/absolute/path" % uri)
        if query:
            raise ParamsError("bad NBD URI %r: unsupported query %r" % (uri, parts.query))
    return uri
