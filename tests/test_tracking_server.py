"""Shared tracking: `tracking.uri=http://host:port` logs to a real `mlflow server` process (SQLite
backend, proxied artifact store, bound to 127.0.0.1), and an unreachable server fails fast with
one line.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import FAST, REPO_ROOT, run_train, start_train, train_in_process
from processes import free_port, start_mlflow


class Server:
    """`mlflow server` on 127.0.0.1:`port` with an SQLite backend and a local artifact store in
    `folder`; start() and stop() may alternate (a restart keeps the store and the port)."""

    def __init__(self, folder: Path, port: int):
        self.folder, self.port = folder, port
        self.uri = f"http://127.0.0.1:{port}"
        self.artifacts = folder / "artifacts"
        self.process = None
        self.starts = 0

    def start(self) -> "Server":
        self.starts += 1
        self.process, _ = start_mlflow(
            "server", ["--backend-store-uri", f"sqlite:///{self.folder / 'db'}",
                       "--artifacts-destination", str(self.artifacts)],
            self.folder / f"server-{self.starts}.log", self.port)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(grace=20)


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


@pytest.mark.slow  # a server
def test_job_logs_to_tracking_server(tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    uri, artifacts = mlflow_server
    done = run_train(tmp_path, *FAST, f"tracking.uri={uri}", "tracking.experiment=team")
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
    done = train_in_process(tmp_path, *FAST, f"tracking.uri={uri}")
    assert done.returncode != 0
    assert done.seconds < 30, f"took {done.seconds:.1f} s"
    assert "Traceback" not in done.output, done.output[-4000:]
    lines = [line for line in done.output.splitlines() if uri in line]
    assert len(lines) == 1, done.output[-4000:]
    assert "unreachable" in lines[0]


# --- an outage of the server during a job ----------------------------------------------------------

OUTAGE_JOB = ("epochs=4", "data.limit_train=1024")


def steps(client, run_id: str, key: str = "test/acc") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.slow  # a server stopped and started again
def test_job_rides_out_a_server_restart(tmp_path, server):
    """The server dies after epoch 1 and comes back on the same store: training goes on, every
    metric and the final checkpoint land, the run FINISHES."""
    from mlflow.tracking import MlflowClient

    job = start_train(tmp_path, "job", *FAST, *OUTAGE_JOB, f"tracking.uri={server.uri}", "tracking.retry_minutes=5")
    first_epoch = tmp_path / "job" / "checkpoints" / "epoch_0001.pt"
    job.wait_until(first_epoch.exists, "epoch 1", poll=0.1)
    server.stop()
    outage = time.monotonic()
    job.wait_until(lambda: "is unreachable; training goes on" in job.output, "the outage warning", poll=0.1)
    last_epoch = tmp_path / "job" / "checkpoints" / "epoch_0004.pt"
    job.wait_until(last_epoch.exists, "the last epoch during the outage", poll=0.1)  # training did not wait
    server.start()
    print(f"server away {time.monotonic() - outage:.1f} s")
    assert job.wait(timeout=600) == 0, job.describe()
    output = job.output
    assert "is back after" in output and "Traceback" not in output

    client = MlflowClient(server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("kdresearch").experiment_id])
    assert run.info.status == "FINISHED"
    for key in ("test/acc", "train/loss", "lr"):
        assert steps(client, run.info.run_id, key) == [1, 2, 3, 4], key
    assert "checkpoints/final.pt" in {item.path for item in client.list_artifacts(run.info.run_id, "checkpoints")}


@pytest.mark.slow  # a server stopped and started again
def test_outage_past_the_bound_stops_the_job_and_resume_completes_the_run(tmp_path, server):
    from mlflow.tracking import MlflowClient

    job = start_train(tmp_path, "job", *FAST, *OUTAGE_JOB, f"tracking.uri={server.uri}",
                      "tracking.retry_minutes=0.05")
    first_epoch = tmp_path / "job" / "checkpoints" / "epoch_0001.pt"
    job.wait_until(first_epoch.exists, "epoch 1", poll=0.1)
    server.stop()
    assert job.wait(timeout=600) == 1
    output = job.output
    assert "Traceback" not in output, output[-4000:]
    (line,) = [line for line in output.splitlines() if "error:" in line]
    assert "unreachable for more than" in line and f"resume={tmp_path / 'job'}" in line
    kept = sorted((tmp_path / "job" / "checkpoints").glob("epoch_*.pt"))
    assert kept, "the checkpoints must survive"

    server.start()
    resumed = start_train(tmp_path, "resumed", *FAST, *OUTAGE_JOB, f"tracking.uri={server.uri}",
                          f"resume={tmp_path / 'job'}")
    assert resumed.wait(timeout=600) == 0, resumed.describe()
    client = MlflowClient(server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("kdresearch").experiment_id])
    assert run.info.status == "FINISHED"
    for key in ("test/acc", "train/loss", "first_layer_norm"):
        assert steps(client, run.info.run_id, key)[-4:] == [1, 2, 3, 4], key
