"""Shared tracking: `tracking.uri=http://host:port` logs to a real `mlflow server` process (SQLite
backend, proxied artifact store, bound to 127.0.0.1), and an unreachable server fails fast with
one line.
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

import pytest
from conftest import FAST, run_command

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = ("data=synthetic", *FAST)
SERVER_START_TIMEOUT = 180  # first start ~20-30 s here; much more when the 2 cores are busy


def free_port() -> int:
    """A port nothing listens on (the OS picks it; closed again before returning)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=5) as response:
            return response.status == 200 and response.read().strip() == b"OK"
    except OSError:
        return False


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (mlflow server runs uvicorn as a child), then SIGKILL."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # whatever of the group is left (uvicorn workers)
    process.wait(timeout=20)


class Server:
    """`mlflow server` on 127.0.0.1:`port` with an SQLite backend and a local artifact store in
    `folder`; start() and stop() may alternate (a restart keeps the store and the port)."""

    def __init__(self, folder: Path, port: int):
        self.folder, self.port = folder, port
        self.uri = f"http://127.0.0.1:{port}"
        self.artifacts = folder / "artifacts"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> "Server":
        self.starts += 1
        log_path = self.folder / f"server-{self.starts}.log"
        command = [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--backend-store-uri", f"sqlite:///{self.folder / 'db'}", "--artifacts-destination", str(self.artifacts),
            "--workers", "1",
        ]
        env = dict(os.environ)
        # The server's job runner (huey consumers for GenAI evaluation jobs) is not used by
        # kdresearch; it starts several more processes that would compete for the 2 cores.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(command, cwd=self.folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not healthy(self.uri):
            if self.process.poll() is not None:
                pytest.fail(f"mlflow server exited with {self.process.returncode}:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after {SERVER_START_TIMEOUT} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


@pytest.fixture
def server(tmp_path):
    """A started Server in tmp_path; always stopped afterwards."""
    running = Server(tmp_path, free_port())
    try:
        yield running.start()
    finally:
        running.stop()


@pytest.fixture
def mlflow_server(server):
    """(uri, artifacts folder) of a started server."""
    return server.uri, server.artifacts


def train(tmp_path: Path, *overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO_ROOT / "train.py"), f"hydra.run.dir={tmp_path / 'job'}",
               f"cache.dir={tmp_path / 'cache'}", *TINY, *overrides]
    return run_command(command, timeout)


def test_job_logs_to_tracking_server(tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    uri, artifacts = mlflow_server
    done = train(tmp_path, f"tracking.uri={uri}", "tracking.experiment=team")
    assert done.returncode == 0, done.output[-6000:]

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("team")
    assert experiment is not None
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied by the server
    assert f"view it at {uri}/#/experiments/{experiment.experiment_id}/runs/" in done.output
    runs = client.search_runs([experiment.experiment_id])
    assert [(run.info.run_name, run.info.status) for run in runs] == [("light-ce", "FINISHED")]
    run = runs[0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/acc")] == [1]

    listed = {item.path for item in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert "checkpoints/final.pt" in listed
    # The file went through the server into its artifact store, not into a local folder.
    stored = list(artifacts.rglob(f"{run.info.run_id}/**/checkpoints/final.pt"))
    assert len(stored) == 1 and stored[0].stat().st_size > 0
    assert not (REPO_ROOT / "mlruns" / experiment.experiment_id / run.info.run_id).exists()
    # And the server reads it back to anyone on the team.
    import torch

    downloaded = client.download_artifacts(run.info.run_id, "checkpoints/final.pt", str(tmp_path / "download"))
    checkpoint = torch.load(downloaded, map_location="cpu", weights_only=True)
    assert checkpoint["model_class"] == "LightNN"


def test_unreachable_server_fails_fast_with_one_line(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = train(tmp_path, f"tracking.uri={uri}", timeout=120)
    assert done.returncode != 0
    assert done.seconds < 30, f"took {done.seconds:.1f} s"
    assert "Traceback" not in done.output, done.output[-4000:]
    lines = [line for line in done.output.splitlines() if uri in line]
    assert len(lines) == 1, done.output[-4000:]
    assert "unreachable" in lines[0]


# --- an outage of the server during a job ----------------------------------------------------------

def start_job(tmp_path: Path, name: str, *overrides: str) -> tuple[subprocess.Popen, Path]:
    log_path = tmp_path / f"{name}.log"
    command = [sys.executable, str(REPO_ROOT / "train.py"), f"hydra.run.dir={tmp_path / name}",
               f"cache.dir={tmp_path / 'cache'}", *TINY, *OUTAGE_JOB, *overrides]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    with open(log_path, "w") as log:
        return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log_path


def wait_for(done, what: str, process: subprocess.Popen, log_path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert process.poll() is None, f"the job ended before {what}:\n{log_path.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s:\n{log_path.read_text()[-4000:]}"
        time.sleep(0.1)


OUTAGE_JOB = ("epochs=4", "data.limit_train=1024")


def steps(client, run_id: str, key: str = "test/acc") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_job_rides_out_a_server_restart(tmp_path, server):
    """The server dies after epoch 1 and comes back on the same store: training goes on, every
    metric and the final checkpoint land, the run FINISHES."""
    from mlflow.tracking import MlflowClient

    job, log_path = start_job(tmp_path, "job", f"tracking.uri={server.uri}", "tracking.retry_minutes=5")
    first_epoch = tmp_path / "job" / "checkpoints" / "epoch_0001.pt"
    wait_for(first_epoch.exists, "epoch 1", job, log_path)
    server.stop()
    outage = time.monotonic()
    wait_for(lambda: "is unreachable; training goes on" in log_path.read_text(), "the outage warning", job, log_path)
    last_epoch = tmp_path / "job" / "checkpoints" / "epoch_0004.pt"
    wait_for(last_epoch.exists, "the last epoch during the outage", job, log_path)  # training did not wait
    server.start()
    print(f"server away {time.monotonic() - outage:.1f} s")
    assert job.wait(timeout=600) == 0, log_path.read_text()[-4000:]
    output = log_path.read_text()
    assert "is back after" in output and "Traceback" not in output

    client = MlflowClient(server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("kdresearch").experiment_id])
    assert run.info.status == "FINISHED"
    for key in ("test/acc", "train/loss", "lr"):
        assert steps(client, run.info.run_id, key) == [1, 2, 3, 4], key
    assert "checkpoints/final.pt" in {item.path for item in client.list_artifacts(run.info.run_id, "checkpoints")}


def test_outage_past_the_bound_stops_the_job_and_resume_completes_the_run(tmp_path, server):
    from mlflow.tracking import MlflowClient

    job, log_path = start_job(tmp_path, "job", f"tracking.uri={server.uri}", "tracking.retry_minutes=0.05")
    first_epoch = tmp_path / "job" / "checkpoints" / "epoch_0001.pt"
    wait_for(first_epoch.exists, "epoch 1", job, log_path)
    server.stop()
    assert job.wait(timeout=600) == 1
    output = log_path.read_text()
    assert "Traceback" not in output, output[-4000:]
    (line,) = [line for line in output.splitlines() if "error:" in line]
    assert "unreachable for more than" in line and f"resume={tmp_path / 'job'}" in line
    kept = sorted((tmp_path / "job" / "checkpoints").glob("epoch_*.pt"))
    assert kept, "the checkpoints must survive"

    server.start()
    resumed, resumed_log = start_job(tmp_path, "resumed", f"tracking.uri={server.uri}", f"resume={tmp_path / 'job'}")
    assert resumed.wait(timeout=600) == 0, resumed_log.read_text()[-4000:]
    client = MlflowClient(server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("kdresearch").experiment_id])
    assert run.info.status == "FINISHED"
    for key in ("test/acc", "train/loss", "first_layer_norm"):
        assert steps(client, run.info.run_id, key)[-4:] == [1, 2, 3, 4], key
