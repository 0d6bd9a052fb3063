"""Shared test helpers.

``require`` is how a test states a system dependency: missing, the test skips
on a developer machine, but under ``CI=true`` it fails, so CI can never go
green by skipping.
"""
import os
import shutil

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


def require_header(path):
    """Path of a system header, or skip/fail as :func:`require` does."""
    require(os.path.exists(path), "header %s (apt package libxen-dev)" % path)
    return path
