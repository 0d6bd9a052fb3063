"""``python -m blkif.fuzzing --target NAME [--runs N | --seconds S] [--corpus DIR]``.

Runs one target on its corpus (``tests/fuzz-corpus/NAME``, which the run
extends with inputs that reach new code): ``engine`` is the C engine's
libFuzzer target under ASan+UBSan (:mod:`blkif.abi.fuzz`), the others
atheris targets over our Python modules, instrumented for coverage.  A
crash, an escaped exception or a :class:`~blkif.fuzzing.BrokenRule` stops
the run with the input saved as ``crash-*`` in the current directory (exit
status non-zero); make each one a regression test.
"""
import argparse
import importlib
import os
import sys

from blkif.fuzzing import CORPORA, TARGETS


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m blkif.fuzzing",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--target", choices=TARGETS, required=True)
    parser.add_argument("--corpus", help="corpus directory (default: tests/fuzz-corpus/TARGET)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--seconds", type=int, default=60, help="run this long (default 60)")
    how.add_argument("--runs", type=int, help="run this many inputs instead")
    args, extra = parser.parse_known_args(argv)  # extra: libFuzzer flags, passed on
    corpus = args.corpus or os.path.join(CORPORA, args.target)
    if args.target == "engine":
        from blkif.abi import fuzz
        limit = ["--runs", str(args.runs)] if args.runs else ["--seconds", str(args.seconds)]
        return fuzz.main(["--corpus", corpus] + limit)
    import atheris
    with atheris.instrument_imports(include=["blkif", "xenstore"]):
        target = importlib.import_module("blkif.fuzzing." + args.target)
    limit = "-runs=%d" % args.runs if args.runs else "-max_total_time=%d" % args.seconds
    atheris.Setup([sys.argv[0], corpus, limit, "-max_len=%d" % 40000] + extra,
                  target.test_one_input)
    atheris.Fuzz()  # exits the process with libFuzzer's status


if __name__ == "__main__":
    sys.exit(main())
