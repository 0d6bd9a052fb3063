"""blkif.lab.initramfs: module order, ldd parsing, manifests and init scripts."""
import os
import subprocess

import pytest

from blkif.errors import BlkifError
from blkif.lab import initramfs

MODULES_DEP = """\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko \
kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/net/9p/9pnet.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/fs/netfs/netfs.ko:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/fs/overlayfs/overlay.ko:
kernel/drivers/block/xen-blkfront.ko:
kernel/lib/crc16.ko:
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/crypto/crc32c_generic.ko:
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
""".replace("\\\n", "")

LDD = """\
\tlinux-vdso.so.1 (0x00007ffd3a5f2000)
\tlibext2fs.so.2 => /lib/x86_64-linux-gnu/libext2fs.so.2 (0x00007f232d6bb000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f232d465000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f232d75f000)
"""


def names(paths):
    return [p.rsplit("/", 1)[1][:-3] for p in paths]


def test_dom0_modules_in_the_measured_order():
    table = initramfs.parse_modules_dep(MODULES_DEP)
    order = names(initramfs.module_load_order(table, initramfs.DOM0_MODULES))
    assert order == ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
                     "virtio_pci", "9pnet", "9pnet_virtio", "netfs", "fscache", "9p", "overlay"]


def test_every_dependency_loads_first_and_once():
    table = initramfs.parse_modules_dep(MODULES_DEP)
    order = initramfs.module_load_order(table, initramfs.GUEST_MODULES + ("ext4", "9p"))
    assert len(order) == len(set(order))
    for i, path in enumerate(order):
        name = names([path])[0].replace("-", "_")
        for dep in table[name][1]:
            assert order.index(dep) < i


def test_module_names_accept_dashes_and_underscores():
    table = initramfs.parse_modules_dep(MODULES_DEP)
    assert initramfs.module_load_order(table, ["xen_blkfront"]) == \
        initramfs.module_load_order(table, ["xen-blkfront"])
    with pytest.raises(BlkifError, match="nosuch"):
        initramfs.module_load_order(table, ["nosuch"])


def test_parse_ldd():
    assert initramfs.parse_ldd(LDD) == [
        "/lib/x86_64-linux-gnu/libext2fs.so.2",
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/ld-linux-x86-64.so.2",
    ]
    with pytest.raises(BlkifError, match="libnope"):
        initramfs.parse_ldd("\tlibnope.so.1 => not found\n")


def test_dom0_manifest(tmp_path):
    (tmp_path / "bb").write_bytes(b"bb")
    mods = tmp_path / "mods"
    (mods / "kernel").mkdir(parents=True)
    (mods / "kernel" / "a.ko").write_bytes(b"a")
    m = initramfs.dom0_manifest(str(tmp_path / "bb"), ["sh", "mount", "switch_root"],
                                str(mods), ["kernel/a.ko"], "/work/lab")
    assert m.entries["/bin/sh"].target == "busybox"
    assert m.entries["/dev/console"].rdev == (5, 1)
    init = m.entries["/init"].data.decode()
    assert "insmod /lib/modules/kernel/a.ko" in init
    assert ("mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro "
            "hostroot /lower") in init  # cached: dom0's Python starts read it once
    assert "-o trans=virtio,version=9p2000.L,msize=512000 labshare /newroot/work/lab" in init
    assert "exec switch_root /newroot /bin/sh /work/lab/dom0-init.sh" in init


def test_guest_manifest_real_tools_shadow_busybox(tmp_path):
    (tmp_path / "bb").write_bytes(b"bb")
    tool = tmp_path / "mke2fs"
    tool.write_bytes(b"tool")
    lib = tmp_path / "libc.so.6"
    lib.write_bytes(b"lib")
    m = initramfs.guest_manifest(str(tmp_path / "bb"), ["sh", "mke2fs", "mkfs.ext4", "dd"],
                                 str(tmp_path), [], {str(tool): [str(lib)]}, "0 4096\n")
    assert "/bin/mke2fs" not in m.entries and "/bin/mkfs.ext4" not in m.entries
    assert m.entries["/bin/dd"].target == "busybox"
    assert m.entries[str(lib)].source == str(lib)
    assert m.entries["/etc/lab/plan"].data == b"0 4096\n"
    assert m.entries["/init"].data.decode() == initramfs.GUEST_INIT


def test_guest_init_reports_what_the_host_parses():
    init = initramfs.GUEST_INIT
    for needle in ('say "DONE rc=$FAILED"', "labmode=*", "labblk=*", "labdisks=*",
                   "oflag=direct", "iflag=direct", "/sbin/mke2fs", "/sbin/e2fsck -fn",
                   "blkdiscard -o", 'say "MD5 $n $off $size $sum $D"',
                   'exec sh /etc/lab/agent </dev/hvc0 >/dev/hvc0'):
        assert needle in init
    for shell in ("/bin/busybox", "/bin/dash"):  # the guest's sh, and Debian's
        if os.path.exists(shell):
            argv = [shell, "sh", "-n"] if shell.endswith("busybox") else [shell, "-n"]
            proc = subprocess.run(argv, input=init, capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr


def test_find_kernel_picks_newest_with_xen_drivers(tmp_path):
    boot, mods = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    for version, drivers in (("6.1.0-9-amd64", True), ("6.1.0-10-amd64", True),
                             ("6.2.0-1-amd64", False)):
        (boot / ("vmlinuz-" + version)).write_bytes(b"")
        (mods / version).mkdir(parents=True)
        text = "kernel/drivers/block/xen-blkfront.ko:\nkernel/xen-blkback/xen-blkback.ko:\n"
        (mods / version / "modules.dep").write_text(text if drivers else "")
    assert initramfs.find_kernel(str(boot), str(mods)) == (
        "6.1.0-10-amd64", str(boot / "vmlinuz-6.1.0-10-amd64"))
    with pytest.raises(BlkifError, match="linux-image-amd64"):
        initramfs.find_kernel(str(tmp_path / "none"), str(mods))
