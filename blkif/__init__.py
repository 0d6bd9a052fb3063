"""blkif: the Xen paravirtual block protocol in Python."""

__version__ = "0.1.0"
