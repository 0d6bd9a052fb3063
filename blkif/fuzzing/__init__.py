"""Fuzz targets for what a guest (or a backend) controls, run with atheris.

One module per entry point, each with ``test_one_input(data)`` that raises
:class:`BrokenRule` when a protocol property fails (any other exception is a
crash too).  ``python -m blkif.fuzzing --target NAME`` runs one; the corpora
live in ``tests/fuzz-corpus/NAME``.  The C engine's libFuzzer target is run
through the same command (``--target engine``, :mod:`blkif.abi.fuzz`).
"""
import os

TARGETS = ("engine", "request", "xenbus")
CORPORA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "tests", "fuzz-corpus")


class BrokenRule(Exception):
    """An input made the code under test break a protocol rule."""
