"""One training job as named steps, and `run(cfg)`, what `train.py` calls: it returns the final
validation accuracy (test accuracy when there is no validation split) so that a Hydra sweeper can
optimise it.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
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
from kdresearch.errors import KDResearchError
from kdresearch.layout import FINAL_CHECKPOINT
from kdresearch.losses.base import TrainingLoss
from kdresearch.models import first_layer_norm, model_name, parameter_count
from kdresearch.runtime import devices, distributed, interrupts
from kdresearch.sweeps import parent_runs
from kdresearch.teacher.outputs import teacher_outputs as build_teacher_outputs
from kdresearch.teacher.sources import obtain_teacher
from kdresearch.tracking.run import DatasetRecord, NullRun
from kdresearch.tracking.store import Tracker, check_param_keys
from kdresearch.training import resume
from kdresearch.training.checkpoint import (
    FORMAT,
    capture_rng,
    keep_last,
    restore_rng,
    save_checkpoint,
)
from kdresearch.training.loop import evaluate, seed_everything, train_one_epoch

log = logging.getLogger(__name__)
@dataclass
class JobResult:
    run_id: str
    test_acc: float
    checkpoint: Path
    objective: float  # what a sweeper optimises: the last val/acc with data.val_size > 0, else test/acc

    @classmethod
    def of(cls, run_id: str, metrics: dict, checkpoint: Path) -> "JobResult":
        """From the last epoch's metrics (the objective rule in one place)."""
        return cls(run_id, metrics["test/acc"], checkpoint, metrics.get("val/acc", metrics["test/acc"]))


def run(cfg: DictConfig, output_dir: Optional[Path] = None) -> float:
    """Train one job; `output_dir` defaults to Hydra's job folder. Returns the last epoch's val/acc
    with data.val_size > 0 (a search must not select on the test set), else its test/acc."""
    if output_dir is None:
        from hydra.core.hydra_config import HydraConfig

        output_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        return run_job(cfg, Path(output_dir), overrides=_hydra_overrides(), sweep=_hydra_sweep()).objective
    finally:
        distributed.shutdown()




class Job:
    """One training job as named steps: `build` (data, models, loss, teacher, optimizer),
    `restore` (from a resume point), `start_run` (MLflow), `train` (epochs, checkpoints, metrics),
    `finish` (final checkpoint). `run_job` calls them in that order.
    Under torchrun every rank runs the job; rank 0 alone tracks, checkpoints and evaluates."""

    def __init__(self, cfg: DictConfig, output_dir: Path, overrides: tuple[str, ...] = (),
                 sweep: Optional[str] = None):
        check_config(cfg)
        self.cfg = cfg
        self.output_dir = output_dir
        self.overrides, self.sweep = tuple(overrides), sweep
        devices.set_deterministic(cfg.device.deterministic)
        devices.keep_freed_memory(cfg.device.keep_freed_memory)
        device = devices.resolve_device(cfg.device.type)
        self.world = distributed.init(device.type)
        self.device = distributed.device_for(self.world, device)
        self.memory_format = torch.channels_last if cfg.device.channels_last else torch.contiguous_format
        self.augment_seed = cfg.seed if cfg.augment_seed is None else cfg.augment_seed
        self.resolved = OmegaConf.to_container(cfg, resolve=True)
        self.params = flatten({k: v for k, v in self.resolved.items() if k not in resume.FREE_KEYS})
        check_param_keys(self.params)  # a key MLflow refuses (`+a$b=1`) fails here, before any work
        self.name = run_name(cfg)  # reads the loss's config file: once per job
        self.tracker = (Tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.retry_minutes)
                        if self.world.is_main else None)
        self.resume_point: Optional[resume.ResumePoint] = None
        self.parent_run_id = parent_runs.parent_run_id(sweep) if self.world.is_main else None
        self.finished_run_id: Optional[str] = None  # set in a sweep run again: this configuration is done
        self.teacher_outputs = None
        self.teacher_run_id: Optional[str] = None

    # --- build ----------------------------------------------------------------------------------

    def build(self) -> None:
        cfg, world = self.cfg, self.world
        self.data: Dataset = build(cfg.data, "data")
        self.data_fingerprint = self.data.fingerprint()
        # The student is built right after seeding, so every run of one seed starts from the same
        # weights (the tutorial's first_layer_norm check); the teacher never touches this RNG
        # stream, and what the loss sizes from the pair (bind) is drawn right after the student.
        seed_everything(cfg.seed)
        self.student: nn.Module = build(cfg.model, "model")
        self.loss_fn: TrainingLoss = build(cfg.loss, "loss")
        self.identity = config_identity(cfg, self.data_fingerprint)
        if cfg.resume:
            self.locate_resume_point()
        elif self.sweep:
            self.continue_sweep_job()
            if self.finished_run_id is not None:
                return
        train_size = self.data.train_size
        if self.loss_fn.needs_teacher:
            with torch.random.fork_rng(devices=[]):
                teacher = build(cfg.teacher.model, "teacher.model")
            self.loss_fn.bind(self.student, teacher, train_size=train_size)
            self.setup_teacher(teacher)
        else:
            self.loss_fn.bind(self.student, None, train_size=train_size)
        self.init_norm = first_layer_norm(self.student)
        self.student.to(self.device, memory_format=self.memory_format)
        self.loss_fn.to(self.device)
        self.optimizer = build(cfg.optimizer, "optimizer",
                               itertools.chain(self.student.parameters(), self.loss_fn.parameters()))
        self.scheduler = build(cfg.scheduler, "scheduler", self.optimizer, cfg.epochs)
        self.data_order = torch.Generator().manual_seed(cfg.seed)
        self.train_batches = self.data.batches("train", cfg.batch_size, self.device, generator=self.data_order,
                                               channels_last=cfg.device.channels_last, augment=self.data.augment,
                                               shard=(world.rank, world.size), augment_seed=self.augment_seed)
        self.test_batches = self.data.batches("test", 256, self.device, channels_last=cfg.device.channels_last)
        self.val_batches = (self.data.batches("val", 256, self.device, channels_last=cfg.device.channels_last)
                            if self.data.has_validation else None)
        self.best: dict[str, float] = {}  # best/val_acc, best/epoch, best/test_acc: the epoch chosen on validation
        self.history: dict[int, dict] = {}  # every epoch's metrics so far, kept in each checkpoint

    def locate_resume_point(self) -> None:
        # Rank 0 may need MLflow to find the job folder; the others follow its answer.
        world = self.world
        folder = Path(str(self.cfg.resume)).expanduser()
        if folder.is_dir() and not _has_epoch_checkpoint(folder) and _has_epoch_checkpoint(folder / "teacher"):
            # Stopped while it trained its automatic teacher: setup_teacher continues that teacher's
            # run, then the student starts in this same folder.
            log.info("resume: %s was stopped while training its teacher; continuing the teacher, then the student",
                     folder)
            self.output_dir = folder
            return
        point = resume.locate(str(self.cfg.resume), self.tracker) if world.is_main else None
        folder = distributed.broadcast_object(world, str(point.output_dir) if point else None)
        point = point or resume.locate(folder, self.tracker)
        resume.check_same_job(point.checkpoint, self.identity)
        self.resume_point = point
        self.output_dir = point.output_dir

    def continue_sweep_job(self) -> None:
        """A sweep run again in its folder (hydra.sweep.dir=<old folder>) does each configuration
        once: the configuration's latest run in the sweep's parent run FINISHED -> nothing to train;
        it left a checkpoint -> resume it (the same bit-exact continuation as resume=); else train."""
        world = self.world
        earlier = None
        if world.is_main and self.parent_run_id:
            runs = self.tracker.find_runs(f"tags.mlflow.parentRunId = '{self.parent_run_id}' and "
                                          f"tags.config_hash = '{identity_hash(self.identity)}'")
            earlier = (runs[0].info.run_id, runs[0].info.status, runs[0].data.tags.get("output_dir")) if runs else None
        earlier = distributed.broadcast_object(world, earlier)
        if earlier is None:
            return
        run_id, status, folder = earlier
        if status == "FINISHED":
            self.finished_run_id = run_id
            log.info("sweep: %s already FINISHED in MLflow run %s; not trained again", self.name, run_id)
        elif folder and _has_epoch_checkpoint(Path(folder)):
            point = resume.locate(folder, self.tracker)
            resume.check_same_job(point.checkpoint, self.identity)
            self.resume_point, self.output_dir = point, point.output_dir
        else:
            if status == "RUNNING" and world.is_main:  # its process died (SIGKILL, lost node) before epoch 1 ended
                self.tracker.client.set_terminated(run_id, status="KILLED")
            log.info("sweep: %s's earlier run %s (%s) left no checkpoint; training it again", self.name, run_id, status)

    def earlier_result(self) -> "JobResult":
        """The result of this configuration's FINISHED run, read from MLflow (what a sweeper optimises)."""
        if not self.world.is_main:
            return JobResult("", float("nan"), Path(), float("nan"))
        run = self.tracker.client.get_run(self.finished_run_id)
        folder = Path(run.data.tags.get("output_dir", ""))
        return JobResult.of(self.finished_run_id, run.data.metrics, folder / "checkpoints" / Path(FINAL_CHECKPOINT).name)

    def setup_teacher(self, teacher: nn.Module) -> None:
        """Fill `teacher` with trained weights and prepare its outputs (cached or online).

        Rank 0 finds or trains the teacher; when it must train one, every rank joins that job (the
        teacher trains data-parallel too) and rank 0's weights are then broadcast to all.
        """
        cfg, world = self.cfg, self.world
        pinned = self.resume_point.checkpoint.get("teacher_run_id") if self.resume_point else None
        with torch.random.fork_rng(devices=[]):  # the student's RNG stream stays untouched

            def train_teacher(job: DictConfig, folder: Path) -> str:
                if _has_epoch_checkpoint(folder):  # an interrupted attempt at this teacher: continue it
                    job.resume = str(folder)
                distributed.broadcast_object(world, ("train", OmegaConf.to_container(job)))
                return run_job(job, folder, ("(teacher trained automatically)",)).run_id

            if world.is_main:
                run_id = obtain_teacher(cfg, teacher, self.data_fingerprint, self.tracker, self.output_dir,
                                        train=train_teacher, pinned_run_id=pinned)
                distributed.broadcast_object(world, ("done", run_id))
            else:
                while True:
                    command, payload = distributed.broadcast_object(world)
                    if command == "done":
                        run_id = payload
                        break
                    run_job(OmegaConf.create(payload), self.output_dir / "teacher")
            distributed.broadcast_module(world, teacher)
            teacher.to(self.device, memory_format=self.memory_format).eval().requires_grad_(False)
            self.teacher_outputs = build_teacher_outputs(
                teacher, self.loss_fn.teacher_fields, self.data, self.device, cfg.device.precision,
                cfg.device.channels_last, self.data.augment, cfg.cache, self.augment_seed, cfg.epochs)
        self.teacher_run_id = run_id

    # --- restore --------------------------------------------------------------------------------

    def restore(self) -> int:
        """Load the resume point's state; returns the first epoch still to train."""
        if self.resume_point is None:
            return 1
        checkpoint = self.resume_point.checkpoint
        self.student.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.loss_fn.load_state_dict(checkpoint["loss"])
        restore_rng(checkpoint["rng"], {"data_order": self.data_order})
        self.best = {key: value for key, value in checkpoint["metrics"].items() if key.startswith("best/")}
        self.history = checkpoint_history(checkpoint)
        return checkpoint["epoch"] + 1

    # --- tracking -------------------------------------------------------------------------------

    def start_run(self):
        cfg, world = self.cfg, self.world
        if not world.is_main:
            return NullRun()
        if self.resume_point is not None:
            tracked = self.tracker.resume_run(self.resume_point.run_id)
        else:
            tracked = self.new_run()
        tracked.resume_hint = f"resume={self.output_dir.resolve()}"
        if cfg.tracking.system_metrics:
            tracked.start_system_metrics()
        return tracked

    def new_run(self):
        cfg, world, sweep = self.cfg, self.world, self.sweep
        is_teacher = cfg.loss.name == "ce" and cfg.model.name == cfg.teacher.model.name
        tags = {
            "role": "teacher" if is_teacher else "student",
            "model": cfg.model.name,
            "loss": cfg.loss.name,
            "config_hash": identity_hash(self.identity),
            "data_fingerprint": self.data_fingerprint,
            "device": str(self.device) if not world.active else f"{self.device.type} x{world.size} (DDP)",
            "output_dir": str(self.output_dir.resolve()),
            "overrides": " ".join(self.overrides),
        }
        if self.teacher_run_id:
            tags["teacher_run_id"] = self.teacher_run_id
        if sweep:
            tags["sweep"] = sweep
        params = {**self.params, "parameter_count": parameter_count(self.student)}
        tracked = self.tracker.start_run(self.name, tags, params, parent_run_id=self.parent_run_id)
        with tracked.failing_on_error():
            tracked.log_datasets(self.dataset_records())
        return tracked

    def dataset_records(self) -> list[DatasetRecord]:
        """Each split of the data as an MLflow dataset input, identified by the data fingerprint."""
        root = OmegaConf.select(self.cfg, "data.root")
        source = str(Path(root).resolve()) if root else "synthetic"
        return [DatasetRecord(self.cfg.data.name, self.data_fingerprint, source, context, rows, self.data.num_classes)
                for context, rows in self.data.split_sizes().items()]

    def log_start(self, tracked, first_epoch: int) -> None:
        if not self.world.is_main:
            return
        log.info("MLflow run %s (%s) in %s, experiment %s", tracked.run_id, self.name, self.tracker.uri,
                 self.cfg.tracking.experiment)
        if self.tracker.uri.startswith(("http://", "https://")):
            log.info("view it at %s", self.tracker.run_url(tracked.run_id))
        if self.resume_point is None:
            tracked.log_text(OmegaConf.to_yaml(self.resolved), "config/config.yaml")
            tracked.log_metrics({"first_layer_norm": self.init_norm}, step=0)
            log.info("%s: %d parameters, first_layer_norm at init %.4f, device %s", type(self.student).__name__,
                     parameter_count(self.student), self.init_norm, self.device)
        else:
            tracked.log_missing_epochs(self.history)

    # --- train ----------------------------------------------------------------------------------

    def train(self, tracked, first_epoch: int) -> Optional[dict]:
        """Train the remaining epochs; returns the last checkpoint state (rank 0)."""
        cfg, world = self.cfg, self.world
        trained = distributed.wrap(world, self.student, self.device)
        trained = torch.compile(trained) if cfg.device.compile else trained
        loss_call = distributed.wrap(world, self.loss_fn, self.device)
        checkpoint_dir = self.output_dir / "checkpoints"
        state = self.resume_point.checkpoint if self.resume_point else None
        for epoch in range(first_epoch, cfg.epochs + 1):
            started = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]  # the lr this epoch trains with
            self.train_batches.set_epoch(epoch)  # this epoch's augmented views
            if self.teacher_outputs is not None:
                self.teacher_outputs.start_epoch(epoch)
            metrics = train_one_epoch(trained, self.loss_fn, loss_call, self.teacher_outputs, self.optimizer,
                                      self.train_batches, epoch, cfg, self.device)
            self.scheduler.step()
            metrics = distributed.average(world, metrics)
            epoch_seconds = time.perf_counter() - started
            if not world.is_main:
                continue
            test_acc, test_loss = evaluate(self.student, self.test_batches, self.device, cfg.device.precision)
            if not math.isfinite(test_loss):  # finite training losses can still hide inf weights
                raise KDResearchError(
                    f"training diverged: test/loss is {test_loss} after epoch {epoch}; try a lower optimizer.lr"
                )
            metrics.update({
                "test/acc": test_acc, "test/loss": test_loss, "lr": lr, "epoch_seconds": epoch_seconds,
                "first_layer_norm": first_layer_norm(self.student),
            })
            if self.val_batches is not None:
                metrics.update(self.validate(epoch, test_acc))
            # The checkpoint (holding every epoch's metrics) goes first: a kill between the two
            # writes, or an outage of the tracking server, is repaired on resume by log_missing_epochs.
            self.history[epoch] = metrics
            state = self.checkpoint_state(tracked.run_id, epoch, metrics)
            interrupts.check()
            save_checkpoint(state, checkpoint_dir / f"epoch_{epoch:04d}.pt")
            keep_last(checkpoint_dir, "epoch_*.pt", cfg.checkpoint.keep_last)
            tracked.log_metrics(metrics, step=epoch, wait=False)  # kept for later while the server is away
            log.info("epoch %d/%d  train/loss %.4f  test/acc %.2f%%  test/loss %.4f  lr %.4g  %.1fs",
                     epoch, cfg.epochs, metrics["train/loss"], test_acc, test_loss, lr, epoch_seconds)
        return state

    def validate(self, epoch: int, test_acc: float) -> dict:
        """val/acc and val/loss of this epoch, and the best epoch so far chosen on val/acc (ties:
        the earlier epoch) with the test accuracy of that same epoch: the honest figure to report."""
        val_acc, val_loss = evaluate(self.student, self.val_batches, self.device, self.cfg.device.precision)
        if not self.best or val_acc > self.best["best/val_acc"]:
            self.best = {"best/val_acc": val_acc, "best/epoch": float(epoch), "best/test_acc": test_acc}
        return {"val/acc": val_acc, "val/loss": val_loss, **self.best}

    def checkpoint_state(self, run_id: str, epoch: int, metrics: dict) -> dict:
        return {
            "format": FORMAT, "model_class": model_name(self.student), "run_id": run_id,
            "teacher_run_id": self.teacher_run_id, "epoch": epoch,
            "model": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "loss": self.loss_fn.state_dict(),
            "rng": capture_rng({"data_order": self.data_order}),
            "config": OmegaConf.to_yaml(self.resolved),
            "identity": self.identity, "num_classes": self.student.num_classes, "metrics": metrics,
            "history": {str(step): values for step, values in self.history.items()},
        }

    def finish(self, tracked, state: dict) -> Path:
        """Save the final checkpoint (also as the run's artifact), the MLflow model and the
        teacher-cache tag."""
        final = self.output_dir / "checkpoints" / Path(FINAL_CHECKPOINT).name
        if self.world.is_main:
            save_checkpoint(state, final)
            tracked.log_file(final, str(Path(FINAL_CHECKPOINT).parent))
            if self.cfg.tracking.log_model:
                self.log_model(tracked)
            if self.teacher_outputs is not None:
                tracked.set_tags({"teacher_cache": "used" if self.teacher_outputs.used_cache else "online"})
        return final

    def log_model(self, tracked) -> None:
        """The trained student as an MLflow model: CPU, float32, eval mode, fed normalised images
        (the input example is two normalised test images)."""
        started = time.perf_counter()
        images = next(iter(self.test_batches))[0][:2].float().contiguous().cpu().numpy()
        model = copy.deepcopy(self.student).to("cpu", torch.float32, memory_format=torch.contiguous_format)
        tracked.log_model(model.eval(), images, registered_model_name=self.cfg.tracking.register_model)
        log.info("logged the student as MLflow model runs:/%s/model (%.1fs)", tracked.run_id,
                 time.perf_counter() - started)


def run_job(cfg: DictConfig, output_dir: Path, overrides: tuple[str, ...] = (),
            sweep: Optional[str] = None) -> JobResult:
    """Train one job as one MLflow run; `overrides` are the command-line overrides to record and
    `sweep` names the multirun the job belongs to (tag `sweep`, for filtering in compare.py and the UI)."""
    job = Job(cfg, Path(output_dir), overrides, sweep)
    job.build()
    if job.finished_run_id is not None:
        return job.earlier_result()
    first_epoch = job.restore()
    tracked = job.start_run()
    with tracked:
        job.log_start(tracked, first_epoch)
        state = job.train(tracked, first_epoch)
        final = job.finish(tracked, state)
    if not job.world.is_main:
        return JobResult("", float("nan"), final, float("nan"))
    metrics = state["metrics"]
    test_acc = metrics["test/acc"]
    if "best/epoch" in metrics:
        log.info("finished %s: test/acc %.2f%%; best epoch on validation %d (val/acc %.2f%%, test/acc %.2f%%) "
                 "(run %s)", job.name, test_acc, metrics["best/epoch"], metrics["best/val_acc"],
                 metrics["best/test_acc"], tracked.run_id)
    else:
        log.info("finished %s: test/acc %.2f%% (run %s)", job.name, test_acc, tracked.run_id)
    return JobResult.of(tracked.run_id, metrics, final)


def checkpoint_history(checkpoint: dict) -> dict[int, dict]:
    """{epoch: metrics} of every epoch a checkpoint has seen (only its own epoch for checkpoints
    written before histories were kept)."""
    history = checkpoint.get("history") or {str(checkpoint["epoch"]): checkpoint["metrics"]}
    return {int(step): dict(values) for step, values in history.items()}


def _has_epoch_checkpoint(job_folder: Path) -> bool:
    return any((job_folder / "checkpoints").glob("epoch_*.pt"))


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
