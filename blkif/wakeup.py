"""A self-pipe: the way xenstore watch threads and signal handlers wake a
thread that sleeps in ``select``.

:meth:`Wakeup.wake` may be called from any thread or a signal handler; the
read end (:meth:`fileno`) stays readable until :meth:`drain`.
"""
import os


class Wakeup:
    def __init__(self):
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self):
        return self._r

    def wake(self, *_):
        """Make the read end readable; takes and ignores any arguments, so it
        serves as a watch callback or a signal handler as it is."""
        try:
            os.write(self._w, b"\0")
        except OSError:
            pass  # a wake-up is pending already, or we are closed

    def drain(self):
        """Consume every pending wake-up."""
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self):
        for fd in (self._r, self._w):
            os.close(fd)
        self._r = self._w = -1
