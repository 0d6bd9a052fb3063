"""Driving dom0 without a network: a command/result protocol over the lab share.

The work directory is shared read-write with dom0 over 9p and mounted there at
its own path, so every path under it means the same file on both sides.  dom0's
init (``DOM0_INIT``, run by the host's /bin/sh after switch_root) sets up
/proc, /dev, /run, then writes ``ctl/ready`` and polls ``ctl/cmd/``:

    host                                   dom0 agent
    write ctl/cmd/.NNNN.tmp, rename   ->   sees ctl/cmd/NNNN.sh, moves it to ctl/run/
      to ctl/cmd/NNNN.sh                   runs it: sh, stdin /dev/null, stdout+stderr
                                             to ctl/res/NNNN.out, killed after the
                                             "# timeout N" of its first line (rc 124)
    wait for ctl/res/NNNN.rc          <-   writes ctl/res/NNNN.rc (rename, so atomic)

Commands run one at a time, in name order.  A command that must outlive its
script (a daemon such as ``blkif serve``) starts it with ``setsid ... &`` and
its own log file under the work directory.  The host never trusts dom0 to
finish: each wait has a deadline and also gives up as soon as QEMU exits.
"""
import os
import time
from dataclasses import dataclass

from blkif.errors import BlkifError

# Seconds the host allows beyond a command's own timeout (agent polling, 9p).
AGENT_SLACK = 15


class Dom0Error(BlkifError):
    """dom0 did not answer in time, or QEMU went away."""


@dataclass
class Result:
    rc: int
    out: str
    seconds: float

    @property
    def ok(self):
        return self.rc == 0


def command_script(body, timeout):
    """The text of one command file: the timeout header, then ``body``."""
    if int(timeout) <= 0:
        raise ValueError("timeout must be positive")
    return "# timeout %d\nset -u\n%s\n" % (int(timeout), body.rstrip("\n"))


def dom0_init(workdir, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"):
    """Text of dom0's stage-2 init (the agent), run from ``workdir``."""
    return DOM0_INIT % {"workdir": workdir, "path": path, "agent": AGENT_LOOP}


DOM0_INIT = """#!/bin/sh
# blkif lab: dom0 init and command agent (generated; see blkif/lab/control.py).
export PATH=%(path)s HOME=/root LANG=C.UTF-8
W=%(workdir)s
C=$W/ctl
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/lock /run/xen /run/xen-hotplug /run/xenstored /var/log/xen /var/lib/xen
# devtmpfs has none of these; /etc/xen/scripts/block spins without /dev/stdin.
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mkdir -p $C/cmd $C/run $C/res
echo "LAB-DOM0 agent up at $(cut -d' ' -f1 /proc/uptime)s"
{ uname -r; cut -d' ' -f1 /proc/uptime; } > $C/ready.tmp && mv $C/ready.tmp $C/ready
""" + "%(agent)s"

# The agent's loop on its own, so tests can run it on the host against $C.
AGENT_LOOP = """while :; do
  for f in $C/cmd/*.sh; do
    [ -e "$f" ] || continue
    n=${f##*/}; n=${n%.sh}
    mv "$f" $C/run/$n.sh
    t=$(sed -n '1s/^# timeout \\([0-9]*\\)$/\\1/p' $C/run/$n.sh)
    timeout -k 5 ${t:-60} sh $C/run/$n.sh > $C/res/$n.out 2>&1 < /dev/null
    echo $? > $C/res/$n.rc.tmp
    mv $C/res/$n.rc.tmp $C/res/$n.rc
  done
  sleep 0.2
done
"""


class Dom0:
    """Host side of the protocol.  ``alive`` is a callable: False once QEMU exited."""

    def __init__(self, workdir, alive=lambda: True, poll=0.2):
        self.ctl = os.path.join(workdir, "ctl")
        self.alive = alive
        self.poll = poll
        self.seq = 0

    def reset(self):
        """Empty the control directories (before dom0 boots)."""
        for sub in ("cmd", "run", "res"):
            d = os.path.join(self.ctl, sub)
            os.makedirs(d, exist_ok=True)
            for name in os.listdir(d):
                os.unlink(os.path.join(d, name))
        ready = os.path.join(self.ctl, "ready")
        if os.path.exists(ready):
            os.unlink(ready)

    def wait_ready(self, timeout):
        """Wait for the agent; returns dom0's ``ready`` lines (kernel, uptime)."""
        ready = os.path.join(self.ctl, "ready")
        self._wait(lambda: os.path.exists(ready), timeout, "dom0 agent to start")
        with open(ready) as f:
            return f.read().split()

    def run(self, body, timeout=60):
        """Run ``body`` (sh) in dom0 and return its Result.

        Raises Dom0Error when no result arrives within ``timeout`` plus slack or
        QEMU exits; a command killed by its own timeout returns rc 124.
        """
        self.seq += 1
        name = "%04d" % self.seq
        tmp = os.path.join(self.ctl, "cmd", "." + name + ".tmp")
        with open(tmp, "w") as f:
            f.write(command_script(body, timeout))
        start = time.monotonic()
        os.rename(tmp, os.path.join(self.ctl, "cmd", name + ".sh"))
        rc_path = os.path.join(self.ctl, "res", name + ".rc")
        first = body.strip().splitlines()[0] if body.strip() else ""
        self._wait(lambda: os.path.exists(rc_path), timeout + AGENT_SLACK,
                   "dom0 command %s (%s)" % (name, first[:60]))
        with open(rc_path) as f:
            rc = int(f.read().strip() or 1)
        with open(os.path.join(self.ctl, "res", name + ".out"), errors="replace") as f:
            out = f.read()
        return Result(rc, out, time.monotonic() - start)

    def _wait(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while not predicate():
            if not self.alive():
                raise Dom0Error("QEMU exited while waiting for %s" % what)
            if time.monotonic() > deadline:
                raise Dom0Error("timed out after %ds waiting for %s" % (timeout, what))
            time.sleep(self.poll)
