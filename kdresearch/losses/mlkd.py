"""Multi-level logit distillation (Jin, Wang & Lin, "Multi-level Logit Distillation", CVPR 2023),
as the authors' code computes it (Jin-Ying/Multi-Level-Logit-Distillation, `KD_ours` in
`mdistiller/distillers/KD_ours.py`; the same arithmetic, plus logit standardisation, is `MLKD` in
sunshangquan/logit-standardization-KD's `mdistiller/distillers/MLKD.py`), with the optional logit
standardisation of Sun et al. (CVPR 2024).

Each image is seen twice (kdresearch.data.views): a weak view w (crop + flip) and a strong view s
(its own crop + flip, RandAugment, Cutout). Student and teacher run on both; with p = softmax(z / T)
row-wise over a batch of B images and C classes:

    kd(z_s, z_t, T) = T^2 / B * sum_n KL(p_t,n || p_s,n)                  instance level
    cc(z_s, z_t, T) = || p_t^T p_t - p_s^T p_s ||_F^2 / C                  class level (C x C)
    bc(z_s, z_t, T) = || p_t p_t^T - p_s p_s^T ||_F^2 / B                  batch level (B x B)

The confidence masks come from the teacher's weak-view softmax at T = 1 (no gradient): a sample
counts when its top probability is at most the batch's median (np.percentile(.., 50), linear
interpolation), a class when its summed probability over the batch is at most the median over
classes. In that code each term is a batch scalar multiplied by the boolean mask and then averaged
(`(kd_loss(..) * mask).mean()`), so a mask enters only as the fraction of samples (m) or classes
(m_c) it keeps: 1/2 for an even batch without ties. With the temperatures L = (T, 3, 5, 2, 6), T
the configured one (so T = 2, the standardised recipe's, enters twice), that code's total is

    ce = CE(z_s^w, y) + CE(z_s^s, y)                                     both views
    kd = m * sum_{T' in L} kd(w, T') + kd(s, T) + kd(s, 3) + kd(s, 5) + kd(w, 2) + kd(w, 6)
    cc = m_c * sum_{T' in L} cc(w, T')
    bc = m * sum_{T' in L} bc(w, T')
    total = ce_weight * ce + distill_weight * (kd + cc + bc)

Quirks reproduced as they are: the "strong" instance terms at 2 and 6 read the weak view, not the
strong one; the class- and batch-level terms on the strong view are computed there but left out of
the total (only the weak-view ones enter), so here they are not computed; the masks scale whole
terms rather than selecting samples. Logit standardisation (`standardize=True`, as in
kdresearch.losses.kd) z-scores the logits of the instance terms only, as MLKD.py does; the class-
and batch-level terms, the masks and CE see the raw logits. Deviations: none in the arithmetic;
under data-parallel training the medians are those of each process's share of the batch (the
authors' DataParallel splits its batch the same way).

Defaults are the authors' (`KD_ours` reads mdistiller's KD config: T 4, CE weight 0.1, KD weight
0.9). Their CIFAR-100 recipe: SGD lr 0.025 (0.01 for vgg13 -> vgg8 in the logit-standardisation
repository), momentum 0.9, weight decay 5e-4, batch 64, lr x 0.1 at epochs 150, 180 and 210, 480
epochs (the configs as first released; 240 in the authors' later configs for same-architecture
pairs). MLKD with logit standardisation uses T 2 and KD weight 9 (6 for some pairs), i.e.
`loss=mlkd loss.standardize=true loss.T=2 loss.distill_weight=9`.

Logged parts: "ce", "kd", "cc", "bc" as above (unweighted by ce_weight / distill_weight).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F

from kdresearch.data.views import STRONG, WEAK
from kdresearch.losses.base import Progress, TrainingLoss, number, temperature
from kdresearch.losses.kd import flag, soft_target_kd, standardize_logits
from kdresearch.losses.relations import computed_in_float32

# The temperatures after the configured one, in the authors' order: the instance terms on the
# strong view take the configured one and the next two; the last two read the weak view.
OTHER_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)
STRONG_TEMPERATURES = 3  # how many of the levels the strong-view instance terms take from the front


@computed_in_float32
def class_correlation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """|| p_t^T p_t - p_s^T p_s ||_F^2 / C: the classes' co-activation over the batch."""
    student, teacher = F.softmax(student_logits / T, dim=1), F.softmax(teacher_logits / T, dim=1)
    return (teacher.T @ teacher - student.T @ student).pow(2).sum() / student.size(1)


@computed_in_float32
def batch_correlation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """|| p_t p_t^T - p_s p_s^T ||_F^2 / B: the samples' similarity within the batch."""
    student, teacher = F.softmax(student_logits / T, dim=1), F.softmax(teacher_logits / T, dim=1)
    return (teacher @ teacher.T - student @ student.T).pow(2).sum() / student.size(0)


def share_at_most_median(values: torch.Tensor) -> torch.Tensor:
    """The fraction of `values` (1-D) at most their median (linear interpolation, np.percentile's)."""
    values = values.detach().float()
    return (values <= torch.quantile(values, 0.5)).float().mean()


@torch.no_grad()
def confidence_shares(teacher_weak_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, m_c): the shares of samples and of classes the authors' confidence masks keep."""
    probs = F.softmax(teacher_weak_logits.float(), dim=1)
    return share_at_most_median(probs.max(dim=1).values), share_at_most_median(probs.sum(dim=0))


def mlkd_terms(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], labels: torch.Tensor,
               T: float, standardize: bool = False) -> dict[str, torch.Tensor]:
    """The unweighted parts {"ce", "kd", "cc", "bc"} from each view's logits (module docstring)."""
    levels = (T, *OTHER_TEMPERATURES)
    sample_share, class_share = confidence_shares(teacher[WEAK])
    ce = F.cross_entropy(student[WEAK], labels) + F.cross_entropy(student[STRONG], labels)
    instance = {view: (standardize_logits(student[view]), standardize_logits(teacher[view])) if standardize
                else (student[view], teacher[view]) for view in (WEAK, STRONG)}
    kd = sample_share * sum(soft_target_kd(*instance[WEAK], level) for level in levels)
    kd = kd + sum(soft_target_kd(*instance[STRONG], level) for level in levels[:STRONG_TEMPERATURES])
    kd = kd + sum(soft_target_kd(*instance[WEAK], level) for level in levels[STRONG_TEMPERATURES:])
    cc = class_share * sum(class_correlation(student[WEAK], teacher[WEAK], level) for level in levels)
    bc = sample_share * sum(batch_correlation(student[WEAK], teacher[WEAK], level) for level in levels)
    return {"ce": ce, "kd": kd, "cc": cc, "bc": bc}


class MLKD(TrainingLoss):
    """ce_weight * ce + distill_weight * (kd + cc + bc) over a weak and a strong view; module docstring."""

    needs_teacher = True
    teacher_fields = ("logits",)
    views = (WEAK, STRONG)

    def __init__(self, T: float = 4.0, ce_weight: float = 0.1, distill_weight: float = 0.9,
                 standardize: bool = False):
        super().__init__()
        self.T = temperature("loss.T", T)
        self.ce_weight = number("loss.ce_weight", ce_weight)
        self.distill_weight = number("loss.distill_weight", distill_weight)
        self.standardize = flag("loss.standardize", standardize)

    def loss_name(self) -> str:
        return "mlkd"

    def forward(self, student, teacher, labels, progress: Optional[Progress] = None):
        parts = mlkd_terms({view: outputs.logits for view, outputs in student.items()},
                           {view: outputs.logits for view, outputs in teacher.items()}, labels, self.T,
                           self.standardize)
        total = self.ce_weight * parts["ce"] + self.distill_weight * (parts["kd"] + parts["cc"] + parts["bc"])
        return total, parts
