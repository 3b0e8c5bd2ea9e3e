"""The loss contract: what a loss is given, what it returns, and how it prepares for a pair.

A loss is an `nn.Module` called as `loss(student, teacher, labels, progress)`:
- `student` / `teacher` are `ModelOutputs` (teacher is None for losses without a teacher; a
  cached teacher carries only the fields in `teacher_fields`);
- `progress` says where training is (epoch, step, their totals) and which training samples the
  batch holds (`index`), for losses that change over epochs (warm-ups) or keep per-sample state
  (memory banks); it may be None in unit tests of losses that do not read it;
- it returns `(total, parts)`: the loss to minimise and a dict of unweighted terms, logged as
  `train/<name>`.

A loss that reads several augmented views of each image lists them in `views` (e.g. ("weak",
"strong"), kdresearch.data.views); it is then given `student` and `teacher` as {view:
ModelOutputs}, the student run on each view and the teacher's outputs on each (cached per view).
The others (`views = ()`) see the one training view as above.

Before training, `bind(student, teacher, train_size=N, train_labels=labels)` gets the two models'
shape facts (`kdresearch.models.Network`) and the training set's size and labels (int64, (N,), in
the order of `progress.index`; None in unit tests of losses that do not read them): a loss checks
that the pair can feed it (raising one line that names both models and their shapes), creates
modules sized from the pair (connectors, embedding heads) and buffers (memory banks), and sets
`teacher_fields`. Everything it creates is in
`state_dict()` (so in checkpoints, and resume is exact) and its parameters are trained with the
student's (`loss.parameters()`). `bind` runs on the student's RNG stream right after the student
is built, so a run's initial weights depend on the seed alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from kdresearch.config import validators
from kdresearch.errors import KDResearchError
from kdresearch.models import ModelOutputs, Network


@dataclass(frozen=True)
class Progress:
    """Where training stands when a loss is called."""

    epoch: int  # 1-based epoch being trained
    step: int  # 1-based step within the epoch
    epochs: int
    steps_per_epoch: int
    index: Optional[torch.Tensor] = None  # (N,) positions of the batch's samples in the training set


def number(name: str, value, *, positive: bool = False) -> float:
    """A user-typed loss hyperparameter: a finite number >= 0 (> 0 with `positive`)."""
    return validators.number(name, value, above=0) if positive else validators.number(name, value, at_least=0)


# Softened distributions softmax(z / T) reach their large-T limit (every distillation term then
# matches centred logits) to within 0.1 % by T = 100, so a larger T changes nothing but float32
# rounding, which grows with T^2: soft-target KD's term is off by 3 % at T = 1e4, noise of either
# sign from 1e5, and exactly 0 from about 1e8, where softmax(z / T) is uniform to float precision
# and the job silently trains on cross-entropy alone. Temperatures above this are refused.
MAX_TEMPERATURE = 100


def temperature(name: str, value) -> float:
    """A user-typed distillation temperature: a number in (0, MAX_TEMPERATURE]."""
    value = number(name, value, positive=True)
    return validators.number(name, value, at_most=MAX_TEMPERATURE,
                             note="beyond, the term is its large-T limit plus float32 rounding noise, 0 from about 1e8")


def pair_error(loss_name: str, problem: str, student: Network, teacher: Network) -> KDResearchError:
    """One line naming the loss, what does not fit, and both models with their shapes."""
    return KDResearchError(
        f"loss={loss_name}: {problem}; student {student.describe()}, teacher {teacher.describe()}"
    )


class TrainingLoss(nn.Module):
    """Base of every loss. Subclasses set `needs_teacher` / `student_features` and implement
    `forward`; those with a teacher set `teacher_fields` (here or in `bind`)."""

    needs_teacher: bool = False
    student_features: bool = False  # the student's forward must return ModelOutputs, not logits
    # ModelOutputs fields read from the teacher: "logits", "embedding", "hidden", "stage<i>",
    # "preact_stage<i>" (the stage before its final ReLU).
    teacher_fields: tuple[str, ...] = ()
    views: tuple[str, ...] = ()  # several augmented views of each image (module docstring); (): the one view

    def bind(self, student: Network, teacher: Optional[Network], *, train_size: int = 0,
             train_labels: Optional[torch.Tensor] = None) -> None:
        """Check the pair and size what the loss owns; see the module docstring."""
        if self.needs_teacher and "logits" in self.teacher_fields and student.num_classes != teacher.num_classes:
            raise pair_error(self.loss_name(), f"teacher and student need the same classes "
                             f"({teacher.num_classes} vs {student.num_classes})", student, teacher)

    def check_epochs(self, epochs: int) -> None:
        """Refuse a job length this loss cannot train (e.g. one its init stage fills); called with
        the config checks, before anything starts. Most losses fit any length."""

    def loss_name(self) -> str:
        return type(self).__name__

    def forward(self, student: ModelOutputs, teacher: Optional[ModelOutputs], labels: torch.Tensor,
                progress: Optional[Progress] = None):
        raise NotImplementedError


class WeightedDistillation(TrainingLoss):
    """total = ce_weight * CE(student, labels) + distill_weight * <distillation term>."""

    needs_teacher = True
    part_name: str

    def __init__(self, ce_weight: float = 0.75, distill_weight: float = 0.25):
        super().__init__()
        self.ce_weight = number("loss.ce_weight", ce_weight)
        self.distill_weight = number("loss.distill_weight", distill_weight)

    def loss_name(self) -> str:
        return self.part_name

    def distillation_term(self, student: ModelOutputs, teacher: ModelOutputs,
                          progress: Optional[Progress]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, student, teacher, labels, progress=None):
        ce = nn.functional.cross_entropy(student.logits, labels)
        term = self.distillation_term(student, teacher, progress)
        total = self.ce_weight * ce + self.distill_weight * term
        return total, {"ce": ce, self.part_name: term}
