"""Ctrl-C and SIGTERM stop a job at the next safe point, never in the middle of an MLflow write.

Python's default Ctrl-C raises KeyboardInterrupt wherever the program is, for example inside
SQLAlchemy while MLflow logs a metric; the run then cannot be marked KILLED. `install()` makes
both signals only set a flag, and the trainer calls `check()` between steps, where raising is
safe. A second signal stops at once. `held()` keeps Ctrl-C out of a short step that must not be cut in
two (starting a child process that must then be waited for).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

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


@contextmanager
def held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) while the block runs and deliver it, to whatever handles it, when the
    block ends; Python's default would raise KeyboardInterrupt between any two lines of the block.
    Only the main thread receives signals, so elsewhere this holds nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: arrived.append(signum))
    try:
        yield
    finally:
        # None: a handler not set from Python; Python's own is the nearest thing to put back.
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
        if arrived:
            signal.raise_signal(signal.SIGINT)
