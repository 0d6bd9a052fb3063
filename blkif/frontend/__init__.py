"""The blkif frontend: what a guest's block driver does, as a library.

:class:`BlockDevice` is the block-device API over one VBD (``device.py``);
:class:`FrontQueue` is one of its rings (``queue.py``); :class:`IOHandle`
and the errors are in ``transfer.py``.
"""
from blkif.frontend.device import BlockDevice, FrontendOptions
from blkif.frontend.queue import Completion, FrontQueue
from blkif.frontend.transfer import BlockIOError, IOHandle, NotConnected

__all__ = ["BlockDevice", "BlockIOError", "FrontendOptions", "IOHandle", "NotConnected",
           "Completion", "FrontQueue"]
