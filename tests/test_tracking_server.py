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


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1:<free port> with an SQLite backend and a local artifact store in
    tmp_path; yields (uri, artifacts folder) and always stops the server."""
    port = free_port()
    artifacts = tmp_path / "artifacts"
    log_path = tmp_path / "server.log"
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{tmp_path / 'db'}", "--artifacts-destination", str(artifacts),
        "--workers", "1",
    ]
    env = dict(os.environ)
    # The server's job runner (huey consumers for GenAI evaluation jobs) is not used by
    # kdresearch; it starts several more processes that would compete for the 2 cores.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not healthy(uri):
            if process.poll() is not None:
                pytest.fail(f"mlflow server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after {SERVER_START_TIMEOUT} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield uri, artifacts
    finally:
        stop(process)


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
