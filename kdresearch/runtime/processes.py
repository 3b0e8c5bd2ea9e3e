"""Child processes: the environment a child Python process gets, and running one to its end.

Pipelines run each training job (and the speed benchmark's tutorial baseline) as its own process,
so that nothing one job sets in its interpreter reaches the next.
"""

from __future__ import annotations

import os
import subprocess
from typing import Sequence

from kdresearch.runtime import interrupts


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child Python process, with unbuffered output (its lines
    reach a log or a reader as they are written, in order with ours) and `extra` on top."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


def run_to_end(command: Sequence[str]) -> int:
    """Run `command` with `child_env()` (its output goes where ours goes) and return its exit status.

    Ctrl-C reaches the child too (it is in our process group); unlike `subprocess.run`, which
    kills the child a quarter of a second later, this waits until the child has finished
    stopping (a training job marks its MLflow run KILLED), then raises KeyboardInterrupt.
    """
    process = None
    try:
        # Ctrl-C while the child is being started would leave a running child that nobody waits for:
        # it is held until `process` is known (a child started meanwhile got it from the group too).
        with interrupts.held():
            process = subprocess.Popen(list(command), env=child_env())
        return process.wait()
    except KeyboardInterrupt:
        if process is not None:
            process.wait()
        raise
