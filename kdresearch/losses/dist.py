"""DIST (Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher",
NeurIPS 2022), as the authors' code computes it (hunto/image_classification_sota
`lib/models/losses/dist_kd.py`, the classification code the DIST_KD repository points to).

Instead of matching the teacher's probabilities exactly (KL), DIST matches their relations, with
Pearson correlation, which ignores shifts and scales of the probability vectors. With
Y^s = softmax(z_s / T), Y^t = softmax(z_t / T), both (N, C):

    rho(a, b)   = <a - mean a, b - mean b> / (||a - mean a|| * ||b - mean b|| + 1e-8)
    inter       = T^2 * (1 - 1/N * sum_n rho(Y^s[n, :], Y^t[n, :]))   each sample's row over classes
    intra       = T^2 * (1 - 1/C * sum_c rho(Y^s[:, c], Y^t[:, c]))   each class's column over the batch
    total       = ce_weight * CE(z_s, y) + beta * inter + gamma * intra

The 1e-8 is added to the product of the two norms, not inside a square root, as in the official
`cosine_similarity(a, b, eps=1e-8)`; and each relation term is multiplied by T^2 separately
(`inter_loss = tau**2 * inter_class_relation(...)`, same for intra) before beta / gamma. The
paper calls the temperature tau; here it is `T`, like the other logit losses (run names show it).

Defaults: beta = gamma = 1 (the official code's and the paper's ImageNet setting, where tau = 1),
T 4 (the usual CIFAR-100 temperature), ce_weight 1.

The intra-class term correlates each class's probabilities across the batch, so it depends on
the batch: with one sample it has nothing to correlate (rho = 0 by the epsilon, intra = T^2), and
under data-parallel training each process correlates its own shard, as the official code does.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from kdresearch.losses.base import TrainingLoss, number, temperature

PEARSON_EPS = 1e-8  # the official code's: keeps a constant row/column at correlation 0, not 0/0


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of `a` with the same row of `b`: (N, K) -> (N,)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + PEARSON_EPS)


def dist_relations(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(inter, intra): T^2 * (1 - mean row correlation), T^2 * (1 - mean column correlation)."""
    student = F.softmax(student_logits.float() / T, dim=1)
    teacher = F.softmax(teacher_logits.float() / T, dim=1)
    inter = T**2 * (1 - pearson_rows(student, teacher).mean())
    intra = T**2 * (1 - pearson_rows(student.t(), teacher.t()).mean())
    return inter, intra


class DIST(TrainingLoss):
    """ce_weight * CE + beta * inter + gamma * intra; module docstring.

    Logged parts: "ce", "dist_inter", "dist_intra" (unweighted, T^2-scaled) and "dist"
    (beta * inter + gamma * intra).
    """

    needs_teacher = True
    teacher_fields = ("logits",)

    def __init__(self, T: float = 4.0, beta: float = 1.0, gamma: float = 1.0, ce_weight: float = 1.0):
        super().__init__()
        self.T = temperature("loss.T", T)
        self.beta = number("loss.beta", beta)
        self.gamma = number("loss.gamma", gamma)
        self.ce_weight = number("loss.ce_weight", ce_weight)

    def loss_name(self) -> str:
        return "dist"

    def forward(self, student, teacher, labels, progress=None):
        ce = F.cross_entropy(student.logits, labels)
        inter, intra = dist_relations(student.logits, teacher.logits, self.T)
        dist = self.beta * inter + self.gamma * intra
        total = self.ce_weight * ce + dist
        return total, {"ce": ce, "dist_inter": inter, "dist_intra": intra, "dist": dist}
