"""A backend process for tests/test_journal.py: one ring served with a
journal until it is killed, by the C engine or the Python ring server on
the image file, or by the NBD ring server or the C engine through libnbd
(c-nbd, c-qsd): on an NBD URI (a server that outlives us), or on a qcow2
image through a qemu-storage-daemon of our own (which dies with us, as a
worker's does).

    journal_backend.py HV_PATH REFS PORT IMAGE JOURNAL new|resume ENGINE [URI]

ENGINE: c, python (the image file), nbd, c-nbd (URI), qsd, c-qsd (a qcow2 IMAGE).

Prints "ready" once it serves (after resuming what the journal holds).
"""
import os
import sys
import time

from blkif.abi import X86_64
from blkif.backend.backing import Store
from blkif.backend.engine import RingEngine
from blkif.backend.journal import Journal
from blkif.backend.nbd_ring import NbdRingServer
from blkif.backend.nbd_store import NbdStore
from blkif.backend.ring_service import RingServer
from blkif.backend.storage_daemon import StorageDaemon
from blkif.platform import open_platform
from blkif.request import Limits

SECTORS = 4096


def open_store(engine, image, uri):
    if engine in ("nbd", "c-nbd"):
        return NbdStore(uri)
    if engine in ("qsd", "c-qsd"):
        daemon = StorageDaemon(image, "qcow2", image + ".sock")
        daemon.start()
        return NbdStore(daemon.uri)
    return Store(image)


SERVERS = {"c": RingEngine, "python": RingServer, "nbd": NbdRingServer, "qsd": NbdRingServer,
           "c-nbd": RingEngine, "c-qsd": RingEngine}


def main(hv_path, refs, port, image, journal_path, mode, engine, uri=None):
    platform = open_platform("sim", domid=0, path=hv_path)
    mapping = platform.map_grants(1, [int(r) for r in refs.split(",")])
    bound = platform.evtchn_bind_interdomain(1, int(port))
    store = open_store(engine, image, uri)
    if mode == "resume":
        journal = Journal.open(journal_path)
    else:
        journal = Journal.create(journal_path, {"ring_bytes": [len(mapping.buffer)]})
    if engine in ("c", "python"):  # a file store's flag; an NBD server's flushes are its own
        store.flush_failed = journal.flush_failed
    if engine.startswith("c-"):
        store.lend()  # the engine holds the connection, as Vbd has it
    server = SERVERS[engine](
        platform, 1, mapping.buffer, bound, X86_64,
        Limits(sectors=SECTORS, max_indirect_segments=32), store,
        persistent=True, label="journal test",
        journal=journal.region(0), resume=mode == "resume")
    server.start(lambda message: (print(message, flush=True), os._exit(3)))
    print("ready", flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    main(*sys.argv[1:])
