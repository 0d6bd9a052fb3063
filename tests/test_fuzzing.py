"""The atheris targets (blkif/fuzzing): a short coverage-guided run of each on
the corpus kept in the repository, and proof that each catches what it is
for: a decoder that lets a segment end past its page, and a node reader that
lets a non-UTF-8 value escape as something other than a protocol error."""
import os
import shutil
import subprocess
import sys

import pytest

from blkif import request as request_module
from blkif.abi import X86_64, constants as c
from blkif.fuzzing import CORPORA, BrokenRule
from blkif.request import RequestEncoder
from blkif.ring import FrontRing
from helpers import require
from xenstore import BadValue
from xenstore_fixtures import ROOT

try:
    import atheris
except ImportError:
    atheris = None


@pytest.fixture(scope="module")
def targets():
    require(atheris is not None, "python package atheris (pip install -e '.[test]')")
    from blkif.fuzzing import request, xenbus
    return {"request": request, "xenbus": xenbus}


@pytest.mark.parametrize("target", ["request", "xenbus"])
def test_a_short_run_finds_nothing(targets, target, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(os.path.join(CORPORA, target), corpus)  # the run adds inputs
    run = subprocess.run([sys.executable, "-m", "blkif.fuzzing", "--target", target,
                          "--runs", "20000", "--corpus", str(corpus)],
                         cwd=str(tmp_path), capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Done 20000 runs" in run.stderr
    assert not list(tmp_path.glob("crash-*"))


def _read_slot(segments):
    """An input (fuzz_engine.c's layout): x86_64, 2048 sectors, a READ."""
    buf = bytearray(4096)
    front = FrontRing(buf, X86_64)
    RequestEncoder(X86_64).rw(front, c.BLKIF_OP_READ, 42, 0, segments)
    return bytes([2 << 1, 0b11110]) + bytes(buf[64:64 + X86_64.request_size])


def test_the_request_target_passes_a_good_request(targets):
    targets["request"].test_one_input(_read_slot([(7, 0, 7), (8, 2, 5)]))


def test_the_request_target_catches_a_segment_past_its_page(targets, monkeypatch):
    data = _read_slot([(7, 0, 8)])
    targets["request"].test_one_input(data)  # refused alike by both decoders
    monkeypatch.setattr(request_module, "SECTORS_PER_PAGE", 9)  # last_sect 8 now passes
    with pytest.raises(BrokenRule, match="outside its page"):
        targets["request"].test_one_input(data)


def test_the_xenbus_target_catches_a_reader_that_lets_bad_values_escape(targets, monkeypatch):
    """The input the target found: a backend's multi-queue-max-queues = b'\\x93'."""
    with open(os.path.join(CORPORA, "xenbus", "not-utf8-offer"), "rb") as f:
        data = f.read()
    targets["xenbus"].test_one_input(data)

    def unguarded(xs, directory):
        return lambda key: xs.read_str("%s/%s" % (directory, key), None)
    monkeypatch.setattr(targets["xenbus"], "node_reader", unguarded)
    with pytest.raises(BadValue):
        targets["xenbus"].test_one_input(data)
