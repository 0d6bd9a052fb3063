"""A frontend in a guest of its own (Linux blkfront, or any other), driven
through the guest's console.

The guest runs :data:`AGENT`, a POSIX shell script (busybox has everything
it uses), on its console: ``sh agent </dev/hvc0 >/dev/hvc0 2>&1``.  The
suite, in dom0, opens the console's pty (``console/tty`` in the guest's
xenstore home, as ``xl console`` does) and sends one line per operation::

    N wait DEV SECONDS          the disk /dev/DEV is there and readable: "ok SECTORS"
    N gone DEV SECONDS          /dev/DEV went away
    N read DEV OFFSET LENGTH    O_DIRECT read: "ok SHA256" of the bytes
    N write DEV OFFSET LENGTH SEED   O_DIRECT write of pattern(SEED, LENGTH)
    N flush DEV                 fsync of the device (a cache flush, if it has one)
    N discard DEV OFFSET LENGTH blkdiscard
    N klog                      the kernel's messages since the last klog, "|"-joined
    N ping                      "ok"

The agent answers each with one line ``AGENT N ok|fail TEXT``, and runs
every operation in the background: one that hangs (a frontend waiting
forever on a backend that went away) does not stop the next, and is
reported as hung by the suite when its answer does not come.
"""
import os
import re
import threading
import tty

from blkif.conformance.catalogue import Failed
from blkif.errors import BlkifError
from xenstore import XenbusState

# The guest's kernel messages go to ``klog`` rather than the console
# (dmesg -n 1), so they cannot break an answer line in two.
AGENT = r"""#!/bin/sh
# blkif conformance agent (blkif/conformance/frontend/console_agent.py):
# answers the suite's commands on this console, one line each.
DEV=${AGENT_DEV:-/dev} SYS=${AGENT_SYS:-/sys/block} TMP=${AGENT_TMP:-/tmp}
DIRECT=${AGENT_DIRECT-direct} KLOG=${AGENT_KLOG:-dmesg -c}
stty -echo 2>/dev/null
[ -n "$AGENT_KLOG" ] || dmesg -n 1 2>/dev/null
answer() { echo "AGENT $*"; }
# pattern SEED LENGTH: each 512-byte sector names its seed and index.
pattern() {
  awk -v s="$1" -v n=$(($2 / 512)) \
    'BEGIN { for (i = 0; i < n; i++) printf "%-511s\n", "blkif seed " s " sector " i }'
}
# attempt N CMD...: answer "ok" with CMD's output, or "fail" with its last error line.
attempt() {
  n=$1; shift
  if out=$("$@" 2>"$TMP/err.$n"); then answer $n ok "$out"
  else answer $n fail "$(tail -n 1 "$TMP/err.$n")"; fi
  rm -f "$TMP/err.$n"
}
waitfor() {  # waitfor present|absent DEV SECONDS
  i=0
  while [ $i -lt $(($3 * 10)) ]; do
    # Present means readable: a first read also waits out the partition scan
    # of a disk just added, and a disk the frontend declared dead is not back.
    if [ $1 = present ]; then
      [ -e "$SYS/$2" ] && dd if="$DEV/$2" of=/dev/null bs=512 count=1 \
        ${DIRECT:+iflag=$DIRECT} 2>/dev/null && { cat "$SYS/$2/size"; return 0; }
    else
      [ -e "$SYS/$2" ] || return 0
    fi
    sleep 0.1; i=$((i + 1))
  done
  if [ $1 = absent ]; then echo "$2 still there after $3 s" >&2
  elif [ -e "$SYS/$2" ]; then echo "$2 is there but cannot be read after $3 s" >&2
  else echo "no $2 after $3 s" >&2; fi
  return 1
}
readop() {  # readop N DEV OFFSET LENGTH
  dd if="$DEV/$2" of="$TMP/r.$1" bs=$4 count=1 skip=$3 iflag=skip_bytes${DIRECT:+,$DIRECT} \
    2>"$TMP/dd.$1" || { tail -n 1 "$TMP/dd.$1" >&2; rm -f "$TMP/r.$1" "$TMP/dd.$1"; return 1; }
  [ $(wc -c < "$TMP/r.$1") -eq $4 ] || { echo "short read" >&2; return 1; }
  sum=$(sha256sum < "$TMP/r.$1"); rm -f "$TMP/r.$1" "$TMP/dd.$1"
  echo ${sum%% *}
}
writeop() {  # writeop N DEV OFFSET LENGTH SEED
  pattern $5 $4 > "$TMP/w.$1"
  dd if="$TMP/w.$1" of="$DEV/$2" bs=$4 count=1 seek=$3 conv=notrunc \
    oflag=seek_bytes${DIRECT:+,$DIRECT} 2>"$TMP/dd.$1"; rc=$?
  [ $rc = 0 ] || tail -n 1 "$TMP/dd.$1" >&2
  rm -f "$TMP/w.$1" "$TMP/dd.$1"
  return $rc
}
klog() { $KLOG | tail -n 40 | tr '\n' '|'; }
op() {
  n=$1 cmd=$2; shift 2
  case "$cmd" in
    ping) answer $n ok ;;
    wait) attempt $n waitfor present "$@" ;;
    gone) attempt $n waitfor absent "$@" ;;
    read) attempt $n readop $n "$@" ;;
    write) attempt $n writeop $n "$@" ;;
    flush) attempt $n sync "$DEV/$1" ;;
    discard) attempt $n blkdiscard -o "$2" -l "$3" "$DEV/$1" ;;
    klog) attempt $n klog ;;
    *) answer $n fail "unknown command $cmd" ;;
  esac
}
answer 0 ok ready
while read -r line; do
  op $line &
done
"""

ANSWER = re.compile(r"AGENT (\d+) (ok|fail) ?(.*)")
# What a kernel prints when it broke (an oops, a BUG, a panic, a warning).
BROKEN = re.compile(r"Oops|BUG:|Kernel panic|general protection fault|WARNING: CPU|Call Trace")


class AgentError(BlkifError):
    """The agent is not there, or stopped answering."""


class ConsoleAgent:
    """The suite's end of :data:`AGENT`: a console's tty ``path`` (the pty
    xenconsoled made for the guest), opened raw so nothing is echoed back."""

    def __init__(self, path, log=None):
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self.fd)
        self.log = log  # a text file every line the guest printed goes to, or None
        self.closed = False
        self._answers = {}
        self._next = 1
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True, name="console-agent")
        self._reader.start()

    def _read(self):
        pending = b""
        while True:
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # EIO: the other end (the guest's console) went away
                chunk = b""
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace").strip("\r")
                if self.log is not None:
                    self.log.write(line + "\n")
                    self.log.flush()
                found = ANSWER.search(line)
                if found:
                    with self._cond:
                        self._answers[int(found[1])] = (found[2] == "ok", found[3].strip())
                        self._cond.notify_all()
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def call(self, command, *args, timeout=20.0):
        """Send one command; (ok, text) of its answer.  AgentError when none
        comes within ``timeout`` seconds (the operation hangs, or the guest)."""
        with self._cond:
            n, self._next = self._next, self._next + 1
        line = " ".join(str(a) for a in (n, command) + args)
        os.write(self.fd, line.encode() + b"\n")
        with self._cond:
            self._cond.wait_for(lambda: n in self._answers or self.closed, timeout)
            if n not in self._answers:
                raise AgentError("no answer to %r within %.0f s%s" % (
                    " ".join(line.split()[1:]), timeout,
                    " (the console closed)" if self.closed else ""))
            return self._answers.pop(n)

    def klog(self, timeout=20.0):
        """The kernel's messages since the last call, a list of lines."""
        ok, text = self.call("klog", timeout=timeout)
        return [line.strip() for line in text.split("|") if line.strip()] if ok else []

    def close(self):
        os.close(self.fd)
        self._reader.join(2)


class ConsoleFrontendUnderTest:
    """One case's frontend in a guest running the agent, and the suite's
    backend for it: what a case calls (see ``session.FrontendUnderTest``)."""

    def __init__(self, backend, agent, vdev, timeout=20.0, remake=None):
        self.backend, self.agent, self.vdev, self.timeout = backend, agent, vdev, timeout
        self.remake = remake  # removes the disk and adds it afresh: a new backend
        self.kernel = []  # the guest kernel's messages during the case
        self.hung = False  # an operation never answered (it may hold the disk for good)

    def attach(self, offer, disk=None, omit=(), options=None, connect=True):
        """Offer; the guest's frontend connects and its disk appears."""
        self.backend.offer(offer, disk, omit)
        with self.backend.connecting(connect):
            ok, text = self.wait_disk("wait")
        if not ok:
            raise Failed("the frontend did not attach: %s%s" % (text, self._kernel_says()))

    def reattach(self, offer, disk=None):
        """The backend closes, the disk is removed and added afresh (as a
        toolstack does: a frontend need not reconnect on its own once
        Closed), and the guest attaches to a new ``offer``."""
        self.backend.stop()
        self.backend.switch(XenbusState.Closed)
        self.backend.close()
        self.backend = self.remake()
        self.attach(offer, disk)

    def wait_disk(self, how):
        """The agent's ``wait`` (the disk is there and readable) or ``gone``."""
        return self._call(how, self.vdev, int(self.timeout), timeout=self.timeout + 15)

    def io(self, *ops, timeout=None):
        """Each op (as :func:`~.guest.guest_io` takes them) run in the guest in turn."""
        results = []
        for op in ops:
            args = {"read": ("offset", "length"), "write": ("offset", "length", "seed"),
                    "flush": (), "discard": ("offset", "length")}[op["op"]]
            ok, text = self._call(op["op"], self.vdev, *(op.get(a, 0) for a in args),
                                  timeout=timeout)
            if not ok:
                results.append({"ok": False, "error": text + self._kernel_says()})
            elif op["op"] == "read":
                results.append({"ok": True, "sha256": text})
            else:
                results.append({"ok": True})
        return results

    def state(self):
        return self.backend.frontend_state().name

    def alive(self):
        """Failed if the guest's kernel broke or the guest stopped answering."""
        self._call("ping", timeout=10)
        self.collect()
        broken = [line for line in self.kernel if BROKEN.search(line)]
        if broken:
            raise Failed("the guest's kernel broke: %s" % broken[0])

    def collect(self):
        """Add the kernel's new messages to :attr:`kernel`; they are returned."""
        lines = self.agent.klog()
        self.kernel += lines
        return lines

    def _kernel_says(self):
        lines = self.collect()
        return " (kernel: %s)" % "; ".join(lines[-3:]) if lines else ""

    def _call(self, command, *args, timeout=None):
        try:
            return self.agent.call(command, *args, timeout=timeout or self.timeout)
        except AgentError as exc:
            self.hung = True
            raise Failed("the guest hangs: %s" % exc) from None
