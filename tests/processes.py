"""Real processes for the tests that need one (signals, kills, servers, torchrun, what `train.py`
itself prints): one environment, one way to run a command to its end, one background process with
its output in a log file, and one "wait for a condition while the process lives" loop.

Every process runs from the repository root unless told otherwise, with `PYTHONUNBUFFERED=1` (its
log shows each line as it is written) and without HYDRA_FULL_ERROR (users see Hydra's short error,
so tests do too).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Processes still running that the test which started them did not stop (conftest ends them).
_STARTED: list["Process"] = []


def process_env(one_thread: bool = False, **extra: str) -> dict[str, str]:
    """The environment of a test's subprocess. `one_thread` gives it one compute thread: the tests
    that run jobs side by side on 2 cores, and those comparing jobs bit for bit (same threads)."""
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    env["PYTHONUNBUFFERED"] = "1"
    if one_thread:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.update(extra)
    return env


def run_command(command: list[str], timeout: float = 600, one_thread: bool = False, cwd: Path = REPO_ROOT,
                env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run `command` to its end as a user would see it (from the repository root by default).

    Returns the CompletedProcess with `.output` (stdout + stderr) and `.seconds` (wall time)."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env or process_env(one_thread), capture_output=True, text=True,
                          timeout=timeout)
    done.seconds = time.perf_counter() - started
    done.output = done.stdout + done.stderr
    return done


def wait_until(done: Callable[[], bool], what: str, process: Optional["Process"] = None, timeout: float = 300,
               poll: float = 0.02) -> None:
    """Poll `done()` until it holds; fail (with the process's output) when `process` ends first or
    `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not done():
        if process is not None and process.poll() is not None:
            pytest.fail(f"the process ended before {what}:\n{process.describe()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f} s" + (f":\n{process.describe()}" if process else ""))
        time.sleep(poll)


class Process:
    """A background process whose stdout and stderr go to `log_path` (no pipe to fill).

    `new_session` starts it as its own process group (a server and its workers, a launcher and its
    jobs): `stop()` and `kill_group()` then reach all of them. A process still running when its
    test ends is killed (conftest), unless `outlives_test` (a module fixture's job)."""

    def __init__(self, command: list[str], log_path: Path, *, cwd: Path = REPO_ROOT, one_thread: bool = False,
                 env: Optional[dict] = None, new_session: bool = False, preexec_fn=None,
                 outlives_test: bool = False):
        self.args = [str(part) for part in command]
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.new_session, self.outlives_test = new_session, outlives_test
        self.seconds: Optional[float] = None
        self._log = open(self.log_path, "w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.args, cwd=cwd, env=env or process_env(one_thread), stdout=self._log,
                                     stderr=subprocess.STDOUT, preexec_fn=preexec_fn, start_new_session=new_session)
        self.pid = self.proc.pid
        _STARTED.append(self)

    @property
    def returncode(self) -> Optional[int]:
        return self.proc.returncode

    @property
    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def poll(self) -> Optional[int]:
        return self.proc.poll()

    def describe(self) -> str:
        return f"{' '.join(self.args)}\nexit {self.proc.returncode}\n{self.output[-5000:]}"

    def wait(self, timeout: float = 300) -> int:
        """The exit status; fails the test (after killing the process) when it runs longer."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the process did not end within {timeout:.0f} s:\n{self.describe()}")
        if self.seconds is None:
            self.seconds = time.monotonic() - self.started
        self._log.close()
        return code

    def check_ok(self, timeout: float = 300) -> "Process":
        assert self.wait(timeout) == 0, self.describe()
        return self

    def wait_until(self, done: Callable[[], bool], what: str, timeout: float = 300, poll: float = 0.02) -> None:
        wait_until(done, what, self, timeout, poll)

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def kill_group(self, signum: int = signal.SIGKILL) -> None:
        """`signum` to the whole process group (started with `new_session`)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL (its whole group with `new_session`) and reap it."""
        if self.new_session:
            self.kill_group()
        elif self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._log.close()

    def stop(self, grace: float = 30) -> None:
        """SIGTERM to its group, SIGKILL to whatever of the group is left after `grace` seconds (a
        server's leader may be gone while its workers still hold the group)."""
        if self.proc.poll() is None:
            self.kill_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
        self.kill()


def stop_leftovers(include_outliving: bool = False) -> None:
    """Kill (by their own pid or group) the processes a test left running."""
    for process in list(_STARTED):
        if process.outlives_test and not include_outliving:
            continue
        _STARTED.remove(process)
        if process.proc.poll() is None:
            process.kill()
        process._log.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def healthy(url: str) -> bool:
    """Whether an MLflow server answers OK on `url`/health."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200 and response.read().strip() == b"OK"
    except OSError:
        return False


def start_mlflow(subcommand: str, arguments: list[str], log_path: Path, port: int,
                 timeout: float = 180) -> tuple[Process, str]:
    """`python -m mlflow <subcommand> --host 127.0.0.1 --port <port> --workers 1 <arguments>` as its
    own process group, running in `log_path`'s folder; returns (process, base URL) once /health
    answers. The server's job runner (huey consumers for GenAI evaluation jobs) is off: kdresearch
    does not use it, and its processes would compete for the 2 cores. The first start on a fresh
    store takes ~20 s here, much more when the cores are busy: hence the generous `timeout`."""
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", subcommand, "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", *arguments]
    server = Process(command, log_path, cwd=Path(log_path).parent, new_session=True,
                     env=process_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    try:
        wait_until(lambda: healthy(url), f"answer on {url}/health", server, timeout, poll=0.5)
    except BaseException:
        server.stop()
        raise
    return server, url
