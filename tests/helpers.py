"""Shared test helpers.

``require`` is how a test states a system dependency: missing, the test skips
on a developer machine, but under ``CI=true`` it fails, so CI can never go
green by skipping.
"""
import contextlib
import os
import shutil
import subprocess

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def require(condition, what):
    """Skip (or under CI, fail) unless ``condition`` holds; ``what`` names the dependency."""
    if condition:
        return
    if IN_CI:
        pytest.fail("missing dependency under CI=true: %s" % what)
    pytest.skip("missing dependency: %s" % what)


def require_tool(name):
    """Path of an executable on PATH, or skip/fail as :func:`require` does."""
    path = shutil.which(name)
    require(path is not None, "command %r (see Makefile apt packages)" % name)
    return path


@contextlib.contextmanager
def loop_device(backing, sector_size=None):
    """A loop device over the file ``backing`` (root and losetup needed), with
    ``sector_size``-byte logical sectors if given: real 4K-sector storage."""
    losetup = require_tool("losetup")
    require(os.geteuid() == 0 and os.path.exists("/dev/loop-control"),
            "root and /dev/loop-control")
    argv = [losetup, "--find", "--show"] + (
        ["--sector-size", str(sector_size)] if sector_size else []) + [str(backing)]
    dev = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run([losetup, "--detach", dev], check=True)


def require_header(path):
    """Path of a system header, or skip/fail as :func:`require` does."""
    require(os.path.exists(path), "header %s (apt package libxen-dev)" % path)
    return path


def compile_and_run(tmp_path, name, source, bits=64):
    """Build ``source`` with gcc -m``bits`` and run it; its stdout lines
    ``kind name value`` come back as {(kind, name): value-string}.

    Missing gcc, or 32-bit libc headers for -m32, skip (fail under CI).
    """
    import subprocess

    gcc = require_tool("gcc")
    src, exe = tmp_path / (name + ".c"), tmp_path / name
    src.write_text(source)
    build = subprocess.run([gcc, "-m%d" % bits, "-o", str(exe), str(src)],
                           capture_output=True, text=True)
    require(build.returncode == 0 or "gnu/stubs-32.h" not in build.stderr,
            "32-bit libc headers (apt package gcc-multilib)")
    assert build.returncode == 0, build.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    result = {}
    for line in out.splitlines():
        kind, rest = line.split(" ", 1)
        key, value = rest.rsplit(" ", 1)
        result[(kind, key)] = value
    return result


def start_nbdkit(sock, *args):
    """``nbdkit -U sock args...``, returned once the socket accepts connections
    (it exists a moment before it listens)."""
    import socket
    import subprocess
    import time
    proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), *args])
    deadline = time.monotonic() + 10
    while True:
        with socket.socket(socket.AF_UNIX) as s:
            if s.connect_ex(str(sock)) == 0:
                return proc
        assert proc.poll() is None and time.monotonic() < deadline, "nbdkit did not start"
        time.sleep(0.02)
