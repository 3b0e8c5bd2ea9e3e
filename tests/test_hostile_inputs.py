"""Inputs a job must refuse cleanly: config keys MLflow cannot record, tracking stores that cannot
be opened, an image folder holding a decompression bomb, and `resume=` of a deleted or unknown run.

Each integration test runs the job in-process (conftest.train_in_process: synthetic data unless
the test says otherwise, an SQLite store in the test's temporary folder, reported as `train.py`
reports it) and checks what a user sees: exit status 1, one `error:` line naming what to fix, no
Python traceback, and in MLflow no run created when the error comes before the start, and none
left RUNNING.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest
import torch
from conftest import (
    EXPERIMENT,
    FAST,
    check_ok,
    describe,
    experiment_runs,
    mlflow_client,
    train_in_process,
)
from mlflow.entities import ViewType
from PIL import Image
from test_faults import assert_clean_error

from kdresearch.data.image_folder import load_image_folder
from kdresearch.errors import KDResearchError

CPU = torch.device("cpu")


def assert_one_line_error(done, *phrases: str) -> str:
    """Exit status 1 and test_faults.assert_clean_error's checks (one `error:` line holding
    `phrases`, no traceback) on a finished job; returns the line."""
    assert done.returncode == 1, describe(done)
    return assert_clean_error(done, *phrases)


def every_run(client):
    """Every run of the job experiment, deleted ones included."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL, max_results=100)


# --- config keys and tracking stores: refused before any store is opened --------------------------

@pytest.mark.parametrize("key, phrases", [
    ("a$b", ("config key 'a$b' cannot be recorded in MLflow", "rename it")),
    ("x" * 251, ("is 251 characters", "at most 250", "shorten it")),
], ids=["forbidden-character", "251-characters"])
def test_config_key_mlflow_refuses_stops_before_any_run(store, key, phrases):
    done = train_in_process(store, *FAST, f"+{key}=1", fresh_store=True)
    assert_one_line_error(done, *phrases)
    assert not (store / "mlflow.db").exists()  # refused before the store was even opened


def test_unknown_tracking_scheme_is_one_line(store):
    done = train_in_process(store, *FAST, "tracking.uri=garbage://x")
    assert_one_line_error(done, "tracking.uri='garbage://x' is not a tracking store MLflow opens",
                          "sqlite:////abs/path/mlflow.db")
    assert not (store / "mlflow.db").exists()


def test_sqlite_store_under_a_regular_file_is_one_line(store, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    done = train_in_process(store, *FAST, f"tracking.uri=sqlite:///{blocker}/mlflow.db")
    assert_one_line_error(done, f"tracking.uri=sqlite:///{blocker}/mlflow.db", f"{blocker} is a file")
    assert blocker.read_text() == "not a folder"
    assert not (store / "mlflow.db").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder, so none is unwritable")
def test_sqlite_store_in_an_unwritable_folder_is_one_line(store, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        done = train_in_process(store, *FAST, f"tracking.uri=sqlite:///{locked}/stores/mlflow.db")
        assert_one_line_error(done, f"{locked} is not writable", "choose another store path")
        assert not (locked / "stores").exists()
    finally:
        locked.chmod(0o700)
    assert not (store / "mlflow.db").exists()


# --- an image folder holding a decompression bomb ----------------------------------------------

def png_declaring(path: Path, width: int, height: int) -> Path:
    """A valid 67-byte PNG whose header declares `width` x `height` pixels (its data holds one)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"  # after the 8-byte signature and the chunk's length
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # the IHDR chunk's CRC
    path.write_bytes(bytes(data))
    return path


def small_image_folder(root: Path) -> Path:
    """root/{train,test}/{cat,dog}/<n>.png: two classes of tiny valid images."""
    for split, count in (("train", 8), ("test", 4)):
        for label, name in enumerate(("cat", "dog")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for n in range(count):
                Image.new("RGB", (32, 32), (40 * n, 100 * label, 7)).save(folder / f"{n}.png")
    return root


def test_decompression_bomb_in_image_folder_stops_before_the_run(store, tmp_path):
    """40000x40000 pixels declared in 67 bytes: refused while the data is hashed, before any
    run starts and before anything is decoded."""
    root = small_image_folder(tmp_path / "images")
    bomb = png_declaring(root / "train" / "cat" / "9.png", 40000, 40000)
    done = train_in_process(store, *FAST, "data=image_folder", f"data.root={root}", "data.num_classes=2")
    assert_one_line_error(done, f"cannot read image {bomb}", "1600000000 pixels", "remove or shrink the file")
    assert every_run(mlflow_client(store)) == []


def test_image_failing_only_when_decoded_ends_the_run_failed_in_one_line(store, tmp_path, capfd):
    """A PNG cut short passes the header check while the data is hashed, then fails in a
    DataLoader worker during the first epoch: one line naming it (and no traceback from the
    worker process either), and the run ends FAILED."""
    root = small_image_folder(tmp_path / "images")
    cut = root / "train" / "dog" / "3.png"
    noise = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(noise.numpy()).save(cut)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    done = train_in_process(store, *FAST, "data=image_folder", f"data.root={root}", "data.num_classes=2")
    assert_one_line_error(done, f"cannot read image {cut} (image file is truncated")
    assert "Traceback" not in capfd.readouterr().err
    assert [run.info.status for run in every_run(mlflow_client(store))] == ["FAILED"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_oversized_images_are_refused_by_the_workers_too(tmp_path, recwarn, capfd, num_workers):
    """Above PIL's Image.MAX_IMAGE_PIXELS PIL only warns (up to twice that) and decodes the file:
    both sizes are refused, by the content hash and by the reads of a loader that never hashed
    (in DataLoader workers: one line, without the worker's traceback), with no
    DecompressionBombWarning printed."""
    root = small_image_folder(tmp_path / "images")
    for side, pixels in ((10000, "100000000 pixels"), (40000, "1600000000 pixels")):
        path = png_declaring(root / "train" / "cat" / "8.png", side, side)
        with pytest.raises(KDResearchError) as raised:
            load_image_folder(str(root), num_classes=2, num_workers=num_workers).fingerprint()
        assert str(raised.value).startswith(f"cannot read image {path}: Image size ({pixels})")
        with pytest.raises(KDResearchError) as raised:
            list(load_image_folder(str(root), num_classes=2, num_workers=num_workers).batches("train", 32, CPU))
        message = str(raised.value)
        assert message.startswith(f"cannot read image {path}: Image size ({pixels})"), message
        assert "\n" not in message and "Traceback" not in message
        path.unlink()
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    assert "DecompressionBombWarning" not in capfd.readouterr().err  # nor from a worker process
    data = load_image_folder(str(root), num_classes=2, num_workers=num_workers)
    assert data.fingerprint() and sum(len(labels) for _, labels, _ in data.batches("train", 32, CPU)) == 16


def test_file_that_is_no_image_stops_before_the_run(tmp_path):
    root = small_image_folder(tmp_path / "images")
    (root / "test" / "dog" / "5.png").write_bytes(b"<html>not an image</html>")
    with pytest.raises(KDResearchError, match=r"cannot read image .*5\.png \(not an image format PIL knows\)$"):
        load_image_folder(str(root), num_classes=2, num_workers=0).fingerprint()


# --- resume= of a run that was deleted or is not in the store ----------------------------------

RESUMED = (*FAST, "epochs=2")


@pytest.fixture(scope="module")
def deleted_job(tmp_path_factory):
    """(store, job folder, run id) of a finished 2-epoch job whose MLflow run was then deleted."""
    store = tmp_path_factory.mktemp("deleted") / "store"
    done = check_ok(train_in_process(store, *RESUMED))
    client = mlflow_client(store)
    (run,) = experiment_runs(client)
    client.delete_run(run.info.run_id)
    return store, done.run_dir, run.info.run_id


def assert_run_untouched(store: Path, run_id: str) -> None:
    """The deleted run is still deleted and FINISHED, and the store has no other run."""
    client = mlflow_client(store)
    run = client.get_run(run_id)
    assert (run.info.lifecycle_stage, run.info.status) == ("deleted", "FINISHED")
    assert [r.info.run_id for r in every_run(client)] == [run_id]


@pytest.mark.parametrize("form", ["job folder", "run id"])
def test_resume_of_a_deleted_run_says_how_to_restore_it(deleted_job, form):
    store, folder, run_id = deleted_job
    spec = str(folder) if form == "job folder" else run_id
    done = train_in_process(store, *RESUMED, f"resume={spec}")
    assert_one_line_error(done, f"resume={spec}: MLflow run {run_id} was deleted",
                          f"mlflow runs restore --run-id {run_id}", "without resume")
    assert_run_untouched(store, run_id)
    assert sorted(path.name for path in (folder / "checkpoints").iterdir()) == ["epoch_0001.pt", "epoch_0002.pt",
                                                                                 "final.pt"]


def test_resume_of_an_unknown_run_id_is_one_line(deleted_job):
    store, _, run_id = deleted_job
    unknown = "0123456789abcdef0123456789abcdef"
    done = train_in_process(store, *RESUMED, f"resume={unknown}")
    assert_one_line_error(done, f"resume={unknown} is neither a job folder nor an MLflow run id")
    assert_run_untouched(store, run_id)


def test_resume_of_a_job_folder_on_another_store_is_one_line(deleted_job, tmp_path):
    """The job folder's run is not in the store tracking.uri names now: say so instead of
    failing when the run is reopened."""
    _, folder, run_id = deleted_job
    other = tmp_path / "other"
    done = train_in_process(other, *RESUMED, f"resume={folder}")
    assert_one_line_error(done, f"resume={folder}: the job's MLflow run {run_id} is not in", str(other),
                          "give the tracking.uri the job was tracked in")
    assert every_run(mlflow_client(other)) == []
