"""``python -m blkif.crash [--iterations N] [--seed S] [--mode live|reattach|powercut]``:
kill the worker N times under a verified write workload with flushes; exit 1
with the seed and the broken clause on the first violation."""
import argparse
import logging
import json
import random
import sys

from blkif.crash import Violation, run
from blkif.crash.harness import MODES


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m blkif.crash",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=300, help="kills (default 300)")
    parser.add_argument("--seed", type=int, help="default: random, printed")
    parser.add_argument("--mode", choices=MODES, default="live",
                        help="live: a successor worker takes the connection over (the "
                             "default service); reattach: blkif serve --no-live-restart, "
                             "the frontend attaches again; powercut: reattach on a disk "
                             "with a write cache that loses what no flush synced (FUSE)")
    parser.add_argument("--lying-disk", action="store_true",
                        help="with powercut: a disk that acknowledges flushes without "
                             "syncing; the run must report a violation")
    parser.add_argument("--engine", choices=("c", "python"), default="c")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.lying_disk and args.mode != "powercut":
        parser.error("--lying-disk needs --mode powercut")
    logging.basicConfig(level=logging.ERROR)  # a lost connection is expected, each kill
    seed = random.randrange(2**32) if args.seed is None else args.seed
    print("crash consistency: seed %d, %d kills, mode %s" % (seed, args.iterations, args.mode),
          file=sys.stderr, flush=True)
    try:
        summary = run(seed, args.iterations, args.mode, ["--engine", args.engine],
                      log=lambda text: print(text, file=sys.stderr, flush=True),
                      lying_disk=args.lying_disk)
    except Violation as exc:
        print("VIOLATION %s" % exc, file=sys.stderr)
        return 1
    except OSError as exc:
        print("blkif.crash: %s" % exc, file=sys.stderr)
        return 1
    print(json.dumps(summary) if args.json else
          "%(kills)d kills over %(vbds)d VBDs in %(seconds)s s: %(writes_answered)d writes "
          "answered, %(writes_unsure)d unsure, %(flushes_answered)d flushes answered%(cuts)s; "
          "contract held (seed %(seed)d)"
          % dict(summary, cuts="" if summary["sectors_lost_to_cuts"] is None else
                 ", %d sectors lost to power cuts" % summary["sectors_lost_to_cuts"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
