"""The engine's libFuzzer target (``csrc/fuzz_engine.c``), built with AddressSanitizer
and UndefinedBehaviorSanitizer, and run on the corpus kept in ``tests/fuzz-corpus``.

``python -m blkif.abi.fuzz [--seconds S | --runs N] [--corpus DIR]`` builds the
target into a temporary directory (clang from Debian's ``clang`` and
``libclang-rt-14-dev``) and runs it; ``make fuzz`` runs it for ten minutes.
New inputs that reach new code are added to the corpus directory.  A crash,
a sanitizer report or a broken rule aborts with the input saved as
``crash-*`` in the current directory; make each one a test.
"""
import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

from blkif.errors import BlkifError

_HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(_HERE, "csrc")
CORPUS = os.path.join(os.path.dirname(os.path.dirname(_HERE)), "tests", "fuzz-corpus", "engine")
SANITIZERS = "-fsanitize=fuzzer,address,undefined"


def _cdefs(name):
    spec = importlib.util.spec_from_file_location(
        "_cdefs_" + name, os.path.join(_HERE, "_cdefs", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def harness_text(csrc=CSRC):
    """The C file clang compiles: the structs cffi compiles, then the target."""
    return ("#include <stdint.h>\n" + _cdefs("blkif").SOURCE + _cdefs("evtchn").SOURCE
            + _cdefs("gntdev").SOURCE
            + _cdefs("engine").TYPES + '#include "%s"\n' % os.path.join(csrc, "fuzz_engine.c"))


def build(out_dir, csrc=CSRC, cc="clang"):
    """Compile the target into ``out_dir``; its path.  BlkifError if clang fails."""
    if shutil.which(cc) is None:
        raise BlkifError("%s is not installed (Debian: apt-get install clang "
                         "libclang-rt-14-dev)" % cc)
    source = os.path.join(out_dir, "fuzz_engine_main.c")
    with open(source, "w") as f:
        f.write(harness_text(csrc))
    binary = os.path.join(out_dir, "fuzz_engine")
    # _GNU_SOURCE as Python.h sets it for the extension (engine.c uses
    # O_DIRECT and fallocate)
    run = subprocess.run([cc, "-g", "-O1", SANITIZERS, "-fno-sanitize-recover=all",
                          "-D_GNU_SOURCE", "-I", csrc, source, "-o", binary]
                         + ["-l" + lib for lib in _cdefs("engine").LIBRARIES],
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise BlkifError("building the fuzz target failed: %s" % run.stderr.strip()[-2000:])
    return binary


def fuzz(binary, corpus, runs=None, seconds=None, cwd=None):
    """Run the target on ``corpus`` (which it extends); the CompletedProcess."""
    argv = [binary, corpus, "-max_len=8192"]
    if runs is not None:
        argv.append("-runs=%d" % runs)
    if seconds is not None:
        argv.append("-max_total_time=%d" % seconds)
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m blkif.abi.fuzz",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default=CORPUS, help="corpus directory (default: %(default)s)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--seconds", type=int, default=60, help="run this long (default 60)")
    how.add_argument("--runs", type=int, help="run this many inputs instead")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="blkif-fuzz-") as tmp:
            binary = build(tmp)
            result = fuzz(binary, args.corpus, runs=args.runs,
                          seconds=None if args.runs else args.seconds, cwd=os.getcwd())
    except BlkifError as exc:
        print("blkif fuzz: %s" % exc, file=sys.stderr)
        return 2
    tail = result.stderr.strip().splitlines()
    print("\n".join(tail[-12:]))
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
