"""Initramfs archives: a manifest of entries written as a newc cpio.

The kernel unpacks an uncompressed "newc" archive (``070701`` headers, every
name and body padded to 4 bytes, ``TRAILER!!!`` last) straight into its
rootfs, so no cpio tool is needed and building one is a pure function of the
manifest.  A manifest maps each path inside the archive to one entry: a
directory, a file (bytes, or a host path read when the archive is written), a
symlink, or a character device; parent directories are added for you.
Entries are written sorted by path, so the same manifest gives the same bytes.
"""
import os
import stat
from dataclasses import dataclass

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member.  ``kind`` is dir, file, symlink or chardev."""

    kind: str
    mode: int = 0o755
    data: bytes = None  # file contents, when not read from ``source``
    source: str = None  # host path of a file's contents
    target: str = None  # symlink target
    rdev: tuple = (0, 0)  # (major, minor) of a chardev

    def __post_init__(self):
        if self.kind not in ("dir", "file", "symlink", "chardev"):
            raise ValueError("unknown entry kind %r" % self.kind)
        if self.kind == "file" and (self.data is None) == (self.source is None):
            raise ValueError("a file entry needs exactly one of data, source")
        if self.kind == "symlink" and not self.target:
            raise ValueError("a symlink entry needs a target")


class Manifest:
    """Paths inside the archive (absolute, ``/bin/sh``) mapped to entries."""

    def __init__(self):
        self.entries = {}

    def _put(self, path, entry):
        path = "/" + path.strip("/")
        parent = os.path.dirname(path)
        if parent != "/" and parent not in self.entries:
            self.dir(parent)
        old = self.entries.get(path)
        if old is not None and old != entry and not (old.kind == entry.kind == "dir"):
            raise ValueError("%s added twice with different contents" % path)
        self.entries[path] = entry
        return path

    def dir(self, path, mode=0o755):
        return self._put(path, Entry("dir", mode))

    def file(self, path, data=None, source=None, mode=0o644):
        if isinstance(data, str):
            data = data.encode()
        return self._put(path, Entry("file", mode, data=data, source=source))

    def symlink(self, path, target):
        return self._put(path, Entry("symlink", 0o777, target=target))

    def chardev(self, path, major, minor, mode=0o600):
        return self._put(path, Entry("chardev", mode, rdev=(major, minor)))

    def paths(self):
        return sorted(self.entries)


_TYPE_BITS = {
    "dir": stat.S_IFDIR,
    "file": stat.S_IFREG,
    "symlink": stat.S_IFLNK,
    "chardev": stat.S_IFCHR,
}


def _pad(n):
    return b"\0" * (-n % 4)


def newc_member(ino, name, mode, body=b"", rdev=(0, 0), nlink=1):
    """Header + name + body of one member, each padded to 4 bytes."""
    raw_name = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, 0, len(body), 0, 0, rdev[0], rdev[1], len(raw_name), 0)
    header = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
    head = header + raw_name
    return head + _pad(len(head)) + body + _pad(len(body))


def write_newc(manifest, out):
    """Write ``manifest`` to the binary file ``out``; returns bytes written."""
    total = 0
    for ino, path in enumerate(manifest.paths(), start=1):
        entry = manifest.entries[path]
        body = b""
        if entry.kind == "file":
            if entry.data is not None:
                body = entry.data
            else:
                with open(entry.source, "rb") as f:
                    body = f.read()
        elif entry.kind == "symlink":
            body = entry.target.encode()
        mode = _TYPE_BITS[entry.kind] | entry.mode
        nlink = 2 if entry.kind == "dir" else 1
        member = newc_member(ino, path.lstrip("/"), mode, body, entry.rdev, nlink)
        out.write(member)
        total += len(member)
    trailer = newc_member(0, TRAILER, 0)
    out.write(trailer)
    return total + len(trailer)


def read_newc(data):
    """Parse an archive back to ``{name: (mode, body, rdev)}`` (tests use it)."""
    members, pos = {}, 0
    while True:
        if data[pos:pos + 6] != NEWC_MAGIC:
            raise ValueError("bad newc magic at offset %d" % pos)
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        pos += 110
        name = data[pos:pos + namesize - 1].decode()
        pos += namesize
        pos += -pos % 4
        body = data[pos:pos + size]
        pos += size
        pos += -pos % 4
        if name == TRAILER:
            return members
        members[name] = (mode, body, (fields[9], fields[10]))
