"""The one file lock of the project, shared by the jobs of one machine (or of a shared file system
with working locks): the MLflow store's creation, training a shared teacher once, building a
teacher-output cache entry once.

A wait is cut into short slices with `interrupts.check()` between them, so Ctrl-C and SIGTERM stop
a waiting job as they stop a training one; it logs once that it waits, and after its timeout
(None: no limit) it stops with one line naming the lock file. The OS releases a lock when its
holder exits or is killed, so a dead holder never blocks the others.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Optional

from filelock import FileLock, Timeout

from kdresearch.errors import KDResearchError
from kdresearch.runtime import interrupts

log = logging.getLogger(__name__)

# The longest a wait goes without checking for Ctrl-C / SIGTERM.
POLL_SECONDS = 1.0


class InterruptibleLock:
    """An exclusive lock on the file `path`: `with InterruptibleLock(path, timeout):`, or
    `acquire()` then `release()`. `on_wait` is called once when the lock is taken by another job
    (default: an INFO line naming the file)."""

    def __init__(self, path: Path, timeout: Optional[float] = None,
                 on_wait: Optional[Callable[[], None]] = None):
        self.path = Path(path)
        self.timeout = timeout
        self.on_wait = on_wait or (lambda: log.info("waiting for lock %s, held by another job", self.path))
        self.lock = FileLock(str(self.path))

    def acquire(self) -> "InterruptibleLock":
        """Wait for the lock; KeyboardInterrupt on a stop request, KDResearchError after the timeout."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        waiting = False
        while True:
            interrupts.check()
            left = POLL_SECONDS if deadline is None else max(0.0, min(POLL_SECONDS, deadline - time.monotonic()))
            try:
                self.lock.acquire(timeout=left)
                return self
            except Timeout:
                if deadline is not None and time.monotonic() >= deadline:
                    raise KDResearchError(
                        f"waited {self.timeout:g} s for lock {self.path}; another job holds it (or crashed "
                        f"holding it on a file system without locks): retry, or delete the file if no job runs"
                    ) from None
                if not waiting:
                    waiting = True
                    self.on_wait()

    def release(self) -> None:
        self.lock.release()

    def __enter__(self) -> "InterruptibleLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
