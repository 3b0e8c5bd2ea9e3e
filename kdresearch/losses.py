"""Training losses: plain cross-entropy, multi-class hinge, and the tutorial's three distillation losses.

Every loss is an `nn.Module` called as `loss(student, teacher, labels)` with the models'
`ModelOutputs` (teacher is None for losses without a teacher) and returns
`(total, parts)`, where `parts` maps a short name to the unweighted term, for logging as
`train/<name>`. Losses that own parameters (the regressor) expose them through `parameters()`,
so the trainer optimises `student.parameters()` and `loss.parameters()` together.

Class attributes tell the trainer what to prepare:
- `teacher_fields`: which `ModelOutputs` fields of the teacher the loss reads (empty: no teacher);
- `student_features`: whether the student must also return `hidden` / `feature_map`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from kdresearch.errors import KDResearchError
from kdresearch.models import ModelOutputs


def _number(name: str, value, *, positive: bool = False) -> float:
    """Validate a user-typed loss hyperparameter (Hydra passes strings like 'abc' through)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise KDResearchError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise KDResearchError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise KDResearchError(f"{name} must be > 0, got {value:g}")
    if not positive and value < 0:
        raise KDResearchError(f"{name} must be >= 0, got {value:g}")
    return value


class TrainingLoss(nn.Module):
    teacher_fields: tuple[str, ...] = ()
    student_features: bool = False

    @property
    def needs_teacher(self) -> bool:
        return bool(self.teacher_fields)

    def check_models(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        """Raise KDResearchError before training when the models cannot feed this loss."""

    def forward(self, student: ModelOutputs, teacher: Optional[ModelOutputs], labels: torch.Tensor):
        raise NotImplementedError


class CrossEntropy(TrainingLoss):
    """total = CE(student logits, labels): the teacher and the student-CE baseline."""

    def forward(self, student, teacher, labels):
        ce = F.cross_entropy(student.logits, labels)
        return ce, {"ce": ce}


class MultiMargin(TrainingLoss):
    """total = torch.nn.MultiMarginLoss(p, margin, weight)(student logits, labels).

    Per sample: sum over i != y of max(0, margin - x[y] + x[i])^p * weight[y] / num_classes.
    """

    def __init__(self, p: int = 1, margin: float = 1.0, weight: Optional[Sequence[float]] = None):
        super().__init__()
        margin = _number("loss.margin", margin, positive=True)
        weight_tensor = None
        if weight is not None:
            weight_tensor = torch.tensor([_number("loss.weight[i]", w) for w in weight])
        try:
            self.criterion = nn.MultiMarginLoss(p=p, margin=margin, weight=weight_tensor)
        except ValueError as error:  # torch refuses p other than 1 or 2
            raise KDResearchError(f"loss=multimargin: {error} (got loss.p={p!r})") from None

    def check_models(self, student, teacher):
        weight = self.criterion.weight
        num_classes = student.classifier[-1].out_features
        if weight is not None and weight.numel() != num_classes:
            raise KDResearchError(
                f"loss.weight has {weight.numel()} entries but the model has {num_classes} classes"
            )

    def forward(self, student, teacher, labels):
        hinge = self.criterion(student.logits, labels)
        return hinge, {"multimargin": hinge}


class _WeightedDistillation(TrainingLoss):
    """total = ce_weight * CE(student, labels) + distill_weight * <distillation term>."""

    part_name: str

    def __init__(self, ce_weight: float = 0.75, distill_weight: float = 0.25):
        super().__init__()
        self.ce_weight = _number("loss.ce_weight", ce_weight)
        self.distill_weight = _number("loss.distill_weight", distill_weight)

    def distillation_term(self, student: ModelOutputs, teacher: ModelOutputs) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, student, teacher, labels):
        ce = F.cross_entropy(student.logits, labels)
        term = self.distillation_term(student, teacher)
        total = self.ce_weight * ce + self.distill_weight * term
        return total, {"ce": ce, self.part_name: term}


class SoftTargetKD(_WeightedDistillation):
    """Hinton et al.'s soft-target loss, as in the tutorial (batch mean, scaled by T^2):

        kd = T^2 / N * sum_n sum_c softmax(t_n/T)_c * (log softmax(t_n/T)_c - log softmax(s_n/T)_c)

    The teacher's log-probabilities come from log_softmax rather than softmax().log(): the same
    value, but it stays finite when a probability underflows to 0 at low T.
    """

    teacher_fields = ("logits",)
    part_name = "kd"

    def __init__(self, T: float = 2.0, ce_weight: float = 0.75, distill_weight: float = 0.25):
        super().__init__(ce_weight, distill_weight)
        self.T = _number("T", T, positive=True)

    def check_models(self, student, teacher):
        s_classes = student.classifier[-1].out_features
        t_classes = teacher.classifier[-1].out_features
        if s_classes != t_classes:
            raise KDResearchError(
                f"loss=kd needs teacher and student with the same classes ({t_classes} vs {s_classes})"
            )

    def distillation_term(self, student, teacher):
        teacher_log_probs = F.log_softmax(teacher.logits / self.T, dim=-1)
        student_log_probs = F.log_softmax(student.logits / self.T, dim=-1)
        kl = torch.sum(teacher_log_probs.exp() * (teacher_log_probs - student_log_probs))
        return kl / student.logits.size(0) * self.T**2


class CosineHidden(_WeightedDistillation):
    """The tutorial's cosine loss on the flattened conv outputs:

        cosine = mean_n (1 - cos(student_hidden_n, avg_pool1d(teacher_hidden_n, k)))

    i.e. CosineEmbeddingLoss with target +1; k = teacher dim / student dim (2048 / 1024 = 2).
    """

    teacher_fields = ("hidden",)
    student_features = True
    part_name = "cosine"

    def check_models(self, student, teacher):
        s_dim, t_dim = student.hidden_dim, teacher.hidden_dim
        if t_dim % s_dim != 0:
            raise KDResearchError(
                f"loss=cosine needs a teacher hidden size that is a multiple of the student's "
                f"(teacher {type(teacher).__name__}: {t_dim}, student {type(student).__name__}: {s_dim})"
            )

    def distillation_term(self, student, teacher):
        teacher_hidden = teacher.hidden
        pool = teacher_hidden.size(1) // student.hidden.size(1)
        if pool > 1:
            teacher_hidden = F.avg_pool1d(teacher_hidden, pool)
        similarity = F.cosine_similarity(student.hidden, teacher_hidden, dim=1, eps=1e-8)
        return (1 - similarity).mean()


class RegressorMSE(_WeightedDistillation):
    """The tutorial's hint loss: a trainable Conv2d(in, out, 3, padding=1) maps the student's last
    feature map onto the teacher's, and

        regressor = MSE(regressor(student_map), teacher_map)

    The regressor belongs to the loss, so the student network (and its checkpoint) stays a plain
    LightNN; the optimizer trains it through `loss.parameters()`.
    """

    teacher_fields = ("feature_map",)
    student_features = True
    part_name = "regressor"

    def __init__(self, in_channels: int = 16, out_channels: int = 32,
                 ce_weight: float = 0.75, distill_weight: float = 0.25):
        super().__init__(ce_weight, distill_weight)
        self.regressor = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)

    def check_models(self, student, teacher):
        expected = (self.regressor.in_channels, self.regressor.out_channels)
        found = (student.feature_channels, teacher.feature_channels)
        if expected != found or student.feature_size != teacher.feature_size:
            raise KDResearchError(
                f"loss=regressor maps {expected[0]} student channels to {expected[1]} teacher channels, "
                f"but student {type(student).__name__} has {found[0]}x{student.feature_size}x"
                f"{student.feature_size} and teacher {type(teacher).__name__} has {found[1]}x"
                f"{teacher.feature_size}x{teacher.feature_size}"
            )

    def distillation_term(self, student, teacher):
        return F.mse_loss(self.regressor(student.feature_map), teacher.feature_map)
