"""The engine's fuzz target (blkif/abi/fuzz.py, csrc/fuzz_engine.c): a short
coverage-guided run under AddressSanitizer and UndefinedBehaviorSanitizer on
the corpus kept in the repository, and proof that it catches a broken decoder."""
import os
import shutil

import pytest

from blkif.abi import fuzz
from helpers import require_tool


@pytest.fixture(scope="module")
def clang():
    return require_tool("clang")


def test_a_short_run_finds_nothing(clang, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(fuzz.CORPUS, corpus)  # the run adds inputs; the repository's stay
    binary = fuzz.build(str(tmp_path))
    result = fuzz.fuzz(binary, str(corpus), runs=20000, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 20000 runs" in result.stderr
    assert not list(tmp_path.glob("crash-*"))


def test_a_decoder_that_takes_last_sect_8_is_caught(clang, tmp_path):
    """The same target on an engine.c that lets a segment end past its page."""
    csrc = tmp_path / "csrc"
    shutil.copytree(fuzz.CSRC, csrc)
    engine = csrc / "engine.c"
    text = engine.read_text()
    assert "d.last_sect >= PAGE / SECTOR" in text
    engine.write_text(text.replace("d.last_sect >= PAGE / SECTOR", "d.last_sect > PAGE / SECTOR"))
    binary = fuzz.build(str(tmp_path), csrc=str(csrc))
    corpus = tmp_path / "corpus"
    shutil.copytree(fuzz.CORPUS, corpus)
    result = fuzz.fuzz(binary, str(corpus), runs=500000, cwd=str(tmp_path))
    assert result.returncode != 0
    assert "deadly signal" in result.stderr
    assert list(tmp_path.glob("crash-*"))
    assert os.path.getsize(next(tmp_path.glob("crash-*"))) >= 2
