"""Create and remove VBDs in xenstore the way libxl does, without xl.

A VBD is two directories, both starting in Initialising:

- backend ``/local/domain/<backend>/backend/<type>/<domid>/<devid>``: owned
  by the backend domain, readable by the guest; ``<type>`` is ``vbd`` (what
  libxl writes for ``phy`` disks, kernel blkback's type) or ``qdisk`` (what it
  writes for ``backendtype=qdisk``);
- frontend ``/local/domain/<domid>/device/vbd/<devid>``: owned by the guest,
  readable by the backend.

``devid`` comes from the vdev name as docs/misc/vbd-interface.txt defines it
(:func:`vdev_to_devid`).
"""
import argparse
import os
import re
import stat
import time

from blkif.backend.params import ParamsError, parse_params
from blkif.errors import BlkifError, UsageError
from xenstore import XenbusState

# Backend nodes of an online resize of an image (the VBD's worker grows it).
RESIZE_REQUEST = "blkif-resize-request"  # the new size in bytes, from the toolstack
RESIZE_RESULT = "blkif-resize-result"  # "ok" or "error: why", from the worker

_XVD = re.compile(r"^xvd([a-z]+)(\d*)$")
_SD_HD = re.compile(r"^(sd|hd)([a-z]+)(\d*)$")
_DP = re.compile(r"^d(\d+)(?:p(\d+))?$")
_HD_MAJORS = [3, 22, 33, 34]  # hda-hdb, hdc-hdd, hde-hdf, hdg-hdh


def _disk_index(letters):
    n = 0
    for ch in letters:
        n = n * 26 + (ord(ch) - ord("a") + 1)
    return n - 1


def vdev_to_devid(vdev):
    """``xvda`` -> 51712, ``xvdb3`` -> 51731, ``sda`` -> 2048, ``d0p1`` -> 51713.

    Raises UsageError for a name the interface does not define.
    """
    vdev = vdev.strip()
    if vdev.isdigit():
        return int(vdev)
    m = _XVD.match(vdev) or _SD_HD.match(vdev) or _DP.match(vdev)
    if not m:
        raise UsageError("unknown virtual device name %r (try xvda, sdb, hdc or d0p1)" % vdev)
    if m.re is _DP:
        disk, part = int(m.group(1)), int(m.group(2) or 0)
        kind = "xvd"
    elif m.re is _XVD:
        kind, disk, part = "xvd", _disk_index(m.group(1)), int(m.group(2) or 0)
    else:
        kind, disk, part = m.group(1), _disk_index(m.group(2)), int(m.group(3) or 0)
    if kind == "xvd":
        if disk < 16 and part < 16:
            return (202 << 8) | (disk << 4) | part
        if disk < (1 << 20) and part < 256:
            return (1 << 28) | (disk << 8) | part
    elif kind == "sd" and disk < 16 and part < 16:
        return (8 << 8) | (disk << 4) | part
    elif kind == "hd" and disk < 8 and part < 64:
        return (_HD_MAJORS[disk // 2] << 8) | ((disk % 2) << 6) | part
    raise UsageError("virtual device %r is out of range" % vdev)


def introduce(xs, domid):
    """Make ``domid`` a guest of our xenstored: introduce it and create its
    home (dom0 owns it, the guest reads it) with ``device/`` and ``data/``
    the guest owns, as libxl does at domain creation."""
    xs.introduce_domain(domid)
    home = "/local/domain/%d" % domid
    for txn in xs.transactions():
        with txn:
            txn.mkdir(home)
            txn.set_perms(home, ["n0", "r%d" % domid])
            for sub in ("device", "data"):
                txn.mkdir("%s/%s" % (home, sub))
                txn.set_perms("%s/%s" % (home, sub), ["n%d" % domid])


BACKEND_TYPES = ("vbd", "qdisk")


def backend_path(backend_domid, domid, devid, kind="vbd"):
    return "/local/domain/%d/backend/%s/%d/%d" % (backend_domid, kind, domid, devid)


def find_backend(xs, backend_domid, domid, devid):
    """The backend directory of a VBD, whichever its type: the one its
    frontend names, else the first of :data:`BACKEND_TYPES` present (else
    the ``vbd`` path)."""
    named = xs.read_str(frontend_path(domid, devid) + "/backend", None)
    if named and named.startswith("/local/domain/%d/backend/" % backend_domid):
        return named
    for kind in BACKEND_TYPES:
        path = backend_path(backend_domid, domid, devid, kind)
        if xs.exists(path):
            return path
    return backend_path(backend_domid, domid, devid)


def frontend_path(domid, devid):
    return "/local/domain/%d/device/vbd/%d" % (domid, devid)


def params_node(target):
    """``params`` for ``target``: a path made absolute (after its ``format:``
    prefix, if any), an NBD URI as it is.  UsageError if it names nothing we serve."""
    try:
        parsed = parse_params(target)
    except ParamsError as exc:
        raise UsageError(str(exc)) from None
    if parsed.kind == "nbd":
        return target
    path = os.path.abspath(parsed.path)
    return "%s:%s" % (parsed.format, path) if parsed.format else path


def create(xs, domid, vdev, target, mode="w", backend_domid=0, kind="vbd"):
    """Write both directories of a new VBD; returns its devid.

    ``target`` is what ``params`` names: a file or device, ``<format>:<image>``
    or an NBD URI (docs/storage.md); ``kind`` the backend type (one of
    :data:`BACKEND_TYPES`, or a type no backend serves, for a test that plays
    the backend itself)."""
    if mode not in ("r", "w"):
        raise UsageError("mode must be r or w, not %r" % mode)
    if not re.match(r"^[a-z][a-z0-9-]*$", kind):
        raise UsageError("backend type must be a xenbus type such as %s, not %r"
                         % (" or ".join(BACKEND_TYPES), kind))
    devid = vdev_to_devid(vdev)
    back = backend_path(backend_domid, domid, devid, kind)
    front = frontend_path(domid, devid)
    if xs.exists(find_backend(xs, backend_domid, domid, devid)) or xs.exists(front):
        raise UsageError("VBD %s (devid %d) of domain %d already exists" % (vdev, devid, domid))
    init = str(int(XenbusState.Initialising))
    backend_nodes = {
        "frontend": front, "frontend-id": str(domid), "params": params_node(target),
        "mode": mode, "online": "1", "removable": "0", "bootable": "1", "state": init,
        "dev": vdev, "type": "file" if kind == "vbd" else kind, "device-type": "disk",
        "discard-enable": "1",
    }
    frontend_nodes = {
        "backend": back, "backend-id": str(backend_domid), "state": init,
        "virtual-device": str(devid), "device-type": "disk",
    }
    for txn in xs.transactions():
        with txn:
            for path, nodes, owner, reader in ((back, backend_nodes, backend_domid, domid),
                                               (front, frontend_nodes, domid, backend_domid)):
                txn.mkdir(path)
                txn.set_perms(path, ["n%d" % owner, "r%d" % reader])
                for key, value in nodes.items():
                    txn.write("%s/%s" % (path, key), value)
    return devid


def destroy(xs, domid, vdev, backend_domid=0):
    """Remove both directories (the backend sees them go and closes the device)."""
    devid = vdev_to_devid(vdev)
    back = find_backend(xs, backend_domid, domid, devid)
    front = frontend_path(domid, devid)
    if not xs.exists(back) and not xs.exists(front):
        raise UsageError("no VBD %s (devid %d) for domain %d" % (vdev, devid, domid))
    for txn in xs.transactions():
        with txn:
            for path in (front, back):
                if txn.exists(path):
                    txn.rm(path)
    return devid


SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text):
    """``20G``, ``512M``, ``1073741824``: bytes, a whole number of 512-byte sectors."""
    match = re.match(r"^(\d+)([KMGT]?)(?:i?B)?$", text.strip(), re.IGNORECASE)
    if not match:
        raise UsageError("size %r: expected a number of bytes, optionally with K, M, G or T"
                         % text)
    size = int(match.group(1)) * SIZE_SUFFIXES[match.group(2).upper()]
    if not size or size % 512:
        raise UsageError("size %r is not a positive multiple of 512 bytes" % text)
    return size


def resize(xs, domid, vdev, size, backend_domid=0, timeout=10.0):
    """Grow a VBD's image to ``size`` bytes; returns its path.

    A raw file is truncated here: a running ``blkif serve`` notices within a
    second and tells a connected frontend.  An image of another format is
    grown by the VBD's worker under its qemu-storage-daemon (which holds the
    image's lock): asked in the backend's RESIZE_REQUEST node, answered in
    RESIZE_RESULT within ``timeout`` s.  An NBD export is grown on its server
    first; asked the same way, the worker connects again and takes its new
    size, which must be ``size`` at least.  Block devices are grown with
    their own tools (lvextend, ...); shrinking is refused.
    """
    devid = vdev_to_devid(vdev)
    back = find_backend(xs, backend_domid, domid, devid)
    params = xs.read_str(back + "/params", None)
    if params is None:
        raise UsageError("no VBD %s (devid %d) for domain %d" % (vdev, devid, domid))
    try:
        target = parse_params(params)
    except ParamsError as exc:
        raise UsageError("VBD %s of domain %d: %s" % (vdev, domid, exc)) from None
    if target.kind in ("image", "nbd"):
        return _grow_image(xs, back, "%s of domain %d" % (vdev, domid), target, size, timeout)
    path = target.path
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UsageError("VBD %s of domain %d: %s: %s" % (vdev, domid, path, exc.strerror)) \
            from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError("%s is not an image file: grow a block device with its own tool "
                         "(lvextend, ...); blkif serve notices within a second" % path)
    if size < st.st_size:
        raise UsageError("%s has %d bytes: shrinking it to %d would lose the guest's data; "
                         "refused" % (path, st.st_size, size))
    os.truncate(path, size)
    return path


def _grow_image(xs, back, name, target, size, timeout):
    """Ask the worker serving ``back`` to grow its image (or take an NBD
    export's new size); the image's path or the export's URI once done."""
    have = int(xs.read_str(back + "/sectors", "0") or 0) * 512
    if size < have:
        raise UsageError("%s has %d bytes: shrinking it to %d would lose the guest's data; "
                         "refused" % (name, have, size))
    result = back + "/" + RESIZE_RESULT
    xs.rm(result)
    with xs.watch(result) as watch:
        xs.write(back + "/" + RESIZE_REQUEST, str(size))
        deadline = time.monotonic() + timeout
        answer = xs.read_str(result, None)
        while answer is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if xs.read_str(back + "/" + RESIZE_REQUEST, None) is None:
                    raise BlkifError("%s: the worker took the request but did not answer "
                                     "within %.0f s; it may still finish (blkif serve's log "
                                     "says)" % (name, timeout))
                xs.rm(back + "/" + RESIZE_REQUEST)
                raise BlkifError("%s: no worker of blkif serve grew %s within %.0f s (is the "
                                 "service running?)" % (name, target, timeout))
            watch.get(timeout=remaining)
            answer = xs.read_str(result, None)
    xs.rm(result)
    if answer != "ok":
        raise BlkifError("%s: %s" % (name, answer))
    return target.uri if target.kind == "nbd" else target.path


def list_vbds(xs, backend_domid=0):
    """Every VBD under our backend directories: dicts with both ends' states."""
    out = []
    for kind in BACKEND_TYPES:
        root = "/local/domain/%d/backend/%s" % (backend_domid, kind)
        for domid in sorted(xs.list(root) if xs.exists(root) else [], key=int):
            for devid in sorted(xs.list("%s/%s" % (root, domid)), key=int):
                out.append(_describe(xs, int(domid), int(devid), kind,
                                     "%s/%s/%s" % (root, domid, devid)))
    out.sort(key=lambda row: (row["domid"], row["devid"]))
    return out


def _describe(xs, domid, devid, kind, back):
    front = xs.read_str(back + "/frontend", "")
    return {"domid": domid, "devid": devid, "type": kind,
            "vdev": xs.read_str(back + "/dev", ""),
            "params": xs.read_str(back + "/params", ""),
            "mode": xs.read_str(back + "/mode", ""),
            "backend_state": xs.read_state(back + "/state").name,
            "frontend_state": xs.read_state(front + "/state").name if front else "Unknown"}


def _size_arg(text):
    try:
        return parse_size(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _wait_published(xs, domid, vdev, size, timeout, backend_domid):
    """Wait for a connected VBD's backend to publish ``size``; the message to print."""
    back = find_backend(xs, backend_domid, domid, vdev_to_devid(vdev))
    sectors = size // 512
    if xs.read_state(back + "/state") != XenbusState.Connected:
        return "%s of domain %d: %d sectors, published when its frontend connects" % (
            vdev, domid, sectors)
    deadline = time.monotonic() + timeout
    while xs.read_str(back + "/sectors", "") != str(sectors):
        if time.monotonic() > deadline:
            raise BlkifError("%s of domain %d: the image has %d sectors but the backend did not "
                             "publish them within %.0f s (is `blkif serve` running?)"
                             % (vdev, domid, sectors, timeout))
        time.sleep(0.1)
    return "%s of domain %d: %d sectors, published to its frontend" % (vdev, domid, sectors)


def add_arguments(parser):
    parser.add_argument("--xenstore", metavar="PATH",
                        help="xenstored socket (default: $XENSTORED_PATH or the system's)")
    parser.add_argument("--backend-domid", type=int, default=0, metavar="N")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    create_p = sub.add_parser("create", help="write a new VBD's nodes (both in Initialising)")
    create_p.add_argument("--domid", type=int, required=True, help="the guest")
    create_p.add_argument("--vdev", required=True, help="xvda, sdb, hdc, d0p1 or a number")
    create_p.add_argument("--target", required=True,
                          help="raw file or block device, FORMAT:IMAGE (qcow2:, vhd:, vmdk:, "
                               "qed:, qcow:) or an NBD URI (docs/storage.md)")
    create_p.add_argument("--mode", default="w", choices=["r", "w"])
    create_p.add_argument("--type", dest="kind", default="vbd", choices=BACKEND_TYPES,
                          help="backend type: vbd (as libxl's phy disks) or qdisk (as its "
                               "backendtype=qdisk disks); default vbd")
    destroy_p = sub.add_parser("destroy", help="remove a VBD's nodes")
    destroy_p.add_argument("--domid", type=int, required=True)
    destroy_p.add_argument("--vdev", required=True)
    resize_p = sub.add_parser("resize", help="grow a VBD's image (raw, or qcow2 and the "
                                             "other formats under their daemon); blkif serve "
                                             "tells the frontend")
    resize_p.add_argument("--domid", type=int, required=True)
    resize_p.add_argument("--vdev", required=True)
    resize_p.add_argument("--size", required=True, type=_size_arg,
                          help="the new size: bytes, or with K, M, G or T (binary)")
    resize_p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                          help="wait this long for a connected VBD to publish the size "
                               "(default 10)")
    list_p = sub.add_parser("list", help="every VBD with both ends' states")
    list_p.add_argument("--json", action="store_true")


def run(args):
    import json

    from xenstore import Xenstore

    with Xenstore.open(args.xenstore) as xs:
        if args.action == "create":
            try:
                named = parse_params(args.target)
            except ParamsError as exc:
                raise UsageError(str(exc)) from None
            if named.kind != "nbd" and not os.path.exists(named.path):
                raise UsageError("target %s does not exist" % named.path)
            devid = create(xs, args.domid, args.vdev, args.target, args.mode,
                           args.backend_domid, args.kind)
            print(backend_path(args.backend_domid, args.domid, devid, args.kind))
        elif args.action == "destroy":
            destroy(xs, args.domid, args.vdev, args.backend_domid)
        elif args.action == "resize":
            resize(xs, args.domid, args.vdev, args.size, args.backend_domid, args.timeout)
            print(_wait_published(xs, args.domid, args.vdev, args.size, args.timeout,
                                  args.backend_domid))
        else:
            rows = list_vbds(xs, args.backend_domid)
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                print("%-6s %-6s %-6s %-5s %-4s %-13s %-13s %s" % (
                    "domid", "devid", "vdev", "type", "mode", "backend", "frontend", "target"))
                for r in rows:
                    print("%-6d %-6d %-6s %-5s %-4s %-13s %-13s %s" % (
                        r["domid"], r["devid"], r["vdev"], r["type"], r["mode"],
                        r["backend_state"], r["frontend_state"], r["params"]))
    return 0
