"""The blkif conformance suite: numbered cases for any backend and any frontend.

``blkif conformance backend`` plays a frontend against a VBD; ``blkif
conformance frontend`` plays a backend for a frontend; ``blkif conformance
list`` prints the catalogue (``--markdown``: docs/conformance.md).  See
:mod:`blkif.conformance.catalogue` for what a case is.
"""
from blkif.conformance.catalogue import CASES, INFO, LEVELS, MUST, SHOULD, Case, load, select
from blkif.conformance.report import exit_status, run_cases

__all__ = ["CASES", "Case", "INFO", "LEVELS", "MUST", "SHOULD", "load", "select",
           "run_cases", "exit_status"]
