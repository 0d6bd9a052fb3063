"""``python -m blkif.platform.microbench``: sim platform micro-benchmarks, printed.

Event round trip: two processes (domains 1 and 0) bounce one event.  Map and
unmap: the backend maps and unmaps N granted pages of the frontend.  Grant
copy: one page per op.  Numbers are for comparison between changes, not
assertions.
"""
import argparse
import multiprocessing
import time

from blkif.abi.constants import PAGE_SIZE
from blkif.platform import CopyOp, GrantRef, Local, open_platform
from blkif.platform.sim import SimHypervisor

FORK = multiprocessing.get_context("fork")


def _echo(path, conn, rounds):
    with open_platform("sim", domid=0, path=path) as be:
        port = be.evtchn_bind_interdomain(1, conn.recv())
        conn.send("bound")
        for _ in range(rounds):
            port.wait()
            port.notify()
        conn.recv()


def bench_events(path, rounds):
    with open_platform("sim", domid=1, path=path) as fe:
        port = fe.evtchn_alloc_unbound(0)
        conn, child = FORK.Pipe()
        proc = FORK.Process(target=_echo, args=(path, child, rounds))
        proc.start()
        conn.send(port.port)
        conn.recv()
        start = time.perf_counter()
        for _ in range(rounds):
            port.notify()
            port.wait()
        elapsed = time.perf_counter() - start
        conn.send("done")
        proc.join()
    return elapsed / rounds


def bench_map(path, pages, rounds):
    with open_platform("sim", domid=1, path=path) as fe, \
            open_platform("sim", domid=0, path=path) as be:
        granted = fe.grant_pages(0, pages)
        start = time.perf_counter()
        for _ in range(rounds):
            be.map_grants(1, granted.refs).unmap()
        elapsed = time.perf_counter() - start
        granted.close()
    return elapsed / rounds


def bench_copy(path, pages, rounds):
    with open_platform("sim", domid=1, path=path) as fe, \
            open_platform("sim", domid=0, path=path) as be:
        granted = fe.grant_pages(0, pages)
        local = bytearray(pages * PAGE_SIZE)
        ops = [CopyOp(GrantRef(1, ref, 0), Local(local, i * PAGE_SIZE), PAGE_SIZE)
               for i, ref in enumerate(granted.refs)]
        start = time.perf_counter()
        for _ in range(rounds):
            be.grant_copy(ops)
        elapsed = time.perf_counter() - start
        granted.close()
    return elapsed / rounds


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m blkif.platform.microbench")
    parser.add_argument("--rounds", type=int, default=10000, help="event round trips")
    args = parser.parse_args(argv)
    with SimHypervisor() as hv:
        print("sim event round trip (2 processes): %8.1f us"
              % (bench_events(hv.path, args.rounds) * 1e6))
        for pages in (1, 11, 256):
            print("sim map+unmap of %3d pages:          %8.1f us"
                  % (pages, bench_map(hv.path, pages, 500) * 1e6))
        for pages in (1, 11):
            print("sim grant copy of %3d pages:         %8.1f us"
                  % (pages, bench_copy(hv.path, pages, 500) * 1e6))


if __name__ == "__main__":
    main()
