"""scripts/export.py and the bundle it writes (kdresearch.sharing): every file there, digests that
match, the run's own weights and metric histories, the model card's numbers; a bundle as
`teacher.checkpoint=` with its provenance read back from MLflow; a changed byte refused in one
line before a run exists; the refusals that leave OUT_DIR as it was."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import FAST, compose_config, experiment_runs, load_script, mlflow_client, tracking_uri, train_in_process
from mlflow.entities import Metric
from safetensors.torch import load_file, save_file

from kdresearch.config.groups import build
from kdresearch.errors import KDResearchError
from kdresearch.sharing import bundle
from kdresearch.sharing.export import metric_rows
from kdresearch.teacher.provenance import weight_digest
from kdresearch.tracking import names
from kdresearch.training.checkpoint import load_checkpoint, model_state
from kdresearch.training.weights import from_path

pytestmark = pytest.mark.usefixtures("one_compute_thread")

TINY = (*FAST, "data=synthetic", "device=cpu")
CE_FILES = {"README.md", "weights.safetensors", "config.yaml", "command.txt", "metrics.csv", "lineage.json",
            "SHA256SUMS"}


export_script = load_script("export")


def export(store: Path, run_id: str, out: Path, *options: str, capsys=None) -> tuple[int, str, str]:
    """scripts/export.py RUN_ID OUT --tracking-uri <store> in this process: exit status, stdout, stderr."""
    status = export_script.main([run_id, str(out), "--tracking-uri", tracking_uri(store), *options])
    captured = capsys.readouterr() if capsys is not None else None
    return status, captured.out if captured else "", captured.err if captured else ""


@dataclass
class Exported:
    store: Path
    run_id: str
    job_dir: Path
    bundle: Path


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Exported:
    """A DeepNN trained 2 tiny epochs with a validation split (the default teacher's architecture),
    exported by scripts/export.py."""
    store = tmp_path_factory.mktemp("export") / "store"
    job = train_in_process(store, *TINY, "model=deep", "epochs=2", "data.val_size=64")
    assert job.returncode == 0, job.stdout
    out = store.parent / "bundles" / "deep"
    status = export_script.main([job.run_id, str(out), "--tracking-uri", tracking_uri(store)])
    assert status == 0
    return Exported(store, job.run_id, job.run_dir, out)


def manifest(folder: Path) -> dict[str, str]:
    """SHA256SUMS read as sha256sum writes it: {name: digest}."""
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    return {line[66:]: line[:64] for line in lines}


# --- the bundle -------------------------------------------------------------------------------------

def test_export_writes_every_file_and_their_digests(exported):
    client = mlflow_client(exported.store)
    run = client.get_run(exported.run_id)
    files = {path.name for path in exported.bundle.iterdir()}
    dirty = run.data.tags.get("git.dirty") == "true"  # a dirty checkout's diff comes along
    assert files == CE_FILES | ({"git_diff.patch"} if dirty else set())  # no teacher.json: trained alone
    listed = manifest(exported.bundle)
    assert set(listed) == files - {"SHA256SUMS"}
    for name, digest in listed.items():
        assert hashlib.sha256((exported.bundle / name).read_bytes()).hexdigest() == digest, name
    assert not [path for path in exported.bundle.parent.iterdir() if path.name.startswith(".")]  # no temp folder left
    if shutil.which("sha256sum"):  # the check another lab runs
        checked = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=exported.bundle, capture_output=True, text=True)
        assert checked.returncode == 0 and checked.stdout.count(": OK") == len(listed), checked.stdout


def test_the_bundle_holds_the_runs_weights_config_command_metrics_and_lineage(exported):
    client = mlflow_client(exported.store)
    run = client.get_run(exported.run_id)
    folder = exported.bundle

    final = load_checkpoint(exported.job_dir / "checkpoints" / "final.pt")
    weights = load_file(folder / "weights.safetensors")
    assert weights.keys() == model_state(final).keys()
    for key, tensor in model_state(final).items():
        assert torch.equal(weights[key], tensor), key
    loaded = from_path(folder)
    assert loaded.run_id == exported.run_id and loaded.bundle == str(folder.resolve())
    assert (loaded.checkpoint["model_class"], loaded.checkpoint["num_classes"], loaded.checkpoint["epoch"]) == (
        "DeepNN", 10, 2)
    assert loaded.checkpoint["metrics"]["test/acc"] == run.data.metrics["test/acc"]

    assert (folder / "config.yaml").read_text() == final["config"]
    assert (folder / "command.txt").read_text().strip() == f"python {run.data.tags['mlflow.source.name']} " \
                                                            f"{run.data.tags[names.OVERRIDES]}"

    with open(folder / "metrics.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [int(row["step"]) for row in rows] == [0, 1, 2]  # first_layer_norm at init, then the epochs
    assert set(rows[0]) == {"step", *run.data.metrics}
    for key in run.data.metrics:
        written = [(int(row["step"]), float(row[key])) for row in rows if row[key] != ""]
        assert written == [(m.step, m.value) for m in client.get_metric_history(exported.run_id, key)], key

    lineage = json.loads((folder / "lineage.json").read_text())
    assert lineage["run_id"] == exported.run_id and lineage["status"] == "FINISHED"
    for key in ("version.torch", "version.mlflow", "mlflow.source.git.commit", "git.dirty"):
        assert lineage.get(key) == run.data.tags.get(key), key


def test_the_model_card_states_the_runs_accuracies_and_setup(exported):
    metrics = mlflow_client(exported.store).get_run(exported.run_id).data.metrics
    card = (exported.bundle / "README.md").read_text()
    assert f"| test, final epoch (2) | {metrics['test/acc']:.2f} % |" in card
    best = int(metrics["best/epoch"])
    assert f"| validation, best epoch (epoch {best}) | {metrics['best/val_acc']:.2f} % |" in card
    assert f"| test, best epoch on validation (epoch {best}) | {metrics['best/test_acc']:.2f} % |" in card
    for row in ("| model | deep |", "| teacher | none (trained without a teacher) |", "| loss | ce |",
                "| seed | 42 |", "| epochs | 2 trained of 2 |", "| data | synthetic (fingerprint"):
        assert row in card, row
    assert "teacher=deep teacher.checkpoint=path/to/deep" in card and "sha256sum -c SHA256SUMS" in card


# --- a bundle as the teacher ----------------------------------------------------------------------

def test_a_bundle_teaches_a_student_whose_provenance_names_it(exported, tmp_path):
    job = train_in_process(exported.store, *TINY, "loss=kd", f"teacher.checkpoint={exported.bundle}")
    assert job.returncode == 0, job.stdout
    client = mlflow_client(exported.store)
    student = client.get_run(job.run_id)
    assert student.info.status == "FINISHED" and "test/acc" in student.data.metrics
    tags = student.data.tags
    teacher = build(compose_config("loss=kd").teacher.model, "teacher.model")
    teacher.load_state_dict(load_checkpoint(exported.job_dir / "checkpoints" / "final.pt")["model"])
    weights_file = exported.bundle / "weights.safetensors"
    assert tags[names.TEACHER_BUNDLE] == str(exported.bundle.resolve())
    assert tags[names.TEACHER_RUN_ID] == exported.run_id  # the run it was exported from
    assert tags[names.TEACHER_FILE] == str(weights_file.resolve())
    assert tags[names.TEACHER_FILE_SHA256] == manifest(exported.bundle)["weights.safetensors"]
    assert tags[names.TEACHER_DIGEST] == weight_digest(teacher)
    claimed = client.get_run(exported.run_id).data.metrics["test/acc"]
    assert tags[names.TEACHER_CLAIMED_ACC] == f"{claimed:.2f}" == tags[names.TEACHER_TEST_ACC]  # same data

    # the student exported in turn: its teacher's provenance travels with it
    out = tmp_path / "student"
    assert export(exported.store, job.run_id, out)[0] == 0
    provenance = json.loads((out / "teacher.json").read_text())
    assert provenance["teacher_model"] == "deep"
    assert provenance[names.TEACHER_BUNDLE] == str(exported.bundle.resolve())
    assert provenance[names.TEACHER_RUN_ID] == exported.run_id
    card = (out / "README.md").read_text()
    assert f"| teacher | deep (bundle `{exported.bundle.resolve()}`, run `{exported.run_id}`" in card
    assert f"| teacher, test (measured before distillation) | {tags[names.TEACHER_TEST_ACC]} % |" in card


@pytest.mark.parametrize("changed", ["weights.safetensors", "config.yaml"])
def test_a_changed_byte_in_a_bundle_is_refused_in_one_line_before_a_run_starts(exported, tmp_path, changed):
    copy = tmp_path / "bundle"
    shutil.copytree(exported.bundle, copy)
    content = bytearray((copy / changed).read_bytes())
    content[len(content) // 2] ^= 0x01  # one bit of one byte
    (copy / changed).write_bytes(bytes(content))
    client = mlflow_client(exported.store)
    before = len(experiment_runs(client))

    job = train_in_process(exported.store, *TINY, "loss=kd", f"teacher.checkpoint={copy}")
    assert job.returncode == 1
    errors = [line for line in job.stdout.splitlines() if "error:" in line]
    assert len(errors) == 1, job.stdout
    assert errors[0].endswith(f"error: teacher checkpoint bundle {copy.resolve()}: {changed} does not match its "
                              f"sha256 in SHA256SUMS (changed or damaged since the export); refusing the bundle")
    assert "epoch 1" not in job.stdout  # refused before training
    assert len(experiment_runs(client)) == before  # no run opened, so none left RUNNING
    assert not experiment_runs(client, filter_string="attributes.status = 'RUNNING'")


def test_a_bundles_weights_file_named_alone_is_checked_as_its_bundle_and_a_loose_one_is_read(exported, tmp_path):
    assert from_path(exported.bundle / "weights.safetensors").bundle == str(exported.bundle.resolve())
    loose = tmp_path / "weights.safetensors"  # copied out of its bundle: no manifest to check against
    shutil.copy(exported.bundle / "weights.safetensors", loose)
    source = from_path(loose)
    assert source.bundle is None and source.run_id == exported.run_id and source.label == str(loose.resolve())
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))  # a file from elsewhere: no header facts
    plain = from_path(tmp_path / "plain.safetensors").checkpoint
    assert set(plain) == {"model"} and torch.equal(plain["model"]["w"], torch.zeros(2))
    (tmp_path / "cut.safetensors").write_bytes((exported.bundle / "weights.safetensors").read_bytes()[:100])
    with pytest.raises(KDResearchError, match=r"cut\.safetensors is truncated or corrupt"):
        from_path(tmp_path / "cut.safetensors")


# --- the manifest -----------------------------------------------------------------------------------

def test_a_manifest_must_list_the_weights_every_listed_file_and_nothing_outside(tmp_path):
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"weights")
    (folder / "notes.txt").write_text("notes")
    bundle.write_manifest(folder)
    assert set(bundle.verify_manifest(folder)) == {"weights.safetensors", "notes.txt"}

    (folder / "notes.txt").unlink()
    with pytest.raises(KDResearchError, match=r": notes\.txt is listed in SHA256SUMS but missing$"):
        bundle.verify_manifest(folder)
    digest = hashlib.sha256(b"weights").hexdigest()
    for text, refusal in ((f"{digest}  notes.txt\n", r"does not list weights\.safetensors"),
                          (f"{digest}  ../weights.safetensors\n", r"line 1 names '\.\./weights\.safetensors', outside"),
                          ("not a digest  weights.safetensors\n", r"line 1 is not '<sha256>  <file>'")):
        (folder / "SHA256SUMS").write_text(text)
        with pytest.raises(KDResearchError, match=refusal):
            bundle.verify_manifest(folder)
    (folder / "SHA256SUMS").write_text(f"{digest} *weights.safetensors\n")  # sha256sum's binary mode
    assert bundle.verify_manifest(folder) == {"weights.safetensors": digest}


def test_metric_rows_keep_one_row_per_step_and_the_value_logged_last():
    histories = {"test/acc": [Metric("test/acc", 20.0, 2, 2), Metric("test/acc", 10.0, 1, 1),
                              Metric("test/acc", 25.0, 3, 2)],  # step 2 logged again later
                 "lr": [Metric("lr", 0.1, 1, 1)]}
    columns, rows = metric_rows(histories)
    assert columns == ["step", "lr", "test/acc"]
    assert rows == [{"step": 1, "lr": 0.1, "test/acc": 10.0}, {"step": 2, "test/acc": 25.0}]


# --- refusals ---------------------------------------------------------------------------------------

def test_export_refuses_an_unknown_run_and_a_run_without_a_final_checkpoint_leaving_nothing(exported, tmp_path,
                                                                                             capsys):
    out = tmp_path / "exports" / "bundle"
    status, _, err = export(exported.store, "0123456789abcdef", out, capsys=capsys)
    assert status == 1 and err.startswith("error: MLflow run 0123456789abcdef is not in ") and err.count("\n") == 1

    client = mlflow_client(exported.store)
    unfinished = client.create_run(client.get_experiment_by_name("kdresearch").experiment_id).info.run_id
    status, _, err = export(exported.store, unfinished, out, capsys=capsys)
    assert status == 1 and err.count("\n") == 1
    assert err.startswith(f"error: MLflow run {unfinished} has no final checkpoint checkpoints/final.pt"), err
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_export_replaces_an_earlier_bundle_only_when_forced_and_never_a_folder_of_other_files(exported, tmp_path,
                                                                                                capsys):
    out = tmp_path / "bundle"
    shutil.copytree(exported.bundle, out)
    (out / "notes.txt").write_text("mine")
    status, _, err = export(exported.store, exported.run_id, out, capsys=capsys)
    assert status == 1 and err == f"error: {out} holds a bundle already; give --force to replace it, or choose " \
                                  f"another folder\n"
    assert (out / "notes.txt").is_file()

    status, printed, _ = export(exported.store, exported.run_id, out, "--force", capsys=capsys)
    assert status == 0 and f"exported MLflow run {exported.run_id} (deep-ce) to {out}" in printed
    assert not (out / "notes.txt").exists()
    # the same run gives the same files, but for the card, which names its own folder
    same = {name: digest for name, digest in manifest(out).items() if name != "README.md"}
    assert same == {name: digest for name, digest in manifest(exported.bundle).items() if name != "README.md"}
    assert [path.name for path in tmp_path.iterdir()] == ["bundle"]  # the replaced folder is gone

    others = tmp_path / "others"
    others.mkdir()
    (others / "mine.txt").write_text("keep me")
    for options in ((), ("--force",)):
        status, _, err = export(exported.store, exported.run_id, others, *options, capsys=capsys)
        assert status == 1 and err == f"error: {others} is not empty and holds no bundle; choose another folder " \
                                      f"(--force replaces only an earlier export)\n"
        assert [path.name for path in others.iterdir()] == ["mine.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(exported.store, exported.run_id, empty)[0] == 0 and (empty / "SHA256SUMS").is_file()


def test_export_help_describes_the_bundle(capsys):
    with pytest.raises(SystemExit) as done:
        export_script.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for word in ("RUN_ID", "OUT_DIR", "--force", "--tracking-uri", "SHA256SUMS", "teacher.checkpoint=OUT_DIR"):
        assert word in text, word
