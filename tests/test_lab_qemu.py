"""blkif.lab.qemu: the QEMU command line and Xen's arguments."""
import gzip

import pytest

from blkif.errors import UsageError
from blkif.lab import qemu


def test_argv_carries_the_measured_settings():
    argv = qemu.qemu_argv("/w/xen", "/boot/vmlinuz-6.1", "/w/dom0.cpio", "/w", "/w/serial.log")
    joined = " ".join(argv)
    assert argv[:5] == [qemu.QEMU, "-accel", "tcg,thread=multi", "-cpu", "max,xsave=off"]
    assert argv[argv.index("-initrd") + 1] == "/boot/vmlinuz-6.1 console=hvc0 earlyprintk=xen,/w/dom0.cpio"
    xen_args = argv[argv.index("-append") + 1].split()
    for arg in ("smap=0", "smep=0", "console=com1", "dom0_mem=1G,max:1G", "noreboot"):
        assert arg in xen_args
    assert "path=/,mount_tag=hostroot,security_model=none,readonly=on" in joined
    assert "path=/w,mount_tag=labshare" in joined
    assert "-serial file:/w/serial.log" in joined


def test_commas_refused():
    with pytest.raises(UsageError, match="comma"):
        qemu.qemu_argv("/w/xen", "/boot/vmlinuz", "/w/a,b.cpio", "/w", "/w/s")
    with pytest.raises(UsageError, match="workdir"):
        qemu.qemu_argv("/w/xen", "/boot/vmlinuz", "/w/d.cpio", "/w,x", "/w/s")


def test_unpack_xen_once(tmp_path):
    src = tmp_path / "xen.gz"
    with gzip.open(src, "wb") as f:
        f.write(b"multiboot")
    dest = tmp_path / "xen"
    assert qemu.unpack_xen(str(dest), str(src)) == str(dest)
    assert dest.read_bytes() == b"multiboot"
    dest.write_bytes(b"kept")  # newer than the source: not unpacked again
    qemu.unpack_xen(str(dest), str(src))
    assert dest.read_bytes() == b"kept"
