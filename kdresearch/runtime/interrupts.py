"""Ctrl-C and SIGTERM stop a job at the next safe point, never in the middle of an MLflow write.

Python's default Ctrl-C raises KeyboardInterrupt wherever the program is, for example inside
SQLAlchemy while MLflow logs a metric; the run then cannot be marked KILLED. `install()` makes
both signals only set a flag, and the trainer calls `check()` between steps, where raising is
safe. A second signal stops at once.
"""

from __future__ import annotations

import signal
from typing import Optional

_requested: Optional[int] = None


def _handle(signum, frame) -> None:
    global _requested
    if _requested is not None:
        raise KeyboardInterrupt(f"signal {signum} (second)")
    _requested = signum


def install() -> None:
    """Route SIGINT and SIGTERM through the flag (call in the main thread of the job's process)."""
    try:
        signal.signal(signal.SIGINT, _handle)
        signal.signal(signal.SIGTERM, _handle)
    except ValueError:  # not the main thread (a launcher's worker thread): keep Python's defaults
        pass


def check() -> None:
    """Raise KeyboardInterrupt here if a stop was requested."""
    if _requested is not None:
        raise KeyboardInterrupt(f"signal {_requested}")


def exit_status() -> int:
    """The shell's convention for a process stopped by a signal: 128 + its number (SIGINT 130,
    SIGTERM 143), so a scheduler sees why the job ended."""
    return 128 + (_requested or signal.SIGINT)
