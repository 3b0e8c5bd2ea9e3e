"""One training job as one MLflow run, and `run(cfg)`, what `train.py` calls: it returns what a
Hydra sweeper optimises (kdresearch.training.result.objective).

`run_job` takes a job's steps in this order:

    config checked       every key, before any work (Job)
    runtime              device, data-parallel world (Runtime; train.py installs the signal handlers)
    data                 the splits and their fingerprint
    where it starts      afresh, from a checkpoint, again from epoch 1, or not at all (training.resume)
    student and loss     built and bound to the pair (bind_pair)
    teacher              found, trained or loaded, its outputs ready (teacher_for: teacher.provider)
    teacher measured     its logits and accuracy on the evaluation splits, its claim checked
                         (Training.measure_teacher: teacher.provenance)
    resumed              the optimizer, schedule and RNG state of the checkpoint (Training.restore)
    run opened           a new MLflow run, or the continued one reopened (open_run, log_start)
    epochs               batches, loop, checkpoint, metrics, fidelity to the teacher (Training.run_epochs)
    final                the final checkpoint, the MLflow model and the budget (finish: training.budget)

Under torchrun every rank takes every step; rank 0 alone tracks, checkpoints and evaluates.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdresearch.config.flat import flatten
from kdresearch.config.groups import build
from kdresearch.config.identity import config_identity, identity_hash
from kdresearch.config.naming import run_name
from kdresearch.config.validation import check_config
from kdresearch.data.splits import Dataset
from kdresearch.data.views import views_forward
from kdresearch.errors import KDResearchError
from kdresearch.layout import CHECKPOINT_DIR, EPOCH_CHECKPOINTS, JobFolder
from kdresearch.losses.base import TrainingLoss
from kdresearch.losses.combine import build_loss
from kdresearch.models import first_layer_norm, model_name, parameter_count
from kdresearch.runtime import devices, distributed, interrupts
from kdresearch.sweeps import parent_runs
from kdresearch.teacher.provenance import check_claim, provenance_tags
from kdresearch.teacher.provider import TeacherInUse, provide_teacher
from kdresearch.tracking import names
from kdresearch.tracking.run import DatasetRecord, NullRun
from kdresearch.tracking.store import Tracker, check_param_keys
from kdresearch.training import resume
from kdresearch.training.budget import Budget
from kdresearch.training.checkpoint import (
    FORMAT,
    capture_rng,
    keep_last,
    restore_rng,
    save_checkpoint,
)
from kdresearch.training.loop import Predictions, predict, seed_everything, train_one_epoch
from kdresearch.training.result import JobResult

log = logging.getLogger(__name__)


def run(cfg: DictConfig, output_dir: Optional[Path] = None) -> float:
    """Train one job; `output_dir` defaults to Hydra's job folder. Returns the last epoch's val/acc
    with data.val_size > 0 (a search must not select on the test set), else its test/acc."""
    if output_dir is None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra = HydraConfig.get()
        folder = OmegaConf.to_container(hydra.run if hydra.mode == RunMode.RUN else hydra.sweep)  # unresolved
        distributed.check_restartable(folder["dir"], os.environ)
        output_dir = Path(hydra.runtime.output_dir)
    try:
        return run_job(cfg, Path(output_dir), overrides=_hydra_overrides(), sweep=_hydra_sweep()).objective
    finally:
        distributed.shutdown()


def run_job(cfg: DictConfig, output_dir: Path, overrides: tuple[str, ...] = (),
            sweep: Optional[str] = None) -> JobResult:
    """Train one job as one MLflow run, step by step (the module docstring); `overrides` are the
    command-line overrides to record and `sweep` names the multirun the job belongs to (tag
    `sweep`, for filtering in compare.py and the UI)."""
    job = Job(cfg, overrides, sweep)  # config checked, runtime, tracking
    data: Dataset = build(cfg.data, "data")
    fingerprint = data.fingerprint()
    identity = config_identity(cfg, fingerprint)
    start = resume.job_start(cfg.resume, Path(output_dir), identity, job.tracker, job.runtime.world,
                             job.parent_run_id if sweep else None)
    if start.finished_run_id is not None:
        return resume.finished_result(job.tracker, start.finished_run_id)
    folder = JobFolder(start.output_dir)
    pair = bind_pair(cfg, data)
    teacher = teacher_for(job, pair, data, fingerprint, folder, start.point)
    training = Training(job, pair, data, teacher, identity)  # optimizer, schedule, batches
    first_epoch = training.restore(start.point)
    tracked = open_run(job, start, folder, training, data, fingerprint, identity)
    with tracked:  # the run ends FINISHED, or FAILED / KILLED on an error or a stop
        log_start(job, tracked, training, resumed=start.point is not None)
        state = training.run_epochs(tracked, first_epoch, folder, start.point)
        final = finish(job, tracked, training, state, folder)
    if not job.runtime.world.is_main:
        return JobResult.untracked(final)
    report(job.name, tracked.run_id, state["metrics"])
    return JobResult.of(tracked.run_id, state["metrics"], final)


# --- config checked, runtime ---------------------------------------------------------------------

@dataclass(frozen=True)
class Runtime:
    """Where the job computes: its device and the data-parallel world it is a rank of."""

    world: distributed.World
    device: torch.device
    memory_format: torch.memory_format

    @classmethod
    def open(cls, cfg: DictConfig) -> "Runtime":
        devices.set_deterministic(cfg.device.deterministic)
        devices.keep_freed_memory(cfg.device.keep_freed_memory)
        device = devices.resolve_device(cfg.device.type)
        world = distributed.init(device.type)
        return cls(world, distributed.device_for(world, device),
                   torch.channels_last if cfg.device.channels_last else torch.contiguous_format)

    def describe(self) -> str:
        """The run's tag `device`."""
        return str(self.device) if not self.world.active else f"{self.device.type} x{self.world.size} (DDP)"


class Job:
    """What a job is before any work: its config, checked (every key, and every param MLflow would
    refuse), what its run records (name, params, overrides, sweep), the runtime it trains on, and
    where it is tracked (rank 0's MLflow store and parent run; None on the other ranks)."""

    def __init__(self, cfg: DictConfig, overrides: tuple[str, ...] = (), sweep: Optional[str] = None):
        self.started = time.perf_counter()  # the budget's wall time counts from here (less a teacher job's)
        check_config(cfg)
        self.cfg = cfg
        self.resolved = OmegaConf.to_container(cfg, resolve=True)
        self.params = flatten({k: v for k, v in self.resolved.items() if k not in resume.FREE_KEYS})
        check_param_keys(self.params)  # a key MLflow refuses (`+a$b=1`) fails here, before any work
        self.name = run_name(cfg)  # reads the loss's config file: once per job
        self.overrides, self.sweep = tuple(overrides), sweep
        self.augment_seed = cfg.seed if cfg.augment_seed is None else cfg.augment_seed
        self.runtime = Runtime.open(cfg)
        main = self.runtime.world.is_main
        self.tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.retry_minutes) if main else None
        self.parent_run_id = parent_runs.parent_run_id(sweep) if main else None


# --- student and loss bound to the pair ----------------------------------------------------------

@dataclass
class Pair:
    """The student, the loss bound to it and, for a loss that needs one, the teacher's architecture
    (its weights come in the teacher step)."""

    student: nn.Module
    loss_fn: TrainingLoss
    teacher: Optional[nn.Module]


def bind_pair(cfg: DictConfig, data: Dataset) -> Pair:
    # The student is built right after seeding, so every run of one seed starts from the same
    # weights (the tutorial's first_layer_norm check); the teacher never touches this RNG
    # stream, and what the loss sizes from the pair (bind) is drawn right after the student.
    seed_everything(cfg.seed)
    student = build(cfg.model, "model")
    loss_fn = build_loss(cfg.loss)
    teacher = None
    if loss_fn.needs_teacher:
        with torch.random.fork_rng(devices=[]):
            teacher = build(cfg.teacher.model, "teacher.model")
    loss_fn.bind(student, teacher, train_size=data.train_size, train_labels=data.train_labels)
    return Pair(student, loss_fn, teacher)


# --- teacher found, trained or loaded -------------------------------------------------------------

def teacher_for(job: Job, pair: Pair, data: Dataset, fingerprint: str, folder: JobFolder,
                point: Optional[resume.ResumePoint]) -> Optional[TeacherInUse]:
    """The teacher of a loss that needs one (kdresearch.teacher.provider); a resumed job keeps the
    teacher its checkpoint names. An automatic teacher trains as a job of its own (`run_job`)."""
    if pair.teacher is None:
        return None
    pinned = point.checkpoint.get("teacher_run_id") if point else None
    runtime = job.runtime

    def train_teacher_job(*args, **kwargs) -> JobResult:
        started = time.perf_counter()
        try:
            return run_job(*args, **kwargs)
        finally:  # the teacher's run has a budget of its own: this job's wall time leaves it out
            job.started += time.perf_counter() - started

    return provide_teacher(job.cfg, pair.teacher, pair.loss_fn.teacher_fields, data, fingerprint, job.tracker,
                           folder, runtime.world, runtime.device, runtime.memory_format, job.augment_seed, pinned,
                           train_job=train_teacher_job, views=pair.loss_fn.views)


# --- resumed, epochs ------------------------------------------------------------------------------

class Training:
    """The epochs of one job: the student and loss on the device, the optimizer and schedule, the
    batches, and what every epoch so far measured (kept in each checkpoint)."""

    def __init__(self, job: Job, pair: Pair, data: Dataset, teacher: Optional[TeacherInUse], identity: dict):
        cfg, runtime = job.cfg, job.runtime
        self.cfg, self.runtime, self.resolved, self.identity = cfg, runtime, job.resolved, identity
        self.student, self.loss_fn, self.teacher = pair.student, pair.loss_fn, teacher
        self.init_norm = first_layer_norm(self.student)
        self.student.to(runtime.device, memory_format=runtime.memory_format)
        self.loss_fn.to(runtime.device)
        self.optimizer = build(cfg.optimizer, "optimizer",
                               itertools.chain(self.student.parameters(), self.loss_fn.parameters()))
        self.scheduler = build(cfg.scheduler, "scheduler", self.optimizer, cfg.epochs)
        self.data_order = torch.Generator().manual_seed(cfg.seed)
        channels_last, device, world = cfg.device.channels_last, runtime.device, runtime.world
        self.train_batches = data.batches("train", cfg.batch_size, device, generator=self.data_order,
                                          channels_last=channels_last, augment=data.augment,
                                          shard=(world.rank, world.size), augment_seed=job.augment_seed)
        if self.loss_fn.views:  # a loss reading several views of each image (kdresearch.data.views)
            self.train_batches.request_views(self.loss_fn.views)
        self.test_batches = data.batches("test", data.eval_batch_size, device, channels_last=channels_last)
        self.val_batches = (data.batches("val", data.eval_batch_size, device, channels_last=channels_last)
                            if data.has_validation else None)
        self.best: dict[str, float] = {}  # best/val_acc, best/epoch, best/test_acc: the epoch chosen on validation
        self.history: dict[int, dict] = {}  # every epoch's metrics so far, kept in each checkpoint
        self.budget = Budget(runtime.world, job.started)
        self.train_size, self.augmented = data.train_size, data.augment
        self.teacher_logits: dict[str, torch.Tensor] = {}  # split -> the teacher's logits, for fidelity
        self.teacher_test_acc: Optional[float] = None
        if teacher is not None and runtime.world.is_main:  # rank 0 alone evaluates
            self.measure_teacher()

    def measure_teacher(self) -> None:
        """The teacher's logits on the evaluation splits, once per job (it is frozen), for the
        student's fidelity every epoch; its test accuracy, checked against its source's claim."""
        device, precision = self.runtime.device, self.cfg.device.precision
        for split, batches in (("test", self.test_batches), ("val", self.val_batches)):
            if batches is None:
                continue
            measured = predict(self.teacher.model, batches, device, precision, keep_logits=True)
            self.teacher.outputs.counts.forwards += measured.labels.numel()
            self.teacher_logits[split] = measured.logits
            if split == "test":
                self.teacher_test_acc = measured.accuracy
        log.info("teacher: %.2f%% test accuracy on this data", self.teacher_test_acc)
        check_claim(self.teacher.source, self.teacher_test_acc, self.cfg.teacher.accuracy_margin)

    def restore(self, point: Optional[resume.ResumePoint]) -> int:
        """Load the resume point's state; returns the first epoch still to train."""
        if point is None:
            return 1
        checkpoint = point.checkpoint
        self.student.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.loss_fn.load_state_dict(checkpoint["loss"])
        restore_rng(checkpoint["rng"], {"data_order": self.data_order})
        self.budget.restore(checkpoint.get("budget"))
        self.best = {key: value for key, value in checkpoint["metrics"].items() if key.startswith("best/")}
        self.history = point.history()
        return checkpoint["epoch"] + 1

    def run_epochs(self, tracked, first_epoch: int, folder: JobFolder,
                   point: Optional[resume.ResumePoint]) -> Optional[dict]:
        """Train the remaining epochs; returns the last checkpoint state (rank 0)."""
        cfg, world, device = self.cfg, self.runtime.world, self.runtime.device
        trained = distributed.wrap(world, views_forward(self.student, self.loss_fn.views), device)
        trained = torch.compile(trained) if cfg.device.compile else trained
        loss_call = distributed.wrap(world, self.loss_fn, device)
        outputs = self.teacher.outputs if self.teacher is not None else None
        state = point.checkpoint if point else None
        for epoch in range(first_epoch, cfg.epochs + 1):
            started = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]  # the lr this epoch trains with
            self.train_batches.set_epoch(epoch)  # this epoch's augmented views
            if outputs is not None:
                outputs.start_epoch(epoch)
            metrics = train_one_epoch(trained, self.loss_fn, loss_call, outputs, self.optimizer,
                                      self.train_batches, epoch, cfg, device)
            self.scheduler.step()
            metrics = distributed.average(world, metrics)
            epoch_seconds = time.perf_counter() - started
            budget = self.budget.totals(outputs.counts if outputs is not None else None)  # every rank
            if not world.is_main:
                continue
            test = self.evaluate("test")
            if not math.isfinite(test.loss):  # finite training losses can still hide inf weights
                raise KDResearchError(
                    f"training diverged: test/loss is {test.loss} after epoch {epoch}; try a lower optimizer.lr"
                )
            test_acc, test_loss = test.accuracy, test.loss
            metrics.update({
                "test/acc": test_acc, "test/loss": test_loss, "lr": lr, "epoch_seconds": epoch_seconds,
                "first_layer_norm": first_layer_norm(self.student), **fidelity_metrics("test", test),
            })
            if self.val_batches is not None:
                metrics.update(self.validate(epoch, test_acc))
            # The checkpoint (holding every epoch's metrics) goes first: a kill between the two
            # writes, or an outage of the tracking server, is repaired on resume by log_missing_epochs.
            self.history[epoch] = metrics
            state = self.checkpoint_state(tracked.run_id, epoch, metrics)
            state["budget"] = budget
            interrupts.check()
            save_checkpoint(state, folder.epoch_checkpoint(epoch))
            keep_last(folder.checkpoints, EPOCH_CHECKPOINTS, cfg.checkpoint.keep_last)
            tracked.log_metrics(metrics, step=epoch, wait=False)  # kept for later while the server is away
            log.info("epoch %d/%d  train/loss %.4f  test/acc %.2f%%  test/loss %.4f  lr %.4g  %.1fs",
                     epoch, cfg.epochs, metrics["train/loss"], test_acc, test_loss, lr, epoch_seconds)
        return state

    def evaluate(self, split: str) -> Predictions:
        """The student on `split` ("test" or "val"), and its fidelity to the teacher's logits there."""
        batches = self.test_batches if split == "test" else self.val_batches
        return predict(self.student, batches, self.runtime.device, self.cfg.device.precision,
                       reference=self.teacher_logits.get(split))

    def validate(self, epoch: int, test_acc: float) -> dict:
        """val/acc and val/loss of this epoch, and the best epoch so far chosen on val/acc (ties:
        the earlier epoch) with the test accuracy of that same epoch: the honest figure to report."""
        val = self.evaluate("val")
        if not self.best or val.accuracy > self.best["best/val_acc"]:
            self.best = {"best/val_acc": val.accuracy, "best/epoch": float(epoch), "best/test_acc": test_acc}
        return {"val/acc": val.accuracy, "val/loss": val.loss, **fidelity_metrics("val", val), **self.best}

    def checkpoint_state(self, run_id: str, epoch: int, metrics: dict) -> dict:
        """The checkpoint of this epoch (kdresearch.training.checkpoint: the format)."""
        return {
            "format": FORMAT, "model_class": model_name(self.student), "run_id": run_id,
            "teacher_run_id": self.teacher.run_id if self.teacher else None, "epoch": epoch,
            "model": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "loss": self.loss_fn.state_dict(),
            "rng": capture_rng({"data_order": self.data_order}),
            "config": OmegaConf.to_yaml(self.resolved),
            "identity": self.identity, "num_classes": self.student.num_classes, "metrics": metrics,
            "history": {str(step): values for step, values in self.history.items()},
        }


def fidelity_metrics(split: str, predictions: Predictions) -> dict[str, float]:
    """`<split>/agreement` (top-1 agreement with the teacher, percent) and `<split>/kl_teacher`
    (mean KL(teacher || student) at T = 1): fidelity and accuracy can diverge (Stanton et al.,
    2021, "Does knowledge distillation really work?"). None without a teacher."""
    if predictions.agreement is None:
        return {}
    return {f"{split}/agreement": predictions.agreement, f"{split}/kl_teacher": predictions.kl_to_reference}


# --- run opened -----------------------------------------------------------------------------------

def open_run(job: Job, start: resume.JobStart, folder: JobFolder, training: Training, data: Dataset,
             fingerprint: str, identity: dict):
    """The job's MLflow run (rank 0; a NullRun elsewhere): the resume point's run reopened, else a
    new one with the job's tags, params and datasets."""
    cfg = job.cfg
    if not job.runtime.world.is_main:
        return NullRun()
    if start.point is not None:
        tracked = job.tracker.resume_run(start.point.run_id)
    else:
        is_teacher = cfg.loss.name == "ce" and cfg.model.name == cfg.teacher.model.name
        tags = {
            names.ROLE: names.TEACHER_ROLE if is_teacher else names.STUDENT_ROLE,
            names.MODEL: cfg.model.name,
            names.LOSS: cfg.loss.name,
            names.CONFIG_HASH: identity_hash(identity),
            names.DATA_FINGERPRINT: fingerprint,
            names.DEVICE: job.runtime.describe(),
            names.OUTPUT_DIR: str(folder.path.resolve()),
            names.OVERRIDES: " ".join(job.overrides),
        }
        if training.teacher is not None:
            tags.update(provenance_tags(training.teacher.source, training.teacher.digest, training.teacher_test_acc))
        if job.sweep:
            tags[names.SWEEP] = job.sweep
        params = {**job.params, "parameter_count": parameter_count(training.student)}
        tracked = job.tracker.start_run(job.name, tags, params, parent_run_id=job.parent_run_id)
        with tracked.failing_on_error():
            tracked.log_datasets(dataset_records(cfg, data, fingerprint))
    tracked.resume_hint = f"resume={folder.path.resolve()}"
    if cfg.tracking.system_metrics:
        tracked.start_system_metrics()
    return tracked


def dataset_records(cfg: DictConfig, data: Dataset, fingerprint: str) -> list[DatasetRecord]:
    """Each split of the data as an MLflow dataset input, identified by the data fingerprint."""
    root = OmegaConf.select(cfg, "data.root")
    source = str(Path(root).resolve()) if root else "synthetic"
    return [DatasetRecord(cfg.data.name, fingerprint, source, context, rows, data.num_classes)
            for context, rows in data.split_sizes().items()]


def log_start(job: Job, tracked, training: Training, resumed: bool) -> None:
    """Where the run is; a new run's config and first-layer norm at initialisation, or, for a
    continued one, the epochs its checkpoint holds that never reached MLflow."""
    if not job.runtime.world.is_main:
        return
    log.info("MLflow run %s (%s) in %s, experiment %s", tracked.run_id, job.name, job.tracker.uri,
             job.cfg.tracking.experiment)
    if job.tracker.uri.startswith(("http://", "https://")):
        log.info("view it at %s", job.tracker.run_url(tracked.run_id))
    if resumed:
        tracked.log_missing_epochs(training.history)
        return
    tracked.log_text(OmegaConf.to_yaml(job.resolved), "config/config.yaml")
    tracked.log_metrics({"first_layer_norm": training.init_norm}, step=0)
    log.info("%s: %d parameters, first_layer_norm at init %.4f, device %s", type(training.student).__name__,
             parameter_count(training.student), training.init_norm, job.runtime.device)


# --- final artifacts and model --------------------------------------------------------------------

def finish(job: Job, tracked, training: Training, state: dict, folder: JobFolder) -> Path:
    """Save the final checkpoint (also as the run's artifact), the MLflow model, the
    teacher-cache tag and the budget (kdresearch.training.budget)."""
    final = folder.final_checkpoint
    outputs = training.teacher.outputs if training.teacher is not None else None
    totals = training.budget.totals(outputs.counts if outputs is not None else None)  # every rank
    if job.runtime.world.is_main:
        state["budget"] = totals
        save_checkpoint(state, final)
        tracked.log_file(final, CHECKPOINT_DIR)  # the artifact layout.FINAL_CHECKPOINT
        if job.cfg.tracking.log_model:
            log_model(tracked, training.student, training.test_batches, job.cfg.tracking.register_model)
        if training.teacher is not None:
            tracked.set_tags({names.TEACHER_CACHE: "used" if training.teacher.outputs.used_cache else "online"})
        tracked.log_metrics(training.budget.metrics(totals, state["epoch"], len(training.train_batches),
                                                    training.train_size, training.augmented,
                                                    views=max(len(training.loss_fn.views), 1)), step=state["epoch"])
    return final


def log_model(tracked, student: nn.Module, test_batches, register_as: Optional[str]) -> None:
    """The trained student as an MLflow model: CPU, float32, eval mode, fed normalised images
    (the input example is two normalised test images)."""
    started = time.perf_counter()
    images = next(iter(test_batches))[0][:2].float().contiguous().cpu().numpy()
    model = copy.deepcopy(student).to("cpu", torch.float32, memory_format=torch.contiguous_format)
    tracked.log_model(model.eval(), images, registered_model_name=register_as)
    log.info("logged the student as MLflow model runs:/%s/model (%.1fs)", tracked.run_id,
             time.perf_counter() - started)


def report(name: str, run_id: str, metrics: dict) -> None:
    """The job's last line: its test accuracy, and the epoch chosen on validation when there was one."""
    test_acc = metrics["test/acc"]
    if "best/epoch" in metrics:
        log.info("finished %s: test/acc %.2f%%; best epoch on validation %d (val/acc %.2f%%, test/acc %.2f%%) "
                 "(run %s)", name, test_acc, metrics["best/epoch"], metrics["best/val_acc"],
                 metrics["best/test_acc"], run_id)
    else:
        log.info("finished %s: test/acc %.2f%% (run %s)", name, test_acc, run_id)


# --- Hydra's view of the job ----------------------------------------------------------------------

def _hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _hydra_sweep() -> Optional[str]:
    """The multirun's folder relative to the launch folder, e.g. outputs/multirun/2026-11-28/14-03-07."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return str(HydraConfig.get().sweep.dir)
