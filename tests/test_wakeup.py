"""The self-pipe that wakes a selecting thread: from another thread and from
a signal handler, coalesced, drained."""
import os
import selectors
import signal
import threading

from blkif.wakeup import Wakeup


def test_wake_from_a_thread_and_a_signal_then_drain():
    wakeup = Wakeup()
    sel = selectors.DefaultSelector()
    sel.register(wakeup.fileno(), selectors.EVENT_READ)
    assert sel.select(0) == []
    threading.Thread(target=wakeup.wake, args=("event",)).start()
    assert sel.select(5)
    wakeup.drain()
    assert sel.select(0) == []
    old = signal.signal(signal.SIGUSR1, wakeup.wake)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert sel.select(5)
    finally:
        signal.signal(signal.SIGUSR1, old)
    for _ in range(100000):  # far more than the pipe holds: never blocks
        wakeup.wake()
    wakeup.drain()
    assert sel.select(0) == []
    sel.close()
    wakeup.close()
    wakeup.wake()  # after close: a no-op, not an error
