"""Backing stores on real files and a loop device: zero-copy vectored I/O,
flush, hole punching and BLKDISCARD."""
import errno
import os
import struct

import pytest

from blkif.backend.backing import Store, StoreError
import helpers
from blkif.backend import backing as backing_mod


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(1 << 20))
    return path


def test_vectored_read_and_write_hit_the_right_bytes(image):
    with Store(str(image)) as store:
        assert (store.size, store.sectors, store.is_device) == (1 << 20, 2048, False)
        a, b = bytearray(4096), bytearray(512)
        store.readv([a, memoryview(b)], 8192)
        data = image.read_bytes()
        assert bytes(a + b) == data[8192:8192 + 4608]
        store.writev([b"x" * 512, memoryview(b"y" * 1024)], 512)
        store.flush()
    data = image.read_bytes()
    assert data[512:2048] == b"x" * 512 + b"y" * 1024


def test_discard_punches_a_hole_that_reads_as_zeros(image):
    with Store(str(image)) as store:
        before = os.stat(image).st_blocks
        store.discard(65536, 65536)
        out = bytearray(65536)
        store.readv([out], 65536)
        assert out == bytes(65536)
        assert os.stat(image).st_size == 1 << 20  # size kept
        assert os.stat(image).st_blocks < before
        with pytest.raises(OSError):
            store.discard(0, 4096, secure=True)


def test_discard_is_offered_only_where_holes_can_be_punched(image, monkeypatch):
    before = image.read_bytes()
    with Store(str(image)) as store:
        assert store.discard_supported  # the probe (past the end) changed nothing
    assert image.read_bytes() == before
    monkeypatch.setattr("blkif.backend.backing._punches_holes", lambda fd, size: False)
    with Store(str(image)) as store:  # e.g. an image on 9p or NFSv3
        assert not store.discard_supported


def test_read_only_store_refuses_writes(image):
    with Store(str(image), writable=False) as store:
        assert not store.discard_supported
        with pytest.raises(OSError):
            store.writev([b"z" * 512], 0)


def test_short_read_is_an_error_not_stale_data(image):
    with Store(str(image)) as store:
        os.truncate(image, 4096)
        with pytest.raises(OSError, match="short read"):
            store.readv([bytearray(8192)], 0)


def test_odd_sized_file_exposes_whole_sectors_only(tmp_path):
    path = tmp_path / "odd.img"
    path.write_bytes(b"a" * 1000)
    with Store(str(path)) as store:
        assert store.sectors == 1


@pytest.mark.parametrize("make", ["missing", "directory"])
def test_bad_paths_are_one_clear_error(tmp_path, make):
    path = tmp_path / "x"
    if make == "directory":
        path.mkdir()
    with pytest.raises(StoreError, match=str(path)):
        Store(str(path))


def test_direct_io_on_page_aligned_buffers(image):
    import mmap

    try:
        store = Store(str(image), direct=True)
    except StoreError as exc:  # tmpfs has no O_DIRECT
        pytest.skip(str(exc))
    with store:
        page = mmap.mmap(-1, 4096)
        store.readv([page], 4096)
        assert page[:] == image.read_bytes()[4096:8192]


@pytest.fixture
def loop_device(tmp_path):
    """A loop device over a 4 MiB file of random bytes (root and losetup needed)."""
    backing = tmp_path / "loop.img"
    backing.write_bytes(os.urandom(4 << 20))
    with helpers.loop_device(backing) as dev:
        yield dev, backing


def test_block_device_size_io_and_discard(loop_device):
    dev, backing = loop_device
    with Store(dev) as store:
        assert store.is_device and store.sectors == (4 << 20) // 512
        assert store.logical_block_size == 512
        assert store.discard_supported and store.discard_granularity >= 512
        payload = os.urandom(8192)
        store.writev([bytearray(payload)], 65536)
        store.flush()
        got = bytearray(8192)
        store.readv([got], 65536)
        assert got == payload
        store.discard(1 << 20, 1 << 20)
        store.readv([got], 1 << 20)
        assert got == bytes(8192)
    assert backing.read_bytes()[65536:65536 + 8192] == payload


def test_4k_sector_device_sizes_and_discard_limits(tmp_path):
    """A real 4K-sector device (a loop device with 4096-byte logical sectors):
    its sizes come from BLKSSZGET/BLKPBSZGET, sectors still count 512 bytes."""
    image = tmp_path / "4k.img"
    image.write_bytes(bytes(4 << 20))
    with helpers.loop_device(image, sector_size=4096) as dev:
        with Store(dev) as store:
            assert (store.logical_block_size, store.physical_block_size) == (4096, 4096)
            assert store.sectors == (4 << 20) // 512
            assert store.discard_supported and store.discard_granularity == 4096
            assert store.discard_alignment == 0
            assert not store.discard_secure  # loop devices have no secure erase


@pytest.mark.parametrize("err,supported", [(errno.EINVAL, True), (errno.EOPNOTSUPP, False),
                                           (errno.EBADF, False)])
def test_secure_erase_probe_asks_with_a_range_linux_refuses(monkeypatch, err, supported):
    asked = []

    def ioctl(fd, request, arg):
        asked.append((request, struct.unpack("QQ", arg)))
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(backing_mod.fcntl, "ioctl", ioctl)
    monkeypatch.setattr(backing_mod.os, "uname", lambda: os.uname_result(
        ("Linux", "h", "6.1.0-18-amd64", "#1", "x86_64")))
    assert backing_mod._secure_erase_supported(7) is supported
    assert asked == [(backing_mod.BLKSECDISCARD, (1, 512))]  # misaligned: never carried out
    monkeypatch.setattr(backing_mod.os, "uname", lambda: os.uname_result(
        ("Linux", "h", "5.10.0", "#1", "x86_64")))
    assert backing_mod._secure_erase_supported(7) is False  # older kernels: not asked
    assert len(asked) == 1


def test_discard_limits_from_sysfs(tmp_path):
    device = tmp_path / "7:3"
    (device / "queue").mkdir(parents=True)
    (device / "queue" / "discard_max_bytes").write_text("4294966784\n")
    (device / "queue" / "discard_granularity").write_text("65536\n")
    (device / "discard_alignment").write_text("32768\n")
    assert backing_mod._device_discard_limits(os.makedev(7, 3), str(tmp_path)) == {
        "discard_max_bytes": 4294966784, "discard_granularity": 65536,
        "discard_alignment": 32768}
    assert backing_mod._device_discard_limits(os.makedev(7, 4), str(tmp_path)) == {}
