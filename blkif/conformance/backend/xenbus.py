"""Backend cases: xenbus negotiation (blkif.h "Backend/Frontend XenBus Nodes"
and the state machine; Linux xen-blkback/xenbus.c for what the header leaves
open).

A bad node must end in a xenbus error node and Closing (Linux
``xenbus_dev_fatal``), never in Connected with nonsense, nor in a crash:
afterwards the VBD must still close and start over.
"""
from blkif.abi import X86_32, X86_64
from blkif.abi.constants import BLKIF_OP_READ, BLKIF_RSP_OKAY, GTF_reading, GTF_writing
from blkif.conformance.catalogue import INFO, MUST, SHOULD, Failed, Skipped, group
from xenstore import XenbusState as S

case = group("backend", "xenbus")


@case("xenbus-1", "blkif.h: Backend Device Properties", MUST,
      title="the disk is described once Connected",
      sends="a default setup (one ring page, one queue), Initialised",
      expects="Connected with sectors, info and sector-size (a power of two >= 512)",
      why="a frontend cannot size the disk without these nodes")
def _(peer):
    disk = peer.connect()
    return "sectors %d, sector-size %d, info %#x" % (disk.sectors, disk.sector_size, disk.info)


@case("xenbus-2", "blkif.h: Backend Features", INFO,
      title="what the backend offers at InitWait",
      sends="nothing; reads the backend directory at InitWait",
      expects="the feature nodes (recorded, not judged)",
      why="implementations differ; a frontend must cope with every combination")
def _(peer):
    peer.offer()
    keys = ("max-ring-page-order", "multi-queue-max-queues", "feature-max-indirect-segments",
            "feature-persistent", "feature-flush-cache", "feature-barrier", "feature-discard",
            "discard-secure")
    return ", ".join("%s=%s" % (k, peer.read_back(k)) for k in keys)


@case("xenbus-3", "blkif.h: protocol (default)", INFO,
      title="the ring layout assumed without a protocol node",
      sends="a setup without the protocol node, then a READ in the x86_64 layout",
      expects="recorded: native (x86_64) or x86_32 (Linux blkback on x86)",
      why="with no protocol node Linux blkback assumes x86_32 on x86; QEMU and the BSDs native")
def _(peer):
    peer.connect(protocol="", abi=X86_64)
    ref = peer.gref(0)
    peer.encoder.rw(peer.q.ring, BLKIF_OP_READ, 0x5A5A, 0, [(ref, 0, 7)])
    peer.push()
    rid, op, status = peer.responses(1)[0]
    if (rid, op, status) == (0x5A5A, BLKIF_OP_READ, BLKIF_RSP_OKAY):
        return "native (x86_64 layout)"
    return "not x86_64: the response read back as id %#x op %d status %d" % (rid, op, status)


@case("xenbus-4", "blkif.h: protocol", MUST,
      title="the protocol node is honoured (x86_32-abi)",
      sends="protocol=x86_32-abi, then requests in the x86_32 layout",
      expects="Connected; each answered OKAY with its id, in the x86_32 layout",
      why="32-bit guests on a 64-bit backend use the packed layout")
def _(peer):
    peer.connect(abi=X86_32)
    peer.alive()


# node -> (value, why it is bad); a node the backend reads only when it
# offered a feature names that offer (without it the node is not read, and
# a backend that ignores it conforms)
BAD_NODES = [
    ("xenbus-5", {"ring-page-order": "9"}, "ring-page-order beyond max-ring-page-order",
     "max-ring-page-order"),
    ("xenbus-6", {"multi-queue-num-queues": "0"}, "multi-queue-num-queues 0",
     "multi-queue-max-queues"),
    ("xenbus-7", {"multi-queue-num-queues": "65"}, "multi-queue-num-queues beyond the offer",
     "multi-queue-max-queues"),
    ("xenbus-8", {"protocol": "sparc-abi"}, "an unknown protocol"),
    ("xenbus-9", {"event-channel": "junk"}, "event-channel not a number"),
    ("xenbus-10", {"event-channel": "4000"}, "event-channel not offered to the backend"),
    ("xenbus-11", {"ring-ref": "junk"}, "ring-ref not a number"),
    ("xenbus-12", {"ring-ref": "999999"}, "ring-ref never granted"),
]


def _bad_node(case_id, nodes, what, offered=None):
    @case(case_id, "blkif.h: Frontend XenBus Nodes; xenbus_dev_fatal", MUST,
          title="bad node: %s" % what,
          sends="a one-queue setup with %s" % ", ".join("%s=%s" % kv for kv in nodes.items())
          + ("" if offered is None else " (skipped unless %s is offered)" % offered),
          expects="an error node and Closing; then Closed and InitWait again when the "
                  "frontend starts over, and a good setup connects",
          why="a guest's bad value must cost only its own VBD, never the backend")
    def _(peer):
        peer.offer()
        if offered is not None and peer.read_back(offered) is None:
            raise Skipped("%s not offered: the backend need not read the node" % offered)
        peer.setup(extra=nodes)
        error = peer.expect_refusal(what)
        peer.close()
        peer.restart()
        peer.connect()
        peer.alive()
        return "error node: %s" % error


for _args in BAD_NODES:
    _bad_node(*_args)


@case("xenbus-13", "blkif.h: ring-ref (required)", MUST,
      title="missing ring-ref",
      sends="a setup without ring-ref",
      expects="an error node and Closing",
      why="a required node left out must not be read as 0 or as garbage")
def _(peer):
    peer.setup(omit=("ring-ref",))
    return "error node: %s" % peer.expect_refusal("missing ring-ref")


@case("xenbus-14", "blkif.h: event-channel (required)", MUST,
      title="missing event-channel",
      sends="a setup without event-channel",
      expects="an error node and Closing",
      why="a required node left out must not be read as 0 or as garbage")
def _(peer):
    peer.setup(omit=("event-channel",))
    return "error node: %s" % peer.expect_refusal("missing event-channel")


@case("xenbus-15", "blkif.h: ring-page-order, multi-queue-num-queues", MUST,
      title="the largest offered rings and queues",
      sends="as many queues and ring pages as offered (capped at 4 queues)",
      expects="Connected, and every queue serves a read",
      why="the offer is a promise: everything inside it must work")
def _(peer):
    offer = peer.offer()
    queues = min(offer.max_queues, 4)
    peer.connect(queues=queues, order=offer.max_ring_page_order)
    for i in range(queues):
        peer.alive(i)
    return "%d queue(s) of %d page(s)" % (queues, 1 << offer.max_ring_page_order)


@case("xenbus-16", "blkif.h: state machine (reconnect)", MUST,
      title="close and connect again",
      sends="connect, I/O, Closing, Closed, Initialising, connect, I/O",
      expects="InitWait after Initialising, then Connected, and the new rings serve",
      why="guests reconnect after suspend/resume and kexec")
def _(peer):
    peer.connect()
    peer.alive()
    peer.close()
    peer.restart()
    peer.connect(order=peer.offer().max_ring_page_order)
    peer.alive()


@case("xenbus-17", "XSA-350; blkif.h: state machine", MUST,
      title="fast connect/close cycles",
      sends="20 cycles of setup then Closing/Closed before or right after Connected",
      expects="the backend follows each time and the last setup connects and serves; "
              "another VBD is unaffected",
      why="XSA-350: a frontend racing connect and close made blkback use freed rings")
def _(peer):
    other = peer.other()
    for i in range(20):
        peer.setup()
        if i % 2:
            peer.wait_backend([S.Connected, S.Closing, S.Closed], what="cycle %d" % i)
        peer.switch(S.Closing)
        peer.wait_backend([S.Closing, S.Closed], what="cycle %d" % i)
        peer.switch(S.Closed)
        peer.wait_backend([S.Closed], what="cycle %d" % i)
        peer.release()
        peer.restart()
    peer.connect()
    peer.alive()
    other.alive()


@case("xenbus-18", "blkif.h: feature-persistent", MUST,
      title="persistent grants off: pages unmapped after each response",
      sends="feature-persistent=0, a read into a granted page, then end its grant",
      expects="the grant ends at once: the backend no longer maps the page",
      why="without persistent grants the frontend may reuse a page as soon as it is "
          "answered")
def _(peer):
    peer.connect(persistent=False)
    peer.alive()
    try:
        flags = peer.q.pool.flags(0)
    except NotImplementedError:
        return "cannot inspect grant entries on this platform"
    if flags & (GTF_reading | GTF_writing):
        raise Failed("page still mapped after its response (grant flags %#x)" % flags)


@case("xenbus-19", "blkif.h: feature-persistent", SHOULD,
      title="persistent grants on: the same pages serve many requests",
      sends="feature-persistent=1 when offered, 64 reads through the same page",
      expects="every read OKAY",
      why="both ends must agree; a backend that offers must cope with reuse")
def _(peer):
    if not peer.offer().persistent:
        return "not offered (Linux blkback writes it only when Connected)"
    peer.connect(persistent=True)
    for _ in range(64):
        peer.alive()
