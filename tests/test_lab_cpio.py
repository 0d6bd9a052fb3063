"""blkif.lab.cpio: manifests written as newc archives and read back."""
import io

import pytest

from blkif.lab.cpio import Entry, Manifest, newc_member, read_newc, write_newc


def archive(manifest):
    out = io.BytesIO()
    n = write_newc(manifest, out)
    assert n == len(out.getvalue())
    return out.getvalue()


def test_round_trip_every_kind(tmp_path):
    src = tmp_path / "busybox"
    src.write_bytes(b"\x7fELF" + b"x" * 7)
    m = Manifest()
    m.file("/bin/busybox", source=str(src), mode=0o755)
    m.file("/etc/lab/plan", "0 4096\n")
    m.symlink("/bin/sh", "busybox")
    m.chardev("/dev/console", 5, 1)
    members = read_newc(archive(m))
    assert members["bin/busybox"] == (0o100755, src.read_bytes(), (0, 0))
    assert members["etc/lab/plan"][1] == b"0 4096\n"
    assert members["bin/sh"] == (0o120777, b"busybox", (0, 0))
    assert members["dev/console"] == (0o020600, b"", (5, 1))
    # parents are created as directories
    assert members["etc/lab"][0] == 0o040755
    assert members["etc"][0] == 0o040755


def test_members_are_padded_to_four_bytes():
    for name in ("a", "ab", "abc", "abcd"):
        for body in (b"", b"1", b"12", b"123", b"1234"):
            member = newc_member(1, name, 0o100644, body)
            assert len(member) % 4 == 0
            assert member.startswith(b"070701")


def test_same_manifest_same_bytes():
    def build():
        m = Manifest()
        m.file("/z", "1")
        m.file("/a/b", "2")
        return archive(m)

    assert build() == build()


def test_conflicting_entries_refused():
    m = Manifest()
    m.file("/x", "1")
    with pytest.raises(ValueError):
        m.file("/x", "2")
    m.dir("/d")
    m.dir("/d", mode=0o700)  # directories merge


def test_entry_validation():
    with pytest.raises(ValueError):
        Entry("fifo")
    with pytest.raises(ValueError):
        Entry("file")
    with pytest.raises(ValueError):
        Entry("symlink")


def test_trailer_ends_archive():
    data = archive(Manifest())
    assert b"TRAILER!!!" in data
    assert read_newc(data) == {}
