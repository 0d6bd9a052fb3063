"""The ``sim`` platform: a simulated Xen hypervisor for machines without Xen.

``hypervisor`` is the shared process; ``client`` is one domain's view of it
(``SimPlatform``); ``control`` starts and stops it.
"""
from blkif.platform.sim.client import SimPlatform
from blkif.platform.sim.control import SimHypervisor, start, stop

__all__ = ["SimPlatform", "SimHypervisor", "start", "stop"]
