"""What a sandbox guest runs for the frontend suite: I/O on the device it
attached, one result per operation, so the suite can judge the frontend from
outside its process (``blkif.sandbox`` calls ``guest_*`` functions)."""
import hashlib

from blkif.errors import BlkifError


def pattern(seed, length):
    """The bytes a ``write`` op with ``seed`` writes: each 512-byte sector
    names the seed and its index (so a misplaced sector shows), as text a
    guest's shell can make with awk (``console_agent.AGENT``)."""
    if length % 512:
        raise ValueError("a pattern is whole 512-byte sectors, not %d bytes" % length)
    return b"".join(b"%-511s\n" % (b"blkif seed %d sector %d" % (seed, i))
                    for i in range(length // 512))


def guest_io(guest, params, emit):
    """Run ``params["ops"]`` in order: dicts with ``op`` (read, write, flush,
    discard), ``offset``, ``length``, ``seed`` (writes).  Each result is
    {"ok": bool, "error": text, "sha256": of the bytes read}."""
    dev = guest.dev
    results = []
    for op in params["ops"]:
        kind, offset, length = op["op"], op.get("offset", 0), op.get("length", 0)
        try:
            if kind == "read":
                data = dev.read(offset, length)
                results.append({"ok": True, "sha256": hashlib.sha256(data).hexdigest()})
                continue
            if kind == "write":
                dev.write(offset, pattern(op["seed"], length))
            elif kind == "flush":
                dev.flush()
            else:
                dev.discard(offset, length)
            results.append({"ok": True})
        except BlkifError as exc:
            results.append({"ok": False, "error": "%s: %s" % (type(exc).__name__, exc)})
    return results


def guest_state(guest, params, emit):
    """The device's xenbus state as the frontend last wrote it."""
    return guest.dev.state.name if guest.dev is not None else "detached"
