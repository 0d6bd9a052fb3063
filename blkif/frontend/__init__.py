"""The blkif frontend: what a guest's block driver does, as a library.

:class:`BlockDevice` is the block-device API over one VBD (``device.py``);
:class:`FrontQueue` is one of its rings (``queue.py``).
"""
from blkif.frontend.device import (
    BlockDevice,
    BlockIOError,
    FrontendOptions,
    IOHandle,
    NotConnected,
)
from blkif.frontend.queue import Completion, FrontQueue

__all__ = ["BlockDevice", "BlockIOError", "FrontendOptions", "IOHandle", "NotConnected",
           "Completion", "FrontQueue"]
