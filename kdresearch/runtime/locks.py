"""File locks shared by the jobs of one machine, whose timeout is one line naming the lock file."""

from __future__ import annotations

from filelock import FileLock, Timeout

from kdresearch.errors import KDResearchError


class TimedLock(FileLock):
    """filelock's lock whose timeout becomes one line naming the lock file."""

    def acquire(self, *args, **kwargs):
        try:
            return super().acquire(*args, **kwargs)
        except Timeout:
            raise KDResearchError(
                f"waited {self.timeout:g} s for lock {self.lock_file}; another job holds it (or crashed "
                f"holding it on a file system without locks): retry, or delete the file if no job runs"
            ) from None
