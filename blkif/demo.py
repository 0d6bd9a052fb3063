"""``blkif demo``: the whole stack on one machine, checked byte for byte.

A :class:`blkif.sandbox.Sandbox` runs our xenstored, the sim hypervisor and
``blkif serve`` as processes, and guest domain 1 as another.  Then:

1. an image of ``--size`` random bytes, VBD ``xvda`` of domain 1 on it;
2. the guest attaches (the negotiation) and reads the whole disk: that read
   must match the image's digests, and becomes the guest's model of the disk;
3. for ``--duration`` seconds, rounds of ``--inflight`` transfers at once:
   writes of random data, reads (half of them of what the round before
   wrote) and discards, 4 KiB..1 MiB at scattered sector offsets, never
   overlapping within a round; every read is compared with the model, a
   flush goes with every fourth round;
4. a flush, a read of the whole disk compared with the model, detach; every
   process stops; the image file must match the model's digests.

Exit 0 only if every check passed.  Figures: transfers (reads, writes and
discards; flushes apart) and MB (10**6 bytes) read and written per second of
step 3, verification included.
"""
import hashlib
import json
import random
import time

from blkif import sandbox
from blkif.errors import BlkifError, UsageError

CHUNK = 1 << 20  # digests are per MiB of the disk
MAX_PAGES = 256  # 1 MiB
DEFAULT_SIZE = 64 << 20
VDEV = "xvda"
DOMID = 1


class VerifyError(BlkifError):
    """Data read back, or the image file, differs from what was written."""


def add_arguments(parser):
    parser.add_argument("--size", type=sandbox.parse_size, default=DEFAULT_SIZE,
                        metavar="BYTES", help="image size, e.g. 64M (default), 4M..1G")
    parser.add_argument("--duration", type=sandbox.positive_float, default=5.0,
                        metavar="SECONDS",
                        help="seconds of verified I/O (default 5)")
    parser.add_argument("--inflight", type=int, default=32, metavar="N",
                        help="transfers submitted at once, 1..256 (default 32)")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed (default: a new one, printed)")
    sandbox.add_arguments(parser)


def digests(data):
    """The per-MiB digests of ``data`` (bytes-like)."""
    view = memoryview(data)
    return [hashlib.blake2b(view[i:i + CHUNK], digest_size=16).hexdigest()
            for i in range(0, len(view), CHUNK)]


def file_digests(path):
    with open(path, "rb") as f:
        return [hashlib.blake2b(chunk, digest_size=16).hexdigest()
                for chunk in iter(lambda: f.read(CHUNK), b"")]


def first_difference(want, got, what):
    """Raise VerifyError naming the first MiB where digests differ."""
    if len(want) != len(got):
        raise VerifyError("%s: %d MiB instead of %d" % (what, len(got), len(want)))
    for i, (a, b) in enumerate(zip(want, got)):
        if a != b:
            raise VerifyError("%s: MiB %d (bytes %d..%d) differs" % (
                what, i, i * CHUNK, (i + 1) * CHUNK))


# -- the parent: sandbox, report -------------------------------------------

def run(args):
    if not 1 <= args.inflight <= 256:
        raise UsageError("--inflight %d is not in 1..256" % args.inflight)
    serve_options, front = sandbox.setup(args)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    progress = sandbox.Progress(enabled=not args.quiet)
    report = {"ok": False, "seed": seed, "size": args.size, "duration": args.duration}
    try:
        with sandbox.Sandbox(args.workdir, serve_options) as box:
            progress.note("blkif demo: xenstored, sim hypervisor, blkif serve and guest "
                          "domain %d running in %s" % (DOMID, box.dir))
            rng = random.Random(seed)
            image_digests = []

            def fill(offset, n):
                data = rng.randbytes(n)
                image_digests.extend(digests(data))
                return data
            image = box.make_image("disk.img", args.size, fill)
            box.add_vbd(DOMID, VDEV, image)
            guest = box.start_guest(DOMID)
            report["negotiated"] = guest.call("attach", {"vdev": VDEV, "options": front})
            result = guest.call("call", {"function": "blkif.demo:guest_workload", "params": {
                "seed": seed, "duration": args.duration, "inflight": args.inflight,
                "image_digests": image_digests}}, progress.event,
                timeout=args.duration + 120)
            guest.call("detach")
            progress.end()
            box.stop_cleanly()
            first_difference(result.pop("digests"), file_digests(image),
                             "image file after shutdown, against what the guest wrote")
            report.update(result, ok=True, shutdown=box.exit_status)
    except (BlkifError, OSError) as exc:
        progress.end()
        if args.json:
            report["error"] = str(exc)
            print(json.dumps(report, indent=1, sort_keys=True))
        raise
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True))
    else:
        print_report(report)
    return 0


def print_report(r):
    n, w = r["negotiated"], r["workload"]
    features = [name for name in ("flush", "barrier", "discard") if n.get(name)]
    if n.get("discard"):
        features[-1] += " (granularity %d)" % n["discard_granularity"]
    lines = [
        ("negotiated", "abi %s (%s), %d queue(s) of %d ring page(s), indirect segments %s, "
                       "persistent grants %s" % (
                           n["abi"], n["protocol"], n["queues"], n["ring_pages"],
                           n["indirect_segments"] or "none (direct only)",
                           "on" if n["persistent"] else "off")),
        ("features", ", ".join(features) or "none"),
        ("disk", "%d sectors of %d bytes (%d MiB)%s" % (
            n["sectors"], n["sector_size"], r["size"] >> 20,
            ", read-only" if n["readonly"] else "")),
        ("workload", "%d reads, %d writes, %d discards, %d flushes in %.1f s (seed %d)" % (
            w["reads"], w["writes"], w["discards"], w["flushes"], w["seconds"], r["seed"])),
        ("speed", "%d IOPS, %.1f MB/s (read %.1f, write %.1f)" % (
            r["iops"], r["mb_per_s"], r["read_mb_per_s"], r["write_mb_per_s"])),
        ("verified", "every byte: %.1f MiB read back as written, image file as written"
                     % (r["verified_bytes"] / (1 << 20))),
        ("shutdown", ", ".join("%s %s" % (name, "ok" if code == 0 else code)
                               for name, code in r["shutdown"].items())),
    ]
    for name, text in lines:
        print("%-11s %s" % (name + ":", text))


# -- the guest: the workload ------------------------------------------------

def guest_workload(guest, params, emit):
    """Steps 2 to 4 of the module comment, in guest domain 1."""
    dev = guest.dev
    rng = random.Random(params["seed"] + 1)
    model = read_disk(dev, emit, "reading the disk")
    first_difference(params["image_digests"], digests(model),
                     "first read of the disk, against the image")
    verified = len(model)
    counts = dict.fromkeys(("reads", "writes", "discards", "flushes"), 0)
    moved = {"read": 0, "write": 0}
    recent = []
    duration = params["duration"]
    start = time.monotonic()
    rounds = 0
    while time.monotonic() - start < duration:
        plan = plan_round(rng, dev.size, params["inflight"], recent, dev.negotiated["discard"])
        submitted = []
        with dev.plugged():  # the round goes out with one notify per queue
            for op, offset, length in plan:
                if op == "write":
                    data = rng.randbytes(length)
                    model[offset:offset + length] = data
                    submitted.append((dev.submit_write(offset, data), op, offset, length))
                elif op == "discard":
                    model[offset:offset + length] = bytes(length)
                    submitted.append((dev.submit_discard(offset, length), op, offset, length))
                else:
                    submitted.append((dev.submit_read(offset, length), op, offset, length))
            if rounds % 4 == 3:
                submitted.append((dev.submit_flush(), "flush", 0, 0))
        dev.wait(timeout=30)
        for handle, op, offset, length in submitted:
            data = handle.result(0)  # raises the transfer's error
            counts[op + ("es" if op == "flush" else "s")] += 1
            if op == "read":
                check(data, model, offset, length)
                verified += length
            if op in moved:
                moved[op] += length
        recent = [(o, n) for _, op, o, n in submitted if op == "write"]
        rounds += 1
        elapsed = time.monotonic() - start
        emit({"label": "verified I/O", "fraction": elapsed / duration,
              "detail": "%d IOPS  %.1f MB/s" % (
                  (counts["reads"] + counts["writes"] + counts["discards"]) / elapsed,
                  (moved["read"] + moved["write"]) / elapsed / 1e6)})
    seconds = time.monotonic() - start
    dev.flush()
    final = read_disk(dev, emit, "verifying the disk")
    if final != model:
        at = next(i for i in range(len(model)) if final[i] != model[i])
        raise VerifyError("final read of the disk differs from what was written at byte %d"
                          % at)
    verified += len(final)
    transfers = counts["reads"] + counts["writes"] + counts["discards"]
    return {
        "workload": dict(counts, seconds=round(seconds, 3), rounds=rounds,
                         bytes_read=moved["read"], bytes_written=moved["write"]),
        "iops": round(transfers / seconds, 1),
        "mb_per_s": round((moved["read"] + moved["write"]) / seconds / 1e6, 2),
        "read_mb_per_s": round(moved["read"] / seconds / 1e6, 2),
        "write_mb_per_s": round(moved["write"] / seconds / 1e6, 2),
        "verified_bytes": verified,
        "digests": digests(model),
    }


def read_disk(dev, emit, label, depth=16):
    """The whole disk, read 1 MiB at a time with ``depth`` in flight."""
    out = bytearray(dev.size)
    offsets = list(range(0, dev.size, CHUNK))
    for first in range(0, len(offsets), depth):
        batch = [(o, dev.submit_read(o, min(CHUNK, dev.size - o)))
                 for o in offsets[first:first + depth]]
        for offset, handle in batch:
            data = handle.result()
            out[offset:offset + len(data)] = data
        emit({"label": label, "fraction": (first + len(batch)) / len(offsets),
              "detail": "%d MiB" % ((first + len(batch)) * CHUNK >> 20)})
    return out


def check(data, model, offset, length):
    want = model[offset:offset + length]
    if data != want:
        at = next(i for i in range(length) if data[i] != want[i])
        raise VerifyError("read of %d bytes at %d returned other data than was written "
                          "(first difference at byte %d)" % (length, offset, offset + at))


def plan_round(rng, size, count, recent, discard):
    """``count`` transfers (op, offset, length) that do not overlap.

    Lengths are 1..256 pages, spread over powers of two; offsets any sector.
    About 45% writes, 40% reads (half of them re-reading a range ``recent``
    wrote), 15% discards if ``discard`` (else reads)."""
    taken = []

    def free(offset, length):
        return all(offset + length <= o or o + n <= offset for _, o, n in taken)

    recent = list(recent)
    rng.shuffle(recent)
    tries = 0
    while len(taken) < count and tries < count * 20:
        tries += 1
        roll = rng.random()
        op = "write" if roll < 0.45 else "read" if roll < 0.85 or not discard else "discard"
        if op == "read" and recent and rng.random() < 0.5:
            offset, length = recent.pop()
        else:
            k = rng.randrange(8)
            length = 4096 * rng.randint(1 << k, min(2 << k, MAX_PAGES))
            offset = 512 * rng.randrange((size - length) // 512 + 1)
        if free(offset, length):
            taken.append((op, offset, length))
    return taken
