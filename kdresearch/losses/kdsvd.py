"""KD-SVD (Lee, Kim & Song, "Self-supervised Knowledge Distillation Using Singular Value
Decomposition", ECCV 2018), as the CIFAR benchmark suites port it (RepDistiller
`distiller_zoo/KDSVD.py`, mdistiller `distillers/KDSVD.py`; the original is the authors'
TensorFlow code, sseung0703/SSKD_SVD).

Each stage's feature map F (C, H, W) of a sample is read as the matrix X = (H*W) x C, and its
top right singular vectors (directions in channel space) summarise the stage. Per sample, with
svd_k(X) the first k singular values (L2-normalised as a k-vector) and right singular vectors
(each L2-normalised):

    s_t, V_t  = svd_k(X_t)                       the teacher's k vectors, (C, k)
    V_s       = align(svd_{k+3}(X_s), V_t)       for each teacher vector, the student's vector
                                                 (of its first k + 3) with the largest |cosine|,
                                                 times the cosine's sign

(a map with fewer singular vectors than asked, min(H*W, C), gives all it has, as the suites do)
    W         = V * s_t                          both scaled by the teacher's singular values
    G^j[a, b, i] = exp(-(W^j[a, i] - W^{j-1}[b, i])^2 / 8)     RBF between stage j and the stage before
    kdsvd     = sum_{j >= 1} 1/N * sum_n sum_{a, b, i} (G_s^j - G_t^j)^2

    total     = ce_weight * CE + distill_weight * kdsvd

So the student is taught how the dominant channel directions of consecutive stages relate, not the
maps themselves. Defaults are the suites' (k 1, both weights 1; mdistiller `engine/cfg.py` KDSVD,
RepDistiller `KDSVD()` with `-b 1`); stages are the stage outputs after the stem, zipped from the
first (RepDistiller `feat[1:-1]`, mdistiller `feats[1:]`), which is our `stages`.

X is (H*W) x C as in the paper, the original code and RepDistiller (`view(N, C, H*W)` then
transposed). mdistiller's port views the NCHW map as (C*H) x W instead, so its "singular vectors"
live along the image width; that is not followed. Because the student's vectors are compared with
the teacher's (the cosines of `align`), each stage pair must have the same channel count, which
`bind` checks; the spatial sizes may differ.

The suites zero non-finite SVD outputs and loss entries (a workaround for old torch SVDs); with
finite features torch's SVD is finite, so that is not repeated. What is guarded is the backward
pass: a sample whose top singular values coincide (an all-zero map, say) has no defined
singular-vector gradient and torch returns NaN there, which would poison every weight at the next
step. Such a sample's gradient is zeroed instead (`_finite_gradient_per_sample`); with distinct
singular values, as in practice, nothing changes. A singular vector's sign is arbitrary: the
student's are aligned to the teacher's, the teacher's are as LAPACK returns them, as in the suites.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F

from kdresearch.config import validators
from kdresearch.losses.base import WeightedDistillation, pair_error
from kdresearch.models import stage_field

RBF_WIDTH = 8.0  # the suites' exp(-d^2 / 8)
STUDENT_EXTRA_VECTORS = 3  # the student offers k + 3 vectors to align with the teacher's k


def _finite_gradient_per_sample(grad: torch.Tensor) -> torch.Tensor:
    """The gradient with every sample that has a non-finite entry set to 0 (module docstring)."""
    finite = torch.isfinite(grad).flatten(1).all(dim=1)
    return torch.where(finite.view(-1, *([1] * (grad.dim() - 1))), grad, torch.zeros_like(grad))


def singular_directions(feature_map: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, V): per sample, the first k singular values of X = (H*W) x C as one L2-normalised
    k-vector, (N, k), and the k right singular vectors, each L2-normalised, (N, C, k). A map with
    fewer than k singular vectors (it has min(H*W, C)) gives all it has, as the suites' slicing does.

    In float32: under autocast the maps may arrive in bf16/fp16, for which torch has no SVD.
    """
    n, c = feature_map.shape[:2]
    x = feature_map.float().reshape(n, c, -1).transpose(1, 2)
    if x.requires_grad:
        x.register_hook(_finite_gradient_per_sample)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    return F.normalize(s[:, :k], dim=1), F.normalize(vh[:, :k].transpose(1, 2), dim=1)


def align_to_teacher(student_v: torch.Tensor, teacher_v: torch.Tensor) -> torch.Tensor:
    """For each teacher vector (column of teacher_v, (N, C, k)), the student vector (column of
    student_v, (N, C, m)) with the largest |cosine| to it, times the cosine's sign: (N, C, k).
    Ties in |cosine| (measure zero) would sum the tied vectors, as in the suites."""
    cosine = student_v.transpose(1, 2) @ teacher_v  # (N, m, k)
    best = cosine.abs() == cosine.abs().amax(dim=1, keepdim=True)
    return student_v @ torch.where(best, cosine.sign(), torch.zeros_like(cosine))


def rbf(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """exp(-(current[:, a, i] - previous[:, b, i])^2 / 8): (N, C_j, k), (N, C_{j-1}, k) -> (N, C_j, C_{j-1}, k)."""
    return torch.exp(-(current.unsqueeze(2) - previous.unsqueeze(1)).pow(2) / RBF_WIDTH)


def kdsvd_loss(student_stages: Sequence[torch.Tensor], teacher_stages: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """sum over consecutive stage pairs of 1/N * sum (RBF_student - RBF_teacher)^2; module docstring."""
    terms = []
    previous_s = previous_t = None
    for f_s, f_t in zip(student_stages, teacher_stages):
        s_t, v_t = singular_directions(f_t, k)
        _, v_s = singular_directions(f_s, k + STUDENT_EXTRA_VECTORS)
        v_s = align_to_teacher(v_s, v_t)
        scale = s_t.unsqueeze(1)  # both sides scaled by the teacher's singular values
        v_s, v_t = v_s * scale, v_t * scale
        if previous_s is not None:
            difference = rbf(v_s, previous_s) - rbf(v_t, previous_t).detach()
            terms.append(difference.pow(2).sum() / f_s.size(0))
        previous_s, previous_t = v_s, v_t
    return torch.stack(terms).sum()


class KDSVD(WeightedDistillation):
    """ce_weight * CE + distill_weight * kdsvd_loss(student stages, teacher stages, k).

    `bind` pairs the stages from the first (as many as the shallower model has), checks that the
    pair can feed the loss (two stage pairs at least, equal channels per pair) and asks the
    teacher for exactly those stages. Owns no parameters.
    """

    student_features = True
    part_name = "kdsvd"

    def __init__(self, k: int = 1, ce_weight: float = 1.0, distill_weight: float = 1.0):
        super().__init__(ce_weight, distill_weight)
        self.k = validators.integer("loss.k", k, at_least=1, note="the teacher's singular vectors per stage")
        self.pairs = None

    def bind(self, student, teacher, *, train_size=0, train_labels=None):
        super().bind(student, teacher, train_size=train_size, train_labels=train_labels)
        pairs = min(len(student.stage_channels), len(teacher.stage_channels))
        if pairs < 2:
            raise pair_error("kdsvd", "KD-SVD relates consecutive stages and needs two stages in each model",
                             student, teacher)
        for index in range(pairs):
            s_channels, t_channels = student.stage_channels[index], teacher.stage_channels[index]
            if s_channels != t_channels:
                raise pair_error("kdsvd", f"stage {index} has {s_channels} channels in the student and {t_channels} "
                                 f"in the teacher; KD-SVD compares singular vectors over channels, so every "
                                 f"paired stage needs the same channel count", student, teacher)
        self.pairs = pairs
        self.teacher_fields = tuple(stage_field(i) for i in range(pairs))

    def distillation_term(self, student, teacher, progress=None):
        return kdsvd_loss(student.stages[:self.pairs], teacher.stages[:self.pairs], self.k)
