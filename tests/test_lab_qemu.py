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
    assert "id=hostroot,path=/,security_model=none,multidevs=remap,readonly=on" in joined
    assert "id=labshare,path=/w,security_model=none,multidevs=remap -device" in joined
    assert "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot -fsdev" in joined
    assert "-serial file:/w/serial.log" in joined
    assert "-machine" not in argv and "dom0=pvh" not in xen_args


def test_a_pvh_dom0_gets_an_iommu_and_its_devices_go_through_it():
    argv = qemu.qemu_argv("/w/xen", "/boot/vmlinuz-6.1", "/w/dom0.cpio", "/w", "/w/serial.log",
                          dom0="pvh")
    assert "dom0=pvh" in argv[argv.index("-append") + 1].split()
    assert argv[argv.index("-cpu") + 1] == "max,xsave=off,rdtscp=off"
    assert argv[argv.index("-machine") + 1] == "q35"
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert devices[0] == "amd-iommu"
    assert [d for d in devices if d.startswith("virtio-9p-pci")] == [
        "virtio-9p-pci,fsdev=%s,mount_tag=%s,iommu_platform=on,disable-legacy=on" % (t, t)
        for t in ("hostroot", "labshare")]


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
