"""The blkif contract a crash must keep, as a model of what each sector may hold.

Every write gets an id (1, 2, ...) and fills each of its sectors with
``(id, sector)`` repeated, so any sector read back names the write it came
from (0: never written).  Per sector the model keeps:

- ``answered``: the last write the frontend saw answered OKAY;
- ``unsure``: writes sent after it whose answer never came (the worker died):
  each may or may not have reached the image, so each may be there;
- ``flushed``: the last write answered before a flush that was answered
  (blkif.h: a completed flush covers every write completed before it).

A sector may hold ``answered`` or one of ``unsure``.  Anything else breaks a
clause, named in the :class:`Violation`: a write older than ``flushed`` is a
flushed write lost; older than ``answered``, an answered write lost (or stale
data in a read); unknown bytes, a torn or foreign sector.  Once the image has
been read after a crash, what it holds is what is there: ``settle`` makes the
read value the only one allowed.
"""
import struct
from array import array

SECTOR = 512
_TAG = struct.Struct("<QQ")


def sector_bytes(write_id, sector):
    """What write ``write_id`` puts in ``sector`` (zeros for id 0, the blank image)."""
    return bytes(SECTOR) if write_id == 0 else _TAG.pack(write_id, sector) * (SECTOR // 16)


def payload(write_id, first, count):
    """The bytes of write ``write_id`` over ``count`` sectors from ``first``."""
    return b"".join(sector_bytes(write_id, s) for s in range(first, first + count))


class Violation(AssertionError):
    """The image or a read broke the contract; ``clause`` names which part."""

    def __init__(self, clause, detail):
        super().__init__("%s: %s" % (clause, detail))
        self.clause = clause


class DiskModel:
    """What each of ``sectors`` sectors may hold; ids of writes come from here."""

    def __init__(self, sectors):
        self.sectors = sectors
        self.answered = array("Q", bytes(8 * sectors))
        self.flushed = array("Q", bytes(8 * sectors))
        self.unsure = {}  # sector -> set of write ids
        self.next_id = 1
        self.writes_answered = self.flushes_answered = 0

    def new_write(self, first, count):
        """An id for a write of ``count`` sectors at ``first``, and its bytes."""
        write_id, self.next_id = self.next_id, self.next_id + 1
        return write_id, payload(write_id, first, count)

    def write_answered(self, write_id, first, count):
        self.writes_answered += 1
        for s in range(first, first + count):
            self.answered[s] = write_id
            self.unsure.pop(s, None)

    def write_unanswered(self, write_id, first, count):
        """Its answer never came: it may be in the image, or not."""
        for s in range(first, first + count):
            self.unsure.setdefault(s, set()).add(write_id)

    def flush_sent(self):
        """What a flush sent now covers, once answered (pass to :meth:`flush_answered`)."""
        return array("Q", self.answered)

    def flush_answered(self, covered):
        self.flushes_answered += 1
        self.flushed = covered

    def check(self, data, first, what):
        """Check ``data`` read from sector ``first`` on (``what``: where it was read)."""
        for i in range(len(data) // SECTOR):
            s = first + i
            got = data[i * SECTOR:(i + 1) * SECTOR]
            write_id = _TAG.unpack_from(got)[0]
            if got != sector_bytes(write_id, s):
                raise Violation("torn or foreign sector",
                                "%s: sector %d holds bytes no write put there" % (what, s))
            if write_id == self.answered[s] or write_id in self.unsure.get(s, ()):
                continue
            if write_id < self.flushed[s]:
                raise Violation("flushed write lost",
                                "%s: sector %d holds write %d; write %d was answered before "
                                "an answered flush" % (what, s, write_id, self.flushed[s]))
            if write_id < self.answered[s]:
                raise Violation("answered write lost or stale data",
                                "%s: sector %d holds write %d; write %d to it was answered"
                                % (what, s, write_id, self.answered[s]))
            raise Violation("write never sent or never allowed",
                            "%s: sector %d holds write %d (answered %d, unsure %s)"
                            % (what, s, write_id, self.answered[s],
                               sorted(self.unsure.get(s, ()))))

    def power_cut(self, image):
        """After a power cut: every sector of ``image`` (bytes) must hold what
        the last answered flush covered or a later write to it (a disk may
        have written any of those back); then the image is the truth, durable."""
        for s in range(self.sectors):
            got = image[s * SECTOR:(s + 1) * SECTOR]
            write_id = _TAG.unpack_from(got)[0]
            if got != sector_bytes(write_id, s) or write_id >= self.next_id:
                raise Violation("torn or foreign sector",
                                "the image after a power cut: sector %d holds bytes no "
                                "write put there" % s)
            if write_id < self.flushed[s]:
                raise Violation("flushed write lost",
                                "the image after a power cut: sector %d holds write %d; "
                                "write %d was answered before an answered flush"
                                % (s, write_id, self.flushed[s]))
        self._adopt(image)
        self.flushed = array("Q", self.answered)

    def settle(self, image):
        """After a crash: check the whole ``image`` (bytes), then take it as the truth."""
        self.check(image, 0, "the image")
        self._adopt(image)

    def _adopt(self, image):
        for s in range(self.sectors):
            self.answered[s] = _TAG.unpack_from(image, s * SECTOR)[0]
        self.unsure.clear()
