"""A pipe that wakes a selector loop: a thread, or signal.set_wakeup_fd, writes; the loop drains."""

from __future__ import annotations

import os
import threading


class WakePipe:
    """Both ends non-blocking: a full pipe already means "wake up", so a ring never blocks."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        # A thread may ring as the loop closes (an SSH pump reading its channel's end): after
        # close the number may already name another file, so ring and close never overlap.
        # Only threads ring (signals reach the pipe through set_wakeup_fd, in C), so a lock is safe.
        self._lock = threading.Lock()
        self._closed = False

    def ring(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self.write_fd, b"!")
            except BlockingIOError:
                pass

    def drain(self) -> bool:
        """Empty the pipe; whether it had rung."""
        rang = False
        try:
            while os.read(self.read_fd, 4096):
                rang = True
        except BlockingIOError:
            pass
        return rang

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self.read_fd)
            os.close(self.write_fd)
