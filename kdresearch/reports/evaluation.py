"""Evaluating a trained model on a dataset's test split: accuracy, per-class accuracy and the
confusion matrix, printed, written as CSV and PNG, and logged to MLflow. `scripts/evaluate.py`
is the command line; everything it does lives here.

Where each piece comes from:
- the weights: an MLflow run's final checkpoint (artifact `checkpoints/final.pt`), a job folder
  (its `checkpoints/final.pt`, else its newest epoch checkpoint) or a checkpoint file: one of ours,
  a benchmark suite's or a bare state_dict, read by the loader the teacher uses
  (`kdresearch.training.weights`, always `weights_only=True`);
- the model: the `model` node of the training config stored in the checkpoint; `model=NAME`
  (conf/model/) replaces it, and is required for a checkpoint that stores no config;
- the data: the checkpoint's own training data settings (same dataset, root, `limit_test`, ...);
  `data=NAME` takes conf/data/NAME.yaml instead, and `data.KEY=VALUE` applies on top of either.
  A checkpoint without a stored config uses conf's data (`data=cifar10` unless overridden);
- `device.*` and `tracking.*`: from the overrides and conf's defaults, never from the checkpoint
  (where a model is evaluated and logged is the caller's choice).

Where the results go: to the MLflow run that produced the weights when that run is in the store
(given as a run id, or named by the checkpoint's `run_id`), else to a new run `evaluate-<model>`
with tags `role=evaluation` and `evaluated_checkpoint=<path>`. Names carry the data's name, so
evaluations on several datasets stay apart in one run:
- metrics `eval/<data>/acc`, `eval/<data>/loss` and `eval/<data>/acc/class_<i>` (percent, mean
  cross-entropy), at step = the checkpoint's epoch (the step of the run's own `test/acc`);
- tags `eval/<data>/checkpoint`, `eval/<data>/test_images` and `eval/<data>/data` (the data settings);
- artifacts `evaluation/<data>/confusion_matrix.png`, `confusion_matrix.csv` and `per_class.csv`.
"""

from __future__ import annotations

import csv
import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdresearch.config import validators
from kdresearch.config.flat import flatten
from kdresearch.errors import KDResearchError, first_line
from kdresearch.layout import CONF_DIR
from kdresearch.models import model_name
from kdresearch.runtime import devices
from kdresearch.tracking import names
from kdresearch.tracking.run import TrackedRun
from kdresearch.tracking.store import Tracker
from kdresearch.training.loop import predict
from kdresearch.training.weights import (
    CheckpointSource,
    check_classes,
    from_path,
    from_run,
    load_weights,
    trained_classes,
)

ARTIFACT_DIR = "evaluation"  # artifacts go under evaluation/<data name>/
BATCH_SIZE = 256  # the trainer's test batch size
FULL_MATRIX_CLASSES = 20  # up to this many classes the text and the figure show every count


# --- the numbers ----------------------------------------------------------------------------------

def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 (num_classes, num_classes) counts on the inputs' device: row = true class, column =
    predicted class; the diagonal holds the correct predictions."""
    predictions, labels = predictions.flatten().long(), labels.flatten().long()
    if predictions.shape != labels.shape:
        raise ValueError(f"{predictions.numel()} predictions for {labels.numel()} labels")
    for what, values in (("predictions", predictions), ("labels", labels)):
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= num_classes):
            raise ValueError(f"{what} must lie in [0, {num_classes})")
    counts = torch.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def per_class_accuracy(matrix: torch.Tensor) -> torch.Tensor:
    """Per true class, the percentage of its samples predicted as that class (its recall), as
    float64; NaN for a class without samples."""
    matrix = matrix.double()
    return 100.0 * matrix.diagonal() / matrix.sum(dim=1)


@dataclass
class Evaluation:
    """The outcome of one pass over a test split."""

    matrix: torch.Tensor  # int64 (C, C) on the CPU: row = true class, column = predicted
    loss: float  # mean cross-entropy
    classes: tuple[str, ...]  # one name per class index

    @property
    def count(self) -> int:
        return int(self.matrix.sum())

    @property
    def correct(self) -> int:
        return int(self.matrix.diagonal().sum())

    @property
    def accuracy(self) -> float:
        """In percent, computed as the trainer computes `test/acc`."""
        return 100.0 * self.correct / self.count

    @property
    def per_class(self) -> torch.Tensor:
        return per_class_accuracy(self.matrix)


def evaluate_model(model: nn.Module, batches, num_classes: int, device: torch.device, precision: str = "fp32",
                   classes: Optional[Sequence[str]] = None) -> Evaluation:
    """Run `model` (in eval mode) over `batches` of (images, labels, index) and count its answers.
    The trainer's own evaluation loop (`training.loop.predict`), so on a run's own test split the
    accuracy and loss equal its `test/acc` and `test/loss`."""
    predictions = predict(model, batches, device, precision)
    matrix = confusion_matrix(predictions.predicted, predictions.labels, num_classes).cpu()
    class_names = tuple(classes) if classes is not None else tuple(str(i) for i in range(num_classes))
    return Evaluation(matrix, predictions.loss, class_names)


# --- text, CSV and figure ---------------------------------------------------------------------------

def _percent(value: float) -> str:
    return "—" if value != value else f"{value:.2f}"  # NaN: a class without test images


def per_class_table(evaluation: Evaluation) -> str:
    """One line per class: index, name, test images, correct, accuracy %."""
    totals = evaluation.matrix.sum(dim=1).tolist()
    correct = evaluation.matrix.diagonal().tolist()
    accuracy = evaluation.per_class.tolist()
    width = max(len("name"), *(len(name) for name in evaluation.classes))
    index_width = max(len("class"), len(str(len(totals) - 1)))
    lines = [f"{'class':>{index_width}}  {'name':<{width}}  {'images':>6}  {'correct':>7}  {'acc %':>6}"]
    for index, name in enumerate(evaluation.classes):
        lines.append(f"{index:>{index_width}}  {name:<{width}}  {totals[index]:>6}  {correct[index]:>7}  "
                     f"{_percent(accuracy[index]):>6}")
    return "\n".join(lines)


def matrix_text(evaluation: Evaluation, most_confused: int = 10) -> str:
    """The confusion matrix as text: every count up to FULL_MATRIX_CLASSES classes (rows true,
    columns predicted, by class index), else the most frequent confusions."""
    matrix = evaluation.matrix
    size = len(matrix)
    if size <= FULL_MATRIX_CLASSES:
        width = max(len(str(int(matrix.max()))), len(str(size - 1)))
        label = "true\\pred"
        lines = [label + " " + " ".join(f"{j:>{width}}" for j in range(size))]
        for i, row in enumerate(matrix.tolist()):
            lines.append(f"{i:>{len(label)}} " + " ".join(f"{count:>{width}}" for count in row))
        return "\n".join(lines)
    off_diagonal = matrix.clone()
    off_diagonal.fill_diagonal_(0)
    counts, positions = off_diagonal.flatten().sort(descending=True, stable=True)
    lines = [f"{size} classes, too many to print (confusion_matrix.csv holds them all); the most frequent "
             f"confusions:"]
    for count, position in zip(counts[:most_confused].tolist(), positions[:most_confused].tolist()):
        if count == 0:
            break
        true, predicted = divmod(position, size)
        lines.append(f"  {count:>5} x true {true} ({evaluation.classes[true]}) "
                     f"predicted as {predicted} ({evaluation.classes[predicted]})")
    if len(lines) == 1:
        lines.append("  none")
    return "\n".join(lines)


def report(evaluation: Evaluation, title: str) -> str:
    """What `scripts/evaluate.py` prints: the accuracy line, the per-class table, the matrix."""
    return "\n".join([
        f"{title}: accuracy {evaluation.accuracy:.2f} % ({evaluation.correct}/{evaluation.count}), "
        f"loss {evaluation.loss:.4f}",
        "",
        per_class_table(evaluation),
        "",
        "confusion matrix (rows: true class, columns: predicted class)",
        matrix_text(evaluation),
    ])


def write_files(evaluation: Evaluation, folder: Path, title: str) -> list[Path]:
    """confusion_matrix.csv, per_class.csv and confusion_matrix.png in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    matrix_csv, per_class_csv, figure = (folder / "confusion_matrix.csv", folder / "per_class.csv",
                                         folder / "confusion_matrix.png")
    with open(matrix_csv, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["true \\ predicted", *evaluation.classes])
        for name, row in zip(evaluation.classes, evaluation.matrix.tolist()):
            writer.writerow([name, *row])
    totals = evaluation.matrix.sum(dim=1).tolist()
    correct = evaluation.matrix.diagonal().tolist()
    with open(per_class_csv, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["class", "name", "images", "correct", "accuracy_percent"])
        for index, (name, accuracy) in enumerate(zip(evaluation.classes, evaluation.per_class.tolist())):
            writer.writerow([index, name, totals[index], correct[index], "" if accuracy != accuracy else accuracy])
    plot_matrix(evaluation, figure, title)
    return [figure, matrix_csv, per_class_csv]


def plot_matrix(evaluation: Evaluation, path: Path, title: str) -> None:
    """The confusion matrix as a heat map (Agg, no display needed), counts written in the cells up to
    FULL_MATRIX_CLASSES classes, class names on the axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrix = evaluation.matrix.numpy()
    size = len(matrix)
    side = max(5.0, 0.45 * size + 2.5) if size <= FULL_MATRIX_CLASSES else 10.0
    figure = Figure(figsize=(side + 1.2, side), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues", interpolation="nearest")
    figure.colorbar(image, ax=axes, shrink=0.8, label="test images")
    indexed = "" if size <= FULL_MATRIX_CLASSES else " (index)"
    axes.set_xlabel(f"predicted class{indexed}")
    axes.set_ylabel(f"true class{indexed}")
    axes.set_title(f"{title}\naccuracy {evaluation.accuracy:.2f} % on {evaluation.count} test images")
    if size <= FULL_MATRIX_CLASSES:
        ticks = range(size)
        axes.set_xticks(ticks, [f"{i} {evaluation.classes[i]}" for i in ticks], rotation=45, ha="right")
        axes.set_yticks(ticks, [f"{i} {evaluation.classes[i]}" for i in ticks])
        threshold = matrix.max() / 2
        for i in range(size):
            for j in range(size):
                axes.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                          color="white" if matrix[i, j] > threshold else "black")
    figure.savefig(path, dpi=100)


# --- metric names -------------------------------------------------------------------------------

def safe_name(name: str) -> str:
    """A data name usable in MLflow metric keys and artifact paths."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._") or "data"
    return cleaned


def metric_prefix(data_name: str) -> str:
    return f"eval/{safe_name(data_name)}"


def evaluation_metrics(evaluation: Evaluation, data_name: str) -> dict[str, float]:
    """`eval/<data>/acc`, `eval/<data>/loss` and `eval/<data>/acc/class_<i>` (classes with test images)."""
    prefix = metric_prefix(data_name)
    metrics = {f"{prefix}/acc": evaluation.accuracy, f"{prefix}/loss": evaluation.loss}
    for index, accuracy in enumerate(evaluation.per_class.tolist()):
        if accuracy == accuracy:
            metrics[f"{prefix}/acc/class_{index}"] = accuracy
    return metrics


# --- where the weights come from ------------------------------------------------------------------

def _message(error: BaseException) -> str:
    """Hydra's and OmegaConf's message, first line (the rest lists internals and search paths)."""
    return first_line(error).rstrip(".")


def _active_run(tracker: Tracker, run_id: str):
    """The run `run_id` of the store, or None when the store has no such (undeleted) run."""
    from mlflow.exceptions import MlflowException

    try:
        run = tracker.client.get_run(run_id)
    except MlflowException:
        return None
    return run if run.info.lifecycle_stage == "active" else None


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or "\\" in spec or Path(spec).suffix in (".pt", ".pth", ".ckpt", ".tar", ".bin")


def load_source(spec: str, tracker: Optional[Tracker]) -> CheckpointSource:
    """The weights `spec` names: a checkpoint file, a job folder or an MLflow run id (`tracker` is
    needed for a run id)."""
    path = Path(spec).expanduser()
    if path.exists():
        return from_path(path)
    if _looks_like_path(spec) or tracker is None:
        raise KDResearchError(f"checkpoint {path} does not exist")
    if _active_run(tracker, spec) is None:
        raise KDResearchError(f"{spec} is neither a checkpoint file nor the id of an MLflow run in {tracker.uri}")
    return from_run(tracker, spec)


def producing_run(source: CheckpointSource, tracker: Tracker) -> Optional[str]:
    """The run of this store that made the weights (the results go there), None when it is not in it."""
    if source.run_id is None or _active_run(tracker, source.run_id) is None:
        return None
    return source.run_id


# --- the config -------------------------------------------------------------------------------------

def parse_overrides(overrides: Sequence[str]) -> list:
    """Hydra's parse of the overrides (one-line error for bad syntax or a sweep)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as error:
        raise KDResearchError(f"bad override: {_message(error)}") from None
    sweeps = [override.input_line for override in parsed if override.is_sweep_override()]
    if sweeps:
        raise KDResearchError(f"an evaluation takes one value per key, not a sweep: {' '.join(sweeps)}")
    return parsed


def compose(overrides: Sequence[str]) -> DictConfig:
    """conf/config.yaml with `overrides`, as `python train.py` would compose it (one-line errors)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise KDResearchError(f"bad override: {_message(error)}") from None


def tracking_config(overrides: Sequence[str], parsed: Sequence) -> DictConfig:
    """`tracking` as conf and the `tracking.*` overrides give it (needed before the checkpoint is read)."""
    mine = [text for text, override in zip(overrides, parsed) if override.key_or_group.startswith("tracking.")]
    tracking = compose(mine).tracking
    validators.name("tracking.experiment", tracking.experiment)
    return tracking


def stored_config(checkpoint: dict) -> Optional[DictConfig]:
    """The training config a checkpoint of ours stores (resolved YAML); None for other files."""
    text = checkpoint.get("config")
    if not isinstance(text, str):
        return None
    try:
        config = OmegaConf.create(text)
    except Exception:  # not YAML of a mapping: a file from elsewhere
        return None
    return config if isinstance(config, DictConfig) else None


def _group_file(group: str, name) -> bool:
    return isinstance(name, str) and (CONF_DIR / group / f"{name}.yaml").is_file()


def evaluation_config(checkpoint: dict, overrides: Sequence[str], parsed: Sequence, source: str) -> DictConfig:
    """The resolved config to evaluate with: `model` and `data` as the module docstring says,
    `device` and `tracking` from conf and the overrides."""
    stored = stored_config(checkpoint)
    keys = [override.key_or_group for override in parsed]
    prepend = []
    for group in ("model", "data"):
        chosen = group in keys
        if not chosen and stored is not None and group in stored and _group_file(group, stored[group].get("name")):
            # Compose with the checkpoint's own choice, so that `group.KEY=VALUE` finds its keys.
            prepend.append(f"{group}={stored[group].name}")
    composed = compose([*prepend, *overrides])
    sections = {}
    for group in ("model", "data"):
        if group in keys or stored is None or group not in stored:
            if group == "model" and "model" not in keys:
                raise KDResearchError(
                    f"{source} stores no training config to build its model from; name its architecture "
                    f"with model=NAME (one of conf/model/)")
            sections[group] = OmegaConf.to_container(composed[group], resolve=False)
            continue
        section = OmegaConf.create(OmegaConf.to_container(stored[group], resolve=False))
        for override in parsed:
            key = override.key_or_group
            if not key.startswith(f"{group}."):
                continue
            inner = key[len(group) + 1:]
            if override.is_delete():
                parent, _, leaf = inner.rpartition(".")
                node = OmegaConf.select(section, parent) if parent else section
                if isinstance(node, DictConfig) and leaf in node:
                    del node[leaf]
            else:
                value = OmegaConf.select(composed, key)
                value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
                OmegaConf.update(section, inner, value, merge=False, force_add=True)
        sections[group] = OmegaConf.to_container(section, resolve=False)
    full = OmegaConf.create(OmegaConf.to_container(composed, resolve=False))
    full.model = sections["model"]
    full.data = sections["data"]  # a conf model's `num_classes: ${data.num_classes}` resolves against it
    try:  # only what an evaluation reads: other keys may use resolvers that need a running Hydra job
        config = OmegaConf.create({key: OmegaConf.to_container(full[key], resolve=True)
                                   for key in ("model", "data", "device", "tracking")})
    except Exception as error:  # omegaconf's interpolation errors
        raise KDResearchError(f"bad override: {_message(error)}") from None
    devices.check_precision(config.device.precision)
    return config


# --- the whole evaluation ---------------------------------------------------------------------------

@dataclass
class Outcome:
    evaluation: Evaluation
    source: CheckpointSource
    config: DictConfig  # resolved: model, data, device, tracking, ...
    device: torch.device
    files: list[Path] = field(default_factory=list)  # kept only with an output folder
    run_id: Optional[str] = None  # the MLflow run logged to; None with log=False
    run_name: Optional[str] = None
    new_run: bool = False
    tracking_uri: Optional[str] = None

    @property
    def data_name(self) -> str:
        return safe_name(self.config.data.name)

    @property
    def model_label(self) -> str:
        """The model config's short name (light, resnet8x4), else its class's name."""
        return str(self.config.model.get("name") or str(self.config.model._target_).rsplit(".", 1)[-1])

    @property
    def title(self) -> str:
        return f"{self.model_label} on {self.config.data.name} (test split)"


def run_evaluation(spec: str, overrides: Sequence[str] = (), out: Optional[Path] = None,
                   log_to_mlflow: bool = True) -> Outcome:
    """Evaluate the weights `spec` names (a run id, job folder or checkpoint file) on the test split
    of the data the overrides choose; write the files into `out` (when given) and log to MLflow."""
    from kdresearch.config.groups import build

    parsed = parse_overrides(overrides)
    tracking = tracking_config(overrides, parsed)
    local = Path(spec).expanduser().exists()
    tracker = Tracker(tracking.uri, tracking.experiment) if (log_to_mlflow or not local) else None
    source = load_source(spec, tracker)
    config = evaluation_config(source.checkpoint, overrides, parsed, source.description)
    num_classes = config.data.num_classes
    check_classes(trained_classes(source.checkpoint), num_classes, source.description)  # before the data loads

    device = devices.resolve_device(config.device.type)
    data = build(config.data, "data")
    model: nn.Module = build(config.model, "model")
    check_classes(getattr(model, "num_classes", None), data.num_classes, source.description)
    load_weights(model, source.checkpoint, source.description, f"model={config.model.get('name', model_name(model))}")
    memory_format = torch.channels_last if config.device.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    batches = data.batches("test", BATCH_SIZE, device, channels_last=config.device.channels_last)
    evaluation = evaluate_model(model, batches, data.num_classes, device, config.device.precision, data.classes)
    if not math.isfinite(evaluation.loss):  # NaN logits argmax to class 0: the accuracy would be made up
        raise KDResearchError(f"{source.description}: the model's outputs on the test split are not finite "
                              f"(mean loss {evaluation.loss}); nothing is reported")
    outcome = Outcome(evaluation, source, config, device)

    if out is not None:
        outcome.files = write_files(evaluation, Path(out), outcome.title)
    if log_to_mlflow:
        with tempfile.TemporaryDirectory(prefix="kdresearch-evaluate-") as folder:
            files = outcome.files or write_files(evaluation, Path(folder), outcome.title)
            log_evaluation(tracker, outcome, files)
    return outcome


def log_evaluation(tracker: Tracker, outcome: Outcome, files: Sequence[Path]) -> None:
    """Log metrics, tags and files to the run that made the weights, or to a new evaluation run."""
    source, config, evaluation = outcome.source, outcome.config, outcome.evaluation
    prefix = metric_prefix(config.data.name)
    data_settings = OmegaConf.to_container(config.data, resolve=True)
    tags = {
        f"{prefix}/checkpoint": source.label,
        f"{prefix}/test_images": evaluation.count,
        f"{prefix}/data": json.dumps(data_settings, sort_keys=True)[:5000],
    }

    def log_to(tracked: TrackedRun) -> None:
        tracked.log_metrics(evaluation_metrics(evaluation, config.data.name), step=source.epoch)
        tracked.set_tags(tags)
        for path in files:
            tracked.log_file(path, f"{ARTIFACT_DIR}/{outcome.data_name}")

    outcome.tracking_uri = tracker.uri
    producer = producing_run(source, tracker)
    if producer is not None:
        tracked = TrackedRun(tracker, producer)  # not a context manager: its status stays as it was
        log_to(tracked)
        outcome.run_id, outcome.new_run = producer, False
        outcome.run_name = tracker.client.get_run(producer).info.run_name
        return
    name = f"evaluate-{outcome.model_label}"
    run_tags = {names.ROLE: names.EVALUATION_ROLE, "evaluated_checkpoint": source.label, names.MODEL: outcome.model_label,
                "data": config.data.name, names.DEVICE: str(outcome.device)}
    if source.run_id is not None:  # a checkpoint of ours whose run lives in another store
        run_tags["checkpoint_run_id"] = source.run_id
    params = flatten({"model": OmegaConf.to_container(config.model, resolve=True), "data": data_settings})
    with tracker.start_run(name, run_tags, params) as tracked:
        log_to(tracked)
    outcome.run_id, outcome.run_name, outcome.new_run = tracked.run_id, name, True
