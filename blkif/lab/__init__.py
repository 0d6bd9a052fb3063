"""The real Xen lab: Xen 4.17 + dom0 under QEMU, proving blkif against Linux.

``blkif lab`` (``blkif.lab.cli``) builds both initramfs images
(``initramfs``), boots Xen under QEMU TCG (``qemu``), drives dom0 through the
shared work directory (``control``) and runs the phases (``phases``), each a
row in the report (``report``).  See docs/lab.md.
"""
