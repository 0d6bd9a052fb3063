"""Crash consistency: SIGKILL a VBD's worker under a verified write workload,
perhaps cutting its disk's power too, and check blkif's contract on the image
(``python -m blkif.crash``).

:mod:`blkif.crash.model` is the contract, :mod:`blkif.crash.harness` the rig
and the run, :mod:`blkif.crash.volatile` the disk with a write cache that a
power cut loses; docs/reliability.md has the figures.
"""
from blkif.crash.harness import run
from blkif.crash.model import DiskModel, Violation

__all__ = ["DiskModel", "Violation", "run"]
