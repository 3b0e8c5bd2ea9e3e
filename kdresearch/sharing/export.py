"""A run exported as a bundle (kdresearch.sharing.bundle: the files and what each holds), what
`scripts/export.py RUN_ID OUT_DIR` does.

The bundle is written into a hidden folder beside OUT_DIR and renamed into place once complete,
so a refusal or a failure part-way (an unknown run, a run without a final checkpoint, a full
disk, Ctrl-C) leaves OUT_DIR as it was. An OUT_DIR that holds an earlier bundle is replaced
only with `force`; one that holds other files never is.

What goes in comes from the run as MLflow recorded it: the final weights from its artifact
`checkpoints/final.pt` (read by the one loader, kdresearch.training.weights), the config from its
artifact `config/config.yaml`, the command from its tags `mlflow.source.name` and `overrides`, the
metrics from their full histories, the teacher's provenance and the lineage from its tags.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping, Optional

from kdresearch.errors import KDResearchError, first_line
from kdresearch.layout import FINAL_CHECKPOINT
from kdresearch.sharing import bundle
from kdresearch.sharing.model_card import model_card
from kdresearch.teacher.provider import AUTOMATIC
from kdresearch.tracking import names
from kdresearch.tracking.lineage import recorded_lineage
from kdresearch.training.checkpoint import model_state
from kdresearch.training.weights import from_run

CONFIG_ARTIFACT = "config/config.yaml"  # what kdresearch.training.job logs at a run's start
GIT_DIFF_ARTIFACT = "lineage/git_diff.patch"  # what kdresearch.tracking.store logs for a dirty checkout
SYSTEM_PREFIX = "system/"  # MLflow's CPU / memory / GPU samples: their steps count samples, not epochs


@dataclass(frozen=True)
class Exported:
    """A bundle written: where, from which run, and its files (SHA256SUMS last)."""

    folder: Path
    run_id: str
    run_name: str
    model: str
    files: tuple[str, ...]


def export_run(tracker, run_id: str, out_dir: Path, force: bool = False) -> Exported:
    """Write the bundle of MLflow run `run_id` (in `tracker`'s store) to `out_dir`; refuse in one
    line an `out_dir` that holds anything (an earlier bundle: unless `force`), an unknown run, or one
    without a final checkpoint, before anything is written."""
    out_dir = Path(out_dir).expanduser().absolute()
    check_destination(out_dir, force)
    run = _run(tracker, run_id)
    source = from_run(tracker, run_id)
    staging = _beside(out_dir, "partial")
    try:
        write_weights(source.checkpoint, run_id, staging / bundle.WEIGHTS_FILE)
        _write_config(tracker, run_id, source.checkpoint, staging / bundle.CONFIG_FILE)
        (staging / bundle.COMMAND_FILE).write_text(command_line(run.data.tags) + "\n", encoding="utf-8")
        _write_metrics(tracker.client, run_id, run.data.metrics, staging)
        teacher = teacher_provenance(run.data.params, run.data.tags)
        if teacher:
            _write_json(teacher, staging / bundle.TEACHER_FILE)
        _write_json(lineage_record(tracker.client, run), staging / bundle.LINEAGE_FILE)
        if run.data.tags.get("git.dirty") == "true":
            _copy_artifact(tracker, run_id, GIT_DIFF_ARTIFACT, staging / bundle.GIT_DIFF_FILE)
        card = model_card(run, source.epoch, out_dir.name)
        (staging / bundle.MODEL_CARD).write_text(card, encoding="utf-8")
        bundle.write_manifest(staging)
        files = tuple(sorted(path.name for path in staging.iterdir() if path.name != bundle.MANIFEST))
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Exported(out_dir, run_id, run.info.run_name or run_id, run.data.tags.get(names.MODEL, ""),
                    (*files, bundle.MANIFEST))


def check_destination(out_dir: Path, force: bool) -> None:
    """Refuse a destination that is a file, a folder holding an earlier bundle unless `force`, or
    a folder holding anything else: --force deletes the folder it replaces, so a mistyped path
    must not cost a folder of other files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise KDResearchError(f"{out_dir} is a file; name a folder for the bundle")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not bundle.is_bundle(out_dir):
        raise KDResearchError(f"{out_dir} is not empty and holds no bundle; choose another folder "
                              f"(--force replaces only an earlier export)")
    if not force:
        raise KDResearchError(f"{out_dir} holds a bundle already; give --force to replace it, or choose another folder")


def _run(tracker, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return tracker.client.get_run(run_id)
    except MlflowException as error:
        raise KDResearchError(f"MLflow run {run_id} is not in {tracker.uri} ({first_line(error)})") from None


def _beside(out_dir: Path, what: str) -> Path:
    """A new hidden folder next to `out_dir` (same file system: renames between them are atomic),
    made with the user's umask, as the bundle's own folder will be."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    folder = out_dir.parent / f".{out_dir.name}.{os.getpid()}-{secrets.token_hex(4)}.{what}"
    folder.mkdir()
    return folder


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished bundle to `out_dir`; a folder already there (empty, or replaced with
    --force) is moved aside first and deleted once the new bundle is in place."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    replaced = _beside(out_dir, "replaced")
    os.replace(out_dir, replaced / out_dir.name)
    try:
        os.replace(staging, out_dir)
    except BaseException:
        os.replace(replaced / out_dir.name, out_dir)  # put the old one back
        raise
    finally:
        shutil.rmtree(replaced, ignore_errors=True)


# --- the files ------------------------------------------------------------------------------------

def write_weights(checkpoint: dict, run_id: str, path: Path) -> None:
    """The checkpoint's model weights as safetensors, with the header metadata the loader reads
    (bundle.META_KEY); the same checkpoint gives the same bytes."""
    import torch
    from safetensors.torch import save

    state = model_state(checkpoint)
    odd = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if odd:
        raise KDResearchError(f"run {run_id}'s final checkpoint holds weights that are not tensors ({odd[0]}); "
                              f"safetensors stores tensors only")
    # Copies: safetensors refuses tensors that share memory (tied weights), and needs contiguous ones.
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in state.items()}
    metrics = checkpoint.get("metrics") if isinstance(checkpoint.get("metrics"), dict) else {}
    facts = {bundle.META_FORMAT: bundle.WEIGHTS_FORMAT, bundle.META_RUN_ID: run_id,
             bundle.META_MODEL_CLASS: checkpoint.get("model_class"),
             bundle.META_NUM_CLASSES: checkpoint.get("num_classes"),
             bundle.META_EPOCH: checkpoint.get("epoch"), bundle.META_TEST_ACC: metrics.get("test/acc")}
    metadata = {bundle.META_KEY: json.dumps({key: value for key, value in facts.items() if value is not None},
                                            sort_keys=True)}
    path.write_bytes(save(tensors, metadata=metadata))  # save_file would make it readable by its owner alone


def _write_config(tracker, run_id: str, checkpoint: dict, path: Path) -> None:
    """The run's logged config; the same YAML its checkpoint keeps for a run that logged none."""
    from mlflow.exceptions import MlflowException

    try:
        _copy_artifact(tracker, run_id, CONFIG_ARTIFACT, path)
    except (MlflowException, OSError):
        if not isinstance(checkpoint.get("config"), str):
            raise KDResearchError(f"run {run_id} holds no {CONFIG_ARTIFACT} and its {FINAL_CHECKPOINT} "
                                  f"no config") from None
        path.write_text(checkpoint["config"], encoding="utf-8")


def _copy_artifact(tracker, run_id: str, artifact: str, path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="kdresearch-export-") as folder:
        shutil.copyfile(tracker.download_artifact(run_id, artifact, Path(folder)), path)


def command_line(tags: Mapping[str, str]) -> str:
    """The command that started the run: its entry point and Hydra overrides as recorded (the
    overrides tag joins them with spaces, so one that held a space reads split here: config.yaml
    is the exact record)."""
    overrides = tags.get(names.OVERRIDES, "")
    if overrides == AUTOMATIC:
        return ("# trained automatically as the teacher of a student job, by no command of its own; "
                "config.yaml is its whole config")
    return " ".join(part for part in ("python", tags.get("mlflow.source.name", "train.py"), overrides) if part)


def metric_rows(histories: Mapping[str, Iterable]) -> tuple[list[str], list[dict]]:
    """Every metric history ({key: MLflow Metric objects}) as one row per step: the column names
    (step, then the keys sorted) and the rows, oldest step first. A step logged twice under one key
    (an evaluation repeated) keeps the value logged last."""
    rows: dict[int, dict] = {}
    for key in sorted(histories):
        for metric in sorted(histories[key], key=lambda metric: (metric.step, metric.timestamp)):
            rows.setdefault(metric.step, {"step": metric.step})[key] = metric.value
    return ["step", *sorted(histories)], [rows[step] for step in sorted(rows)]


def _write_metrics(client, run_id: str, latest: Mapping[str, float], folder: Path) -> None:
    """metrics.csv (per epoch) and, if MLflow sampled any, system_metrics.csv (per sample)."""
    histories = {key: client.get_metric_history(run_id, key) for key in latest}
    system = {key: history for key, history in histories.items() if key.startswith(SYSTEM_PREFIX)}
    _write_rows({key: history for key, history in histories.items() if key not in system},
                folder / bundle.METRICS_FILE)
    if system:
        _write_rows(system, folder / bundle.SYSTEM_METRICS_FILE)


def _write_rows(histories: Mapping[str, Iterable], path: Path) -> None:
    columns, rows = metric_rows(histories)
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)  # floats as repr: they read back to the same value


def teacher_provenance(params: Mapping[str, str], tags: Mapping[str, str]) -> Optional[dict]:
    """The teacher's architecture and every provenance tag the run holds; None for a run without a teacher."""
    recorded = {key: tags[key] for key in names.TEACHER_PROVENANCE if key in tags}
    if not recorded:
        return None
    return {"teacher_model": params.get("teacher.model.name"), **recorded}


def lineage_record(client, run) -> dict:
    """Which run this is and which code, versions and machine produced it."""
    experiment = client.get_experiment(run.info.experiment_id)
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "experiment": experiment.name if experiment else None,
        "status": run.info.status,
        "started": _utc(run.info.start_time),
        "ended": _utc(run.info.end_time),
        **recorded_lineage(run.data.tags),
    }


def _utc(milliseconds: Optional[int]) -> Optional[str]:
    if milliseconds is None:
        return None
    return datetime.fromtimestamp(milliseconds / 1000, tz=timezone.utc).isoformat(timespec="seconds")


def _write_json(value: dict, path: Path) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n", encoding="utf-8")
