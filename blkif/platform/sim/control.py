"""Starting and stopping the sim hypervisor: one call or one command.

``SimHypervisor(dir)`` is a context manager that runs the hypervisor as a
child process tied to us by a pipe (if we die, it sees the pipe close and
exits).  ``start(dir)`` runs it detached, recording its pid in DIR;
``stop(dir)`` sends SIGTERM, waits, then SIGKILLs, and removes the socket and
pid file even if the hypervisor was killed.  Memory is memfds, so nothing is
left in /dev/shm: the kernel frees a domain's memory when the last process
holding or mapping it lets go.
"""
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from blkif.platform.errors import PlatformUnavailable
from blkif.platform.sim import protocol

READY_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0


def _spawn(directory, detached):
    """Start ``python -m blkif.platform.sim run`` and wait until it serves."""
    os.makedirs(directory, exist_ok=True)
    ready_r, ready_w = os.pipe()
    args = [sys.executable, "-m", "blkif.platform.sim", "run", directory,
            "--ready-fd", str(ready_w)]
    pass_fds = [ready_w]
    watch_w = None
    if not detached:
        watch_r, watch_w = os.pipe()
        args += ["--watch-fd", str(watch_r)]
        pass_fds.append(watch_r)
    quiet = subprocess.DEVNULL if detached else None  # a detached one keeps no pipes
    proc = subprocess.Popen(args, pass_fds=pass_fds, start_new_session=detached,
                            stdin=subprocess.DEVNULL, stdout=quiet, stderr=quiet)
    os.close(ready_w)
    if not detached:
        os.close(watch_r)
    try:
        readable, _, _ = select.select([ready_r], [], [], READY_TIMEOUT)
        ok = bool(readable) and os.read(ready_r, 1) == b"R"
    finally:
        os.close(ready_r)
    if not ok:
        proc.kill()
        proc.wait()
        if watch_w is not None:
            os.close(watch_w)
        raise PlatformUnavailable("sim hypervisor did not start in %s" % directory)
    return proc, watch_w


def _terminate(pid, wait):
    """SIGTERM, a grace period, then SIGKILL; ``wait(timeout)`` says if it exited."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not wait(STOP_TIMEOUT):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        wait(STOP_TIMEOUT)


def _remove_files(directory):
    for name in (protocol.SOCKET_NAME, protocol.PID_NAME):
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass


class SimHypervisor:
    """A sim hypervisor for the lifetime of a ``with`` block (or start()/stop()).

    ``path`` is the directory to hand to ``open_platform("sim", path=...)``
    (or $BLKIF_SIM); without ``directory`` a temporary one is made and removed.
    """

    def __init__(self, directory=None):
        self._own_dir = directory is None
        self.path = directory or tempfile.mkdtemp(prefix="blkif-sim-")
        self.proc = None
        self._watch = None

    def start(self):
        self.proc, self._watch = _spawn(self.path, detached=False)
        return self

    @property
    def pid(self):
        return self.proc.pid

    def stop(self):
        if self.proc is None:
            return
        def wait(timeout):
            try:
                self.proc.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        _terminate(self.proc.pid, wait)
        os.close(self._watch)
        self.proc = None
        _remove_files(self.path)
        if self._own_dir:
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def start(directory):
    """Run a detached hypervisor serving ``directory``; returns its pid."""
    proc, _ = _spawn(directory, detached=True)
    with open(os.path.join(directory, protocol.PID_NAME), "w") as f:
        f.write("%d\n" % proc.pid)
    return proc.pid


def stop(directory):
    """Stop the hypervisor ``start`` left in ``directory``; True if one ran."""
    try:
        with open(os.path.join(directory, protocol.PID_NAME)) as f:
            pid = int(f.read())
    except (FileNotFoundError, ValueError):
        _remove_files(directory)
        return False
    def wait(timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not os.path.exists("/proc/%d" % pid) or _zombie(pid):
                return True
            time.sleep(0.02)
        return False
    _terminate(pid, wait)
    _remove_files(directory)
    return True


def _zombie(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
