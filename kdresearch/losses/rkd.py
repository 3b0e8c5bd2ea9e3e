"""Relational knowledge distillation (Park, Kim, Lu & Cho, "Relational Knowledge Distillation",
CVPR 2019), distance and angle terms on the models' embeddings, as the CIFAR benchmark suites
compute it (RepDistiller `distiller_zoo/RKD.py`, mdistiller `distillers/RKD.py`, both from the
authors' code; torchdistill's RKDLoss with reduction='mean' is the same formula).

The student matches the geometry of the teacher's embeddings within the batch, not the
embeddings themselves. With e_i the flattened embedding of sample i (student s, teacher t):

    d_ij      = sqrt(max(||e_i||^2 + ||e_j||^2 - 2 <e_i, e_j>, 1e-12)),  d_ii = 0
    psi_D     = d / mean{d_ij : d_ij > 0}                 distances relative to the batch's mean
    distance  = smooth_l1(psi_D(s), psi_D(t))              mean over the N x N entries
    psi_A_ijk = <normalise(e_j - e_i), normalise(e_k - e_i)>   cosine of the angle at i
    angle     = smooth_l1(psi_A(s), psi_A(t))              mean over the N x N x N entries
    rkd       = distance_weight * distance + angle_weight * angle

    total = ce_weight * CE(student logits, labels) + distill_weight * rkd

smooth_l1 is Huber with threshold 1 (torch's default beta). Defaults are the suites' CIFAR-100
ones: distance_weight 25, angle_weight 50 (the paper's), distill_weight 1, CE weight 1, on the
pooled penultimate features (RepDistiller `feat[-1]`, mdistiller `pooled_feat`: our `embedding`).
Only relations are compared, so the embeddings may differ in size: every pair can be served.

A batch of one sample has no pair: its distance term would be the mean of no distances (NaN in
the suites' code, which a partial last batch of one sample would hit); here it is 0. The angle
term of one sample is 0 anyway. Logged parts: "ce", "rkd_distance", "rkd_angle" (unweighted) and
"rkd" (their weighted sum).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from kdresearch.losses.base import WeightedDistillation, number
from kdresearch.losses.relations import computed_in_float32

DISTANCE_EPS = 1e-12  # the authors': squared distances are clamped to it before the square root


def pairwise_distances(e: torch.Tensor, eps: float = DISTANCE_EPS) -> torch.Tensor:
    """(N, D) -> (N, N) Euclidean distances from the expansion of ||e_i - e_j||^2 (as the authors),
    clamped at eps before the square root, the diagonal set to 0 (value and gradient)."""
    squared_norms = e.pow(2).sum(dim=1)
    squared = (squared_norms[:, None] + squared_norms[None, :] - 2 * e @ e.t()).clamp(min=eps)
    diagonal = torch.eye(e.size(0), dtype=torch.bool, device=e.device)
    return squared.sqrt().masked_fill(diagonal, 0.0)


def relative_distances(e: torch.Tensor) -> torch.Tensor:
    """pairwise_distances divided by their mean over the positive entries (the off-diagonal ones)."""
    d = pairwise_distances(e)
    return d / d[d > 0].mean()


def angles(e: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N^3,): cos of the angle at e_i between e_j and e_k, flattened in (i, j, k) order."""
    directions = F.normalize(e[None, :, :] - e[:, None, :], p=2.0, dim=2)  # [i, j] = normalise(e_j - e_i)
    return torch.bmm(directions, directions.transpose(1, 2)).flatten()


@computed_in_float32
def rkd_terms(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, angle): smooth-L1 between the student's and the teacher's relative distances and
    angles. The teacher's are targets, without gradient (the authors compute them under no_grad)."""
    student, teacher = student_embedding.flatten(1), teacher_embedding.detach().flatten(1)
    if student.size(0) < 2:  # no pair of samples: nothing to relate
        distance = student.new_zeros(())
    else:
        distance = F.smooth_l1_loss(relative_distances(student), relative_distances(teacher))
    angle = F.smooth_l1_loss(angles(student), angles(teacher))
    return distance, angle


class RelationalKD(WeightedDistillation):
    """ce_weight * CE + distill_weight * (distance_weight * distance + angle_weight * angle); module
    docstring. Owns no parameters."""

    student_features = True
    teacher_fields = ("embedding",)
    part_name = "rkd"

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, ce_weight: float = 1.0,
                 distill_weight: float = 1.0):
        super().__init__(ce_weight, distill_weight)
        self.distance_weight = number("loss.distance_weight", distance_weight)
        self.angle_weight = number("loss.angle_weight", angle_weight)

    def forward(self, student, teacher, labels, progress=None):
        ce = F.cross_entropy(student.logits, labels)
        distance, angle = rkd_terms(student.embedding, teacher.embedding)
        rkd = self.distance_weight * distance + self.angle_weight * angle
        total = self.ce_weight * ce + self.distill_weight * rkd
        return total, {"ce": ce, "rkd_distance": distance, "rkd_angle": angle, "rkd": rkd}
