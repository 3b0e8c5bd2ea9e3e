"""What a run spent, so that a comparison can tell methods trained for the same budget from ones
that were not: epochs, optimizer steps, images seen, distinct augmented views per image, the
teacher's forward passes and the outputs read from its cache instead, wall time and device-hours.
They are logged as MLflow metrics `budget/*` at the end of the run (kdresearch.training.job).

Counts follow from the data and the epochs trained, and from the teacher-output classes' counters
(kdresearch.teacher.outputs.TeacherCounts), which count on the host: nothing here reads from the
device during training. Wall time and teacher counts of a job stopped and resumed add up over its
attempts (the checkpoint keeps the totals so far); under torchrun the teacher counts are summed
over the ranks. The wall time runs from the job's start to its end, less an automatic teacher
trained inside it (that teacher's run has its own budget).
"""

from __future__ import annotations

import time
from typing import Optional

from kdresearch.runtime import distributed
from kdresearch.teacher.outputs import TeacherCounts

PREFIX = "budget/"
# What the recipe fixes, so that runs to be compared should share it; the others (teacher passes,
# wall time, device-hours) are what the run cost, and differ between methods by nature.
TRAINING_BUDGET = ("epochs", "steps", "images", "views_per_image")


class Budget:
    """The clock and the teacher counts of one job, including its earlier attempts."""

    def __init__(self, world: distributed.World, started: float):
        """`started`: time.perf_counter() when this attempt of the job began."""
        self.world, self.started = world, started
        self.earlier = {"wall_seconds": 0.0, "teacher_forwards": 0.0, "teacher_cache_hits": 0.0}

    def restore(self, totals: Optional[dict]) -> None:
        """Continue from a checkpoint's totals (`totals`; None for a checkpoint from before budgets)."""
        if totals:
            self.earlier.update({key: float(totals.get(key, 0.0)) for key in self.earlier})

    def totals(self, counts: Optional[TeacherCounts]) -> dict[str, float]:
        """Wall seconds and teacher counts so far, over every attempt and rank; every rank calls it
        (under torchrun it sums over the ranks)."""
        mine = {"teacher_forwards": float(counts.forwards if counts else 0),
                "teacher_cache_hits": float(counts.cache_hits if counts else 0)}
        summed = {key: value * self.world.size for key, value in distributed.average(self.world, mine).items()}
        return {
            "wall_seconds": self.earlier["wall_seconds"] + time.perf_counter() - self.started,
            "teacher_forwards": self.earlier["teacher_forwards"] + summed["teacher_forwards"],
            "teacher_cache_hits": self.earlier["teacher_cache_hits"] + summed["teacher_cache_hits"],
        }

    def metrics(self, totals: dict[str, float], epochs: int, steps_per_epoch: int, train_images: int,
                augmented: bool, views: int = 1) -> dict[str, float]:
        """The run's `budget/*` metrics after `epochs` epochs, from `totals` (Budget.totals); `views`:
        the augmented views of each image a step trains on (2 for a weak and a strong view)."""
        wall_hours = totals["wall_seconds"] / 3600
        return {f"{PREFIX}{key}": float(value) for key, value in {
            "epochs": epochs,
            "steps": epochs * steps_per_epoch,  # optimizer steps (every rank takes each of them)
            "images": epochs * train_images,  # training images seen, over all ranks
            "views_per_image": epochs * views if augmented else 1,  # fresh augmented views every epoch
            "teacher_forwards": totals["teacher_forwards"],  # images the teacher ran forward on
            "teacher_cache_hits": totals["teacher_cache_hits"],  # images whose outputs came from the cache
            "wall_hours": wall_hours,
            "device_hours": self.world.size * wall_hours,
        }.items()}
