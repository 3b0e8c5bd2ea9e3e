"""Probabilistic knowledge transfer (Passalis & Tefas, "Learning Deep Representations with
Probabilistic Knowledge Transfer", ECCV 2018), on the models' embeddings, as the CIFAR benchmark
suites compute it (RepDistiller `distiller_zoo/PKT.py` and mdistiller `distillers/PKT.py`, both the
authors' `probabilistic_kt` code; torchdistill's PKTLoss is the same formula).

Each model's embeddings define, for every sample i of the batch, a distribution over the batch's
samples j from cosine similarities mapped to [0, 1]; the student's distributions are pulled towards
the teacher's. With x_hat = x / (||x||_2 + eps) per sample:

    K(x)_ij   = (<x_hat_i, x_hat_j> + 1) / 2
    P(x)_ij   = K(x)_ij / sum_j K(x)_ij
    pkt       = 1 / N^2 * sum_ij P_t,ij * log((P_t,ij + eps) / (P_s,ij + eps))     eps = 1e-7

    total = ce_weight * CE(student logits, labels) + distill_weight * pkt

The 1 / N^2 is the authors' `torch.mean` over the N x N entries, i.e. the mean over samples of
each sample's KL divergence, divided once more by N; the large default weight (30000) is tuned to
it. Defaults are the suites' CIFAR-100 ones: weight 30000, CE weight 1, on the pooled penultimate
features (RepDistiller `feat[-1]`, mdistiller `pooled_feat`: our `embedding`). Only similarities
are compared, so the embeddings may differ in size: every pair of models can be served.

The authors' code also sets entries of x_hat that are NaN to 0; x / (||x|| + eps) is NaN only for
an embedding that already holds NaN or infinity, and hiding that would turn a diverged student
into a silent zero term, so that step is left out (on finite inputs nothing differs).
"""

from __future__ import annotations

import torch

from kdresearch.losses.base import WeightedDistillation
from kdresearch.losses.relations import computed_in_float32

PKT_EPS = 1e-7  # the authors': in the norms' denominators and inside the log ratio


def similarity_distribution(x: torch.Tensor, eps: float = PKT_EPS) -> torch.Tensor:
    """(N, D) -> (N, N): row i is sample i's distribution over the batch, from cosine similarities
    mapped to [0, 1] and divided by their row sum."""
    x = x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
    similarity = (x @ x.t() + 1.0) / 2.0
    return similarity / similarity.sum(dim=1, keepdim=True)


@computed_in_float32
def probabilistic_transfer(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor,
                           eps: float = PKT_EPS) -> torch.Tensor:
    """mean over the N x N entries of P_t * log((P_t + eps) / (P_s + eps))."""
    p_s = similarity_distribution(student_embedding.flatten(1), eps)
    p_t = similarity_distribution(teacher_embedding.flatten(1), eps)
    return torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps)))


class ProbabilisticKnowledgeTransfer(WeightedDistillation):
    """ce_weight * CE + distill_weight * probabilistic_transfer(student embedding, teacher embedding).
    Owns no parameters."""

    student_features = True
    teacher_fields = ("embedding",)
    part_name = "pkt"

    def __init__(self, ce_weight: float = 1.0, distill_weight: float = 30000.0):
        super().__init__(ce_weight, distill_weight)

    def distillation_term(self, student, teacher, progress=None):
        return probabilistic_transfer(student.embedding, teacher.embedding)
