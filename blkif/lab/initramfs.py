"""The two initramfs images the lab boots: dom0's and the guest's.

dom0's is a stage-1 loader only: busybox plus the virtio/9p/overlay modules.
Its init mounts the host's ``/`` (shared read-only by QEMU over 9p) under a
tmpfs overlay, mounts the writable lab share at the work directory's own path,
and switch_roots into the host's ``/bin/sh`` running the generated
``dom0-init.sh`` (see ``blkif.lab.control``).  dom0 thus has the host's Xen
tools, Python and this project at the same paths as on the host.

The guest's is a whole tiny system: busybox, xen-blkfront, ext4 and crc32c,
real mke2fs/e2fsck with the shared libraries ``ldd`` names, the workload plan,
and an init (``GUEST_INIT``) that runs the verified workload on /dev/xvda and
reports ``LAB ...`` lines on its console, or the frontend conformance suite's
console agent.

Everything here but ``build_*`` is pure: it turns names and file contents into
a ``Manifest`` or text, so tests pin it without a kernel.
"""
import glob
import os
import re
import subprocess

from blkif.conformance.frontend.console_agent import AGENT
from blkif.errors import BlkifError
from blkif.lab.cpio import Manifest

# Loaded in this order by dom0's stage-1 init (each module's own dependencies
# are put before it from modules.dep).
DOM0_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
# Loaded by the guest's init; xen-blkfront takes the ``labblk=`` parameters.
GUEST_MODULES = ("xen-blkfront", "crc32c_generic", "ext4")
# Real tools copied into the guest with their libraries (busybox has no mkfs).
GUEST_TOOLS = ("/sbin/mke2fs", "/sbin/e2fsck")
PERF_TOOLS = ("/usr/bin/fio",)  # the perf guest's (blkif.lab.perf)
GUEST_TOOL_LINKS = {"/sbin/mkfs.ext4": "mke2fs", "/sbin/fsck.ext4": "e2fsck"}
GUEST_CONFIG_FILES = ("/etc/mke2fs.conf",)
NINEP_OPTIONS = "trans=virtio,version=9p2000.L,msize=512000"
# The host's root is only read, and not changed by the lab while it runs, so
# dom0 caches it: without a cache every Python start in dom0 (each `blkif
# serve` worker) re-reads its modules over 9p and took 14 s under TCG, past
# libxl's 10 s for a backend to reach InitWait.  The lab share stays uncached
# (both sides write it).
HOSTROOT_OPTIONS = NINEP_OPTIONS + ",cache=loose,ro"


def _module_key(name):
    return name.replace("-", "_")


def parse_modules_dep(text):
    """modules.dep text -> ``{module name: (path, [dependency paths])}``.

    Names use underscores (``xen_blkfront``) as the kernel does.
    """
    table = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, deps = line.split(":", 1)
        name = _module_key(re.sub(r"\.ko(\.\w+)?$", "", os.path.basename(path)))
        table[name] = (path.strip(), deps.split())
    return table


def module_load_order(table, names):
    """Module paths to insmod, dependencies first, each once.

    Raises BlkifError naming a module modules.dep does not know.
    """
    by_path = {path: name for name, (path, _) in table.items()}
    order, seen = [], set()

    def visit(name):
        key = _module_key(name)
        if key not in table:
            raise BlkifError("kernel module %s not found in modules.dep" % name)
        path, deps = table[key]
        if path in seen:
            return
        seen.add(path)
        for dep in reversed(deps):  # modules.dep lists the deepest last
            visit(by_path[dep])
        order.append(path)

    for name in names:
        visit(name)
    return order


def parse_ldd(text):
    """``ldd`` output -> the library paths it resolved (vdso and missing skipped).

    Raises BlkifError for a library ldd could not find.
    """
    paths = []
    for line in text.splitlines():
        line = line.strip()
        if "not found" in line:
            raise BlkifError("ldd: %s" % line)
        m = re.match(r"(?:\S+ => )?(/\S+) \(0x[0-9a-f]+\)$", line)
        if m:
            paths.append(m.group(1))
    return paths


def busybox_applets(manifest, applets, bindir="/bin", exclude=()):
    """Symlink each applet name to busybox, except the names in ``exclude``
    (real tools shadowing busybox's: its mke2fs knows no ``-t``)."""
    for applet in applets:
        path = "%s/%s" % (bindir, applet)
        if applet not in exclude and path not in manifest.entries:
            manifest.symlink(path, "busybox")


def _base(manifest, busybox, applets, exclude=()):
    for d in ("/proc", "/sys", "/dev", "/tmp", "/mnt", "/run", "/sbin", "/etc"):
        manifest.dir(d)
    manifest.chardev("/dev/console", 5, 1)
    manifest.chardev("/dev/null", 1, 3, mode=0o666)
    manifest.file("/bin/busybox", source=busybox, mode=0o755)
    busybox_applets(manifest, applets, exclude=exclude)


def dom0_init(module_paths, workdir):
    """Stage-1 init of dom0: 9p root + tmpfs overlay, lab share, switch_root."""
    inserts = "\n".join("insmod /lib/modules/%s || fail insmod %s" % (p, p) for p in module_paths)
    return DOM0_INIT % {
        "inserts": inserts,
        "opts": NINEP_OPTIONS,
        "rootopts": HOSTROOT_OPTIONS,
        "workdir": workdir,
    }


DOM0_INIT = """#!/bin/sh
# blkif lab: dom0 stage-1 init (generated).  Host / read-only over 9p under a
# tmpfs overlay, the lab share at %(workdir)s, then the host's /bin/sh.
export PATH=/bin
fail() { echo "LAB-DOM0 FAIL $*"; exec sh; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "LAB-DOM0 stage1 $(cut -d' ' -f1 /proc/uptime)s"
%(inserts)s
mkdir -p /lower /rw /newroot
mount -t 9p -o %(rootopts)s hostroot /lower || fail mount hostroot
mount -t tmpfs -o size=768m,mode=0755 rwtmp /rw || fail mount tmpfs
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \\
  || fail mount overlay
mkdir -p /newroot%(workdir)s
mount -t 9p -o %(opts)s labshare /newroot%(workdir)s || fail mount labshare
umount /proc /sys /dev
exec switch_root /newroot /bin/sh %(workdir)s/dom0-init.sh
fail switch_root
"""


def dom0_manifest(busybox, applets, modules_root, module_paths, workdir):
    """Manifest of dom0's initramfs."""
    m = Manifest()
    _base(m, busybox, applets)
    for path in module_paths:
        m.file("/lib/modules/" + path, source=os.path.join(modules_root, path))
    m.file("/init", dom0_init(module_paths, workdir), mode=0o755)
    return m


def guest_manifest(busybox, applets, modules_root, module_paths, tools, plan_text,
                   init=None):
    """Manifest of the guest's initramfs (its init: ``init``, default GUEST_INIT).

    ``tools`` maps each tool's path to the library paths ldd gave for it.
    """
    m = Manifest()
    shadowed = {os.path.basename(p) for p in list(tools) + list(GUEST_TOOL_LINKS)}
    _base(m, busybox, applets, exclude=shadowed)
    for path in module_paths:
        m.file("/lib/modules/" + path, source=os.path.join(modules_root, path))
    m.file(
        "/etc/lab/modules",
        "".join("/lib/modules/%s\n" % p for p in module_paths),
    )
    for tool, libs in sorted(tools.items()):
        m.file(tool, source=tool, mode=0o755)
        for lib in libs:
            if lib not in m.entries:
                m.file(lib, source=os.path.realpath(lib), mode=0o755)
    for link, target in GUEST_TOOL_LINKS.items():
        m.symlink(link, target)
    for conf in GUEST_CONFIG_FILES:
        if os.path.exists(conf):
            m.file(conf, source=conf)
    m.file("/etc/lab/plan", plan_text)
    m.file("/init", init or GUEST_INIT, mode=0o755)
    return m


GUEST_INIT = r"""#!/bin/sh
# blkif lab: guest init (generated).  Loads xen-blkfront (parameters from
# labblk=a=1,b=2 on the kernel command line), runs the workload for
# labmode=full|verify on each disk of labdisks=xvda,xvdb (default xvda) and
# reports "LAB <KIND> ..." lines on the console (checks, values and MD5 lines
# of a disk other than xvda name it), ending with "LAB DONE rc=N"; then idles
# until destroyed.  labmode=agent runs the conformance suite's console agent
# instead (/etc/lab/agent, blkif/conformance/frontend/console_agent.py).
# Debian's busybox sh prefers its own applets to PATH: real tools by full path.
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
MODE=full BLK= DISKS=xvda FAILED=0
for a in $(cat /proc/cmdline); do
  case "$a" in
    labmode=*) MODE=${a#labmode=} ;;
    labblk=*) BLK=$(echo "${a#labblk=}" | tr , ' ') ;;
    labdisks=*) DISKS=$(echo "${a#labdisks=}" | tr , ' ') ;;
  esac
done
say() { echo "LAB $*"; }
check() { say "CHECK $1 $2 $3"; [ "$2" = pass ] || FAILED=1; }
# Idle until destroyed, saying each new size of each disk (dom0 checks online resize).
idle() {
  for d in $DISKS; do eval "s_$d=\$(cat /sys/block/$d/size 2>/dev/null)"; done
  while :; do
    sleep 0.5
    for d in $DISKS; do
      n=$(cat /sys/block/$d/size 2>/dev/null)
      eval "s=\$s_$d"
      [ "$n" = "$s" ] || { say "VALUE resized_$d=$n"; eval "s_$d=\$n"; }
    done
  done
}
finish() { say "DONE rc=$FAILED"; idle; }
now() { cut -d' ' -f1 /proc/uptime; }

memfree() { sed -n 's/^MemFree: *\([0-9]*\) kB/\1/p' /proc/meminfo; }

say "BOOT mode=$MODE blkfront=$BLK uptime=$(now)"
# xen-blkfront last, so the MemFree drop across it is blkfront's alone.
for m in $(cat /etc/lab/modules); do
  case "$m" in
    */xen-blkfront.ko) BLKFRONT=$m ;;
    *) insmod "$m" || say "WARN insmod $m failed" ;;
  esac
done
FREE0=$(memfree)
insmod "$BLKFRONT" $BLK || say "WARN insmod $BLKFRONT failed"
if [ "$MODE" = agent ]; then  # the conformance suite's agent drives the disks it adds
  exec sh /etc/lab/agent </dev/hvc0 >/dev/hvc0 2>&1
fi
for D in $DISKS; do
  i=0
  while [ ! -b /dev/$D ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
  [ -b /dev/$D ] || { check attach fail "no /dev/$D after 30s"; finish; }
done
say "VALUE memfree_before_kb=$FREE0 memfree_after_kb=$(memfree)"
check attach pass "/dev/$(echo $DISKS | tr ' ' ,) at uptime $(now)s"
dmesg | grep -i blkfront | while read -r l; do say "DMESG $l"; done

# The disk the functions below work on: DEV, its queue q, and TAG and P that
# name it in checks and values (empty for xvda, as with one disk).
use_disk() {
  D=$1 DEV=/dev/$1 q=/sys/block/$1/queue TAG= P=
  [ "$D" = xvda ] || { TAG=@$D; P=${D}_; }
  say "VALUE ${P}max_segments=$(cat $q/max_segments)" \
    "${P}max_hw_sectors_kb=$(cat $q/max_hw_sectors_kb)" \
    "${P}discard_max_bytes=$(cat $q/discard_max_bytes)" \
    "${P}write_cache=$(tr ' ' _ < $q/write_cache)" \
    "${P}nr_queues=$(set -- /sys/block/$D/mq/*; echo $#)" \
    "${P}sectors=$(cat /sys/block/$D/size)"
}

rd() { dd if=$DEV of="$1" bs="$3" skip=$(($2 / $3)) count=1 iflag=direct 2>/dev/null; }
wr() { dd if="$1" of=$DEV bs="$3" seek=$(($2 / $3)) count=1 oflag=direct conv=notrunc 2>/dev/null; }
rand() { dd if=/dev/urandom of="$1" bs="$2" count=1 iflag=fullblock 2>/dev/null; }

fs_check() {
  t0=$(now)
  /sbin/mke2fs -q -t ext4 -F $DEV > /tmp/mkfs.log 2>&1 \
    || { check fs$TAG fail "mke2fs: $(tail -1 /tmp/mkfs.log)"; return; }
  mount -t ext4 $DEV /mnt || { check fs$TAG fail "mount ext4 failed"; return; }
  for n in 4096 65536 1048576 3145728; do rand /mnt/f$n $n; done
  (cd /mnt && md5sum f* > /tmp/fs.md5)
  sync
  umount /mnt || { check fs$TAG fail "umount failed"; return; }
  mount -t ext4 -o ro $DEV /mnt || { check fs$TAG fail "remount failed"; return; }
  (cd /mnt && md5sum -c /tmp/fs.md5 > /dev/null 2>&1); r=$?
  umount /mnt
  [ $r = 0 ] || { check fs$TAG fail "files differ after remount"; return; }
  /sbin/e2fsck -fn $DEV > /tmp/fsck.log 2>&1 \
    || { check fs$TAG fail "e2fsck: $(tail -1 /tmp/fsck.log)"; return; }
  check fs$TAG pass "mkfs.ext4, 4 files, remount md5 ok, e2fsck -fn clean (${t0}s-$(now)s)"
}

discard_check() {
  off=$1 len=$2
  rand /tmp/d $len
  dd if=/dev/zero of=/tmp/z bs=$len count=1 2>/dev/null
  wr /tmp/d $off $len && rd /tmp/r $off $len && cmp -s /tmp/d /tmp/r \
    || { check discard$TAG fail "write before discard not read back"; return; }
  blkdiscard -o $off -l $len $DEV || { check discard$TAG fail "blkdiscard failed"; return; }
  rd /tmp/r $off $len
  if cmp -s /tmp/r /tmp/z; then
    check discard$TAG pass "$len bytes at $off read back as zeros"
  else
    check discard$TAG fail "$len bytes at $off not zero after discard"
  fi
  rm -f /tmp/d /tmp/z /tmp/r
}

raw_write() {
  n=0 bad=0 t0=$(now)
  while read -r off size; do
    rand /tmp/c$n $size
    wr /tmp/c$n $off $size || bad=$((bad + 1))
    n=$((n + 1))
  done < /etc/lab/plan
  [ $bad = 0 ] && check raw-write$TAG pass "$n chunks written O_DIRECT (${t0}s-$(now)s)" \
    || check raw-write$TAG fail "$bad of $n writes failed"
}

raw_read() {
  n=0 bad=0 t0=$(now)
  while read -r off size; do
    rd /tmp/r $off $size || bad=$((bad + 1))
    sum=$(md5sum < /tmp/r); sum=${sum%% *}
    if [ -e /tmp/c$n ]; then cmp -s /tmp/c$n /tmp/r || bad=$((bad + 1)); fi
    say "MD5 $n $off $size $sum $D"
    n=$((n + 1))
  done < /etc/lab/plan
  [ $bad = 0 ] && check $1$TAG pass "$n chunks read O_DIRECT and compared (${t0}s-$(now)s)" \
    || check $1$TAG fail "$bad of $n chunks differ or failed"
}

# Every slot of every ring busy at once (blkif/lab/capacity.py), where that
# takes at most 16 MiB per queue: one O_DIRECT read of nr_requests full
# requests from each CPU.
fill_rings() {
  kb=$(( $(cat $q/nr_requests) * $(cat $q/max_hw_sectors_kb) ))
  if [ $kb -gt 16384 ]; then say "VALUE fill_kb=0"; return; fi
  pin=; taskset -c 0 true 2>/dev/null && pin=1
  t0=$(now)
  for c in $(seq 0 $(( $(set -- /sys/block/$D/mq/*; echo $#) - 1 ))); do
    if [ -n "$pin" ]; then taskset -c $c dd if=$DEV of=/dev/null bs=${kb}k count=1 iflag=direct 2>/dev/null &
    else dd if=$DEV of=/dev/null bs=${kb}k count=1 iflag=direct 2>/dev/null &
    fi
  done
  wait
  say "VALUE fill_kb=$kb fill_from_s=$t0 fill_to_s=$(now)"
}

for disk in $DISKS; do
  use_disk $disk
  case "$MODE" in
    full)
      fs_check
      discard_check $(head -1 /etc/lab/discard)
      raw_write
      raw_read raw-verify
      [ -n "$TAG" ] || fill_rings
      ;;
    verify)
      raw_read reread
      ;;
    *) check mode fail "unknown labmode=$MODE" ;;
  esac
done
sync
finish
"""


def find_kernel(boot="/boot", modules_root="/lib/modules"):
    """(version, vmlinuz path) of the newest kernel with xen-blkfront and blkback.

    Raises BlkifError when none is installed (package linux-image-amd64).
    """
    found = []
    for vmlinuz in glob.glob(os.path.join(boot, "vmlinuz-*")):
        version = os.path.basename(vmlinuz)[len("vmlinuz-"):]
        dep = os.path.join(modules_root, version, "modules.dep")
        if not os.path.exists(dep):
            continue
        with open(dep) as f:
            text = f.read()
        if "xen-blkfront.ko" in text and "xen-blkback.ko" in text:
            found.append(version)
    if not found:
        raise BlkifError("no kernel with Xen block drivers in %s (apt-get install linux-image-amd64)" % boot)
    version = max(found, key=_version_key)
    return version, os.path.join(boot, "vmlinuz-" + version)


def _version_key(version):
    return [int(x) if x.isdigit() else x for x in re.split(r"[.-]", version)]


def _applets(busybox):
    out = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    return out.stdout.split()


def _ldd(tool):
    out = subprocess.run(["ldd", tool], capture_output=True, text=True)
    if out.returncode != 0:
        raise BlkifError("ldd %s failed: %s" % (tool, out.stderr.strip()))
    return parse_ldd(out.stdout)


def _modules_table(version, modules_root):
    with open(os.path.join(modules_root, version, "modules.dep")) as f:
        return parse_modules_dep(f.read())


def build_dom0(path, version, workdir, busybox="/bin/busybox", modules_root="/lib/modules"):
    """Write dom0's initramfs to ``path``; returns its size in bytes."""
    from blkif.lab.cpio import write_newc

    root = os.path.join(modules_root, version)
    order = module_load_order(_modules_table(version, modules_root), DOM0_MODULES)
    manifest = dom0_manifest(busybox, _applets(busybox), root, order, workdir)
    with open(path, "wb") as f:
        return write_newc(manifest, f)


def build_guest(path, version, plan_text, discard_text, busybox="/bin/busybox",
                modules_root="/lib/modules"):
    """Write the guest's initramfs to ``path``; returns its size in bytes."""
    from blkif.lab.cpio import write_newc

    root = os.path.join(modules_root, version)
    order = module_load_order(_modules_table(version, modules_root), GUEST_MODULES)
    tools = {tool: _ldd(tool) for tool in GUEST_TOOLS}
    manifest = guest_manifest(busybox, _applets(busybox), root, order, tools, plan_text)
    manifest.file("/etc/lab/discard", discard_text)
    manifest.file("/etc/lab/agent", AGENT, mode=0o755)
    with open(path, "wb") as f:
        return write_newc(manifest, f)


def build_perf_guest(path, version, init, files, busybox="/bin/busybox",
                     modules_root="/lib/modules"):
    """The perf guest's initramfs (``blkif.lab.perf``): the guest's, plus fio
    and its libraries, with ``init`` and ``files`` {path: text}, gzipped (fio
    brings some 80 MB of libraries); returns the uncompressed size."""
    import gzip

    from blkif.lab.cpio import write_newc

    root = os.path.join(modules_root, version)
    order = module_load_order(_modules_table(version, modules_root), GUEST_MODULES)
    tools = {tool: _ldd(tool) for tool in GUEST_TOOLS + PERF_TOOLS}
    manifest = guest_manifest(busybox, _applets(busybox), root, order, tools, "", init=init)
    for name, text in files.items():
        manifest.file(name, text)
    with gzip.open(path, "wb", compresslevel=1) as f:
        return write_newc(manifest, f)
