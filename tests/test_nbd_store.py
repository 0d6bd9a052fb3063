"""NbdStore against a real NBD server (nbdkit): what the export decides, the
asynchronous commands, a server that goes away and one that comes back."""
import errno
import importlib.util
import select
import time

import pytest

from blkif.backend.backing import StoreError
from helpers import require, require_tool, start_nbdkit

SIZE = 4 << 20


@pytest.fixture(scope="module", autouse=True)
def tools():
    require_tool("nbdkit")
    require(importlib.util.find_spec("nbd") is not None,
            "python module nbd (apt python3-libnbd, linked into the venv by make test)")


@pytest.fixture
def server(tmp_path):
    """(image, socket, uri, restart) with nbdkit serving the image."""
    image, sock = tmp_path / "disk.img", tmp_path / "nbd.sock"
    image.write_bytes(bytes(SIZE))
    procs = [start_nbdkit(sock, "file", str(image))]

    def restart(*options):
        stop()
        procs.append(start_nbdkit(sock, *options, "file", str(image)))

    def stop():
        procs[-1].kill()
        procs[-1].wait()
        sock.unlink(missing_ok=True)

    yield image, "nbd+unix:///?socket=%s" % sock, restart, stop
    stop()


def open_store(uri, writable=True):
    from blkif.backend.nbd_store import NbdStore
    return NbdStore(uri, writable=writable, name="test export")


def pump(store, results, count, timeout=5):
    """Poll the connection until ``count`` completions are in ``results``."""
    deadline = time.monotonic() + timeout
    while len(results) < count and store.down is None:
        assert time.monotonic() < deadline, results
        poll = select.poll()
        poll.register(store.fileno(), store.events())
        for _, revents in poll.poll(100):
            store.progress(revents)


def test_the_export_decides_the_disk(server):
    image, uri, restart, _ = server
    with open_store(uri) as store:
        assert (store.size, store.sectors) == (SIZE, SIZE // 512)
        assert store.writable and store.discard_supported and store.can_flush
        assert store.fd is None  # served by nbd_ring, not the C engine
    with open_store(uri, writable=False) as store:  # mode=r
        assert not store.writable and not store.discard_supported
    restart("-r")
    with open_store(uri) as store:  # a read-only export: a read-only disk
        assert not store.writable and not store.discard_supported


def test_commands_in_flight_complete_with_their_data(server):
    image, uri, _, _ = server
    with open_store(uri) as store:
        results = []
        blocks = [bytes([i]) * 4096 for i in range(1, 9)]
        for i, block in enumerate(blocks):
            store.submit_write(bytearray(block), i * 4096, lambda err: results.append(err))
        assert store.handle.aio_in_flight() > 1  # all queued before any reply was read
        pump(store, results, 8)
        store.submit_flush(results.append)
        store.submit_trim(0, 4096, results.append)
        pump(store, results, 10)
        buf = bytearray(8 * 4096)
        store.submit_read(buf, 0, results.append)
        pump(store, results, 11)
        assert results == [0] * 11
        assert buf == bytes(4096) + b"".join(blocks[1:])
        assert image.read_bytes()[:8 * 4096] == buf
        store.flush()


def test_a_server_error_is_the_commands_errno(server):
    _, uri, _, _ = server
    with open_store(uri) as store:
        results = []
        store.submit_read(bytearray(512), SIZE, results.append)  # past the end
        pump(store, results, 1)
        assert results == [errno.EINVAL] and store.down is None


def test_a_server_that_goes_away_and_comes_back(server):
    _, uri, restart, stop = server
    with open_store(uri) as store:
        stop()
        store.probe()
        assert store.down.startswith("lost the connection to test export")
        results = []
        store.submit_read(bytearray(512), 0, results.append)
        assert results == [errno.ENOTCONN]  # refused at once while down
        with pytest.raises(OSError):
            store.flush()
        with pytest.raises(StoreError, match="cannot connect to test export"):
            store.reconnect()
        restart()
        store.reconnect()
        assert store.down is None
        store.submit_read(bytearray(512), 0, results.append)
        pump(store, results, 2)
        assert results == [errno.ENOTCONN, 0]


def test_a_server_that_comes_back_with_another_size_is_refused(server):
    image, uri, restart, stop = server
    with open_store(uri) as store:
        stop()
        image.write_bytes(bytes(SIZE * 2))
        restart()
        store.probe()
        with pytest.raises(StoreError, match="came back with %d bytes instead of %d"
                           % (2 * SIZE, SIZE)):
            store.reconnect()


def test_no_server_is_a_one_line_store_error(tmp_path):
    with pytest.raises(StoreError) as info:
        open_store("nbd+unix:///?socket=%s" % (tmp_path / "none.sock"))
    assert str(info.value).startswith("cannot connect to test export: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("flushed", [False, True], ids=["unflushed", "flushed"])
def test_writes_no_flush_covered_make_the_next_flush_fail_once(server, flushed):
    """A connection lost with writes answered but not flushed: the first flush
    after it fails (they may be gone with the server's caches), later ones work."""
    _, uri, restart, stop = server
    with open_store(uri) as store:
        results = []
        store.submit_write(bytearray(4096), 0, results.append)
        pump(store, results, 1)
        if flushed:
            store.flush()
        stop()
        store.probe()
        restart()
        store.reconnect()
        if flushed:
            store.flush()
        else:
            with pytest.raises(OSError) as info:
                store.flush()
            assert info.value.errno == errno.EIO
        store.flush()
