"""The teacher a distillation job trains with: its weights found, trained or loaded, the same on
every data-parallel rank, and what the loss reads from it made ready (online or cached).

Where the weights come from is `kdresearch.teacher.sources.obtain_teacher`'s choice (a file, an
MLflow run, a matching finished run). When no finished run fits, the teacher is trained first as a
job of its own in the student's job folder, `teacher/` (a job started there before, by a stopped
attempt, continues as `resume=` continues any job). Under torchrun every rank joins that job, so
the teacher trains data-parallel too: rank 0, which alone talks to MLflow, decides and tells the
other ranks what to train; at the end every rank holds rank 0's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdresearch.data.splits import Dataset
from kdresearch.layout import JobFolder
from kdresearch.runtime import distributed
from kdresearch.teacher.outputs import CachedTeacher, OnlineTeacher, ViewsTeacher, teacher_outputs
from kdresearch.teacher.provenance import TeacherSource, weight_digest
from kdresearch.teacher.sources import obtain_teacher
from kdresearch.training.resume import job_started

AUTOMATIC = "(teacher trained automatically)"  # the teacher job's `overrides` tag
TRAIN, DONE = "train", "done"  # what rank 0 tells the other ranks: join this teacher job / the teacher is there

# run_job(cfg, output_dir, overrides) of kdresearch.training.job, which trains the teacher's job
# (passed in: that module calls this one).
TrainJob = Callable[..., object]


@dataclass
class TeacherInUse:
    """The frozen teacher (on the device, in eval mode), its outputs as the loss reads them, where
    its weights came from and their digest (kdresearch.teacher.provenance)."""

    model: nn.Module
    outputs: Union[OnlineTeacher, CachedTeacher, ViewsTeacher]
    source: TeacherSource
    digest: str

    @property
    def run_id(self) -> Optional[str]:
        """The MLflow run its weights came from (None when unknown, e.g. a file from elsewhere)."""
        return self.source.run_id


def provide_teacher(cfg: DictConfig, teacher: nn.Module, fields: tuple[str, ...], data: Dataset,
                    data_fingerprint: str, tracker, folder: JobFolder, world: distributed.World,
                    device: torch.device, memory_format: torch.memory_format, augment_seed: int,
                    pinned_run_id: Optional[str], train_job: TrainJob, views: tuple[str, ...] = ()) -> TeacherInUse:
    """Fill the teacher architecture `teacher` (built and bound to the loss) with trained weights and
    prepare the `fields` the loss reads from it (on each of `views`, for a loss reading several).
    `pinned_run_id` (a resumed job's teacher) wins over the automatic search, so a continuation
    never switches to a newer teacher."""
    with torch.random.fork_rng(devices=[]):  # the student's RNG stream stays untouched
        source = _weights_on_every_rank(cfg, teacher, data_fingerprint, tracker, folder, world,
                                        pinned_run_id, train_job)
        distributed.broadcast_module(world, teacher)
        digest = weight_digest(teacher)
        teacher.to(device, memory_format=memory_format).eval().requires_grad_(False)
        outputs = teacher_outputs(teacher, fields, data, device, cfg.device.precision, cfg.device.channels_last,
                                  data.augment, cfg.cache, augment_seed, cfg.epochs, views)
    return TeacherInUse(teacher, outputs, source, digest)


def _weights_on_every_rank(cfg: DictConfig, teacher: nn.Module, data_fingerprint: str, tracker,
                           folder: JobFolder, world: distributed.World, pinned_run_id: Optional[str],
                           train_job: TrainJob) -> TeacherSource:
    """Rank 0 obtains the weights and returns where they came from; when it has to train the
    teacher, it first sends (TRAIN, the teacher job's config) so that the other ranks run that job
    with it, and at the end (DONE, the source)."""
    if not world.is_main:
        while True:
            command, payload = distributed.broadcast_object(world)
            if command == DONE:
                return payload
            train_job(OmegaConf.create(payload), folder.teacher.path)

    def train_teacher(job: DictConfig) -> str:
        if job_started(folder.teacher, tracker):  # an earlier attempt at this teacher: continue it
            # (one killed in its first epoch may have left its MLflow run but not yet its folder)
            folder.teacher.path.mkdir(parents=True, exist_ok=True)
            job.resume = str(folder.teacher.path)
        distributed.broadcast_object(world, (TRAIN, OmegaConf.to_container(job)))
        return train_job(job, folder.teacher.path, (AUTOMATIC,)).run_id

    source = obtain_teacher(cfg, teacher, data_fingerprint, tracker, train=train_teacher, pinned_run_id=pinned_run_id)
    distributed.broadcast_object(world, (DONE, source))
    return source
