"""A backend process for tests/test_journal.py: one ring served with a
journal by the C engine or the Python ring server, until it is killed.

    journal_backend.py HV_PATH REFS PORT IMAGE JOURNAL new|resume c|python

Prints "ready" once it serves (after resuming what the journal holds).
"""
import os
import sys
import time

from blkif.abi import X86_64
from blkif.backend.backing import Store
from blkif.backend.engine import RingEngine
from blkif.backend.ring_service import RingServer
from blkif.backend.journal import Journal
from blkif.platform import open_platform
from blkif.request import Limits

SECTORS = 4096


def main(hv_path, refs, port, image, journal_path, mode, engine):
    platform = open_platform("sim", domid=0, path=hv_path)
    mapping = platform.map_grants(1, [int(r) for r in refs.split(",")])
    bound = platform.evtchn_bind_interdomain(1, int(port))
    store = Store(image)
    if mode == "resume":
        journal = Journal.open(journal_path)
    else:
        journal = Journal.create(journal_path, {"ring_bytes": [len(mapping.buffer)]})
    store.flush_failed = journal.flush_failed
    server = (RingEngine if engine == "c" else RingServer)(
        platform, 1, mapping.buffer, bound, X86_64,
        Limits(sectors=SECTORS, max_indirect_segments=32), store,
        persistent=True, label="journal test",
        journal=journal.region(0), resume=mode == "resume")
    server.start(lambda message: (print(message, flush=True), os._exit(3)))
    print("ready", flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    main(*sys.argv[1:])
