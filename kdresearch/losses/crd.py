"""Contrastive representation distillation (Tian, Krishnan & Isola, "Contrastive Representation
Distillation", ICLR 2020), as the paper's CIFAR-100 code defines it (RepDistiller: `crd/criterion.py`
CRDLoss / ContrastLoss / Embed, `crd/memory.py` ContrastMemory).

    total = ce_weight * CE + kd_weight * soft_target_kd(student, teacher, T) + distill_weight * CRD
    CRD   = NCE(student anchors vs the teacher bank) + NCE(teacher anchors vs the student bank)

Per training sample i of a batch, with v_s / v_t the 128-d L2-normalised linear heads of the
student / teacher embedding, M_s / M_t the momentum memory banks (one row per training sample),
n = train_size, K = nce_k and J_i = (i, j_1 .. j_K) the positive followed by K sampled negatives:

    p(anchor v, bank M)_ij = exp(<M_j, v> / nce_t) / Z     for j in J_i
    NCE = -1/B * sum_i [ log(p_i,pos / (p_i,pos + K/n + eps)) + sum_neg log((K/n) / (p_ij + K/n + eps)) ]

Z (one per direction) is estimated once, on the first batch, as mean(exp(<M_j, v> / nce_t)) * n and
kept fixed. After the scores, the batch's rows of both banks move towards the new embeddings:
M[i] <- normalise(nce_mom * M[i] + (1 - nce_mom) * v_i).

Negatives are drawn as the paper's CIFAR-100 code draws them by default (`negatives=other_classes`:
RepDistiller's `CIFAR100InstanceSample`, mode 'exact'): for each anchor, K distinct samples of the
other classes (without replacement; the anchor's own class never). `negatives=uniform` draws them
uniformly over the whole training set with replacement, the positive's class and the positive itself
possible, which is what ContrastMemory does when it is given no indices; on CIFAR-100 a uniform
draw hits the anchor's class 1 % of the time, on a 10-class set 10 %. The exact draw keys every
training sample per anchor and keeps the top nce_k: a (B, n) float tensor per step, on a 2-core CPU
108 ms per batch of 64 for CIFAR's 50,000 samples and K 16,384 (the uniform draw: 6 ms), where the
paper's data loader spends a permutation of the others per sample in its workers. At ImageNet's
1.28 M samples that is 5 MB of keys per anchor (B is each process's share of the batch under DDP):
fine on a GPU, slow on a CPU, where `negatives=uniform` is the cheap choice.

Under DDP each rank scores its own share of the batch; the bank update gathers every rank's rows
first, so all ranks apply the same update and the banks stay identical (DDP would otherwise
overwrite them with rank 0's at its next forward, losing the other ranks' updates). Z is averaged
over the ranks' first batches for the same reason.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from kdresearch.config import validators
from kdresearch.errors import KDResearchError
from kdresearch.losses.base import Progress, TrainingLoss, number, temperature
from kdresearch.losses.kd import soft_target_kd
from kdresearch.models import ModelOutputs

# ContrastLoss's eps: keeps the ratios finite when a probability underflows to 0.
NCE_EPS = 1e-7
# How negatives are drawn (module docstring): the paper's CIFAR code, or uniform over the training set.
NEGATIVE_DRAWS = ("other_classes", "uniform")


def init_memory_bank(rows: int, feat_dim: int) -> torch.Tensor:
    """ContrastMemory's initial bank: uniform in [-s, s], s = 1 / sqrt(feat_dim / 3), from the torch RNG
    (a row then has an expected squared norm of 1, like the unit vectors that replace it)."""
    stdv = 1.0 / math.sqrt(feat_dim / 3)
    return torch.rand(rows, feat_dim).mul_(2 * stdv).add_(-stdv)


def contrast_scores(anchor: torch.Tensor, bank: torch.Tensor, contrast_index: torch.Tensor,
                    nce_t: float) -> torch.Tensor:
    """exp(<bank[contrast_index[i, j]], anchor[i]> / nce_t), shape (B, K+1).

    The paper gathers the (B, K+1, D) bank rows and multiplies them batch-wise; scoring every bank
    row once (B x n) and picking the sampled ones gives the same numbers with far less memory (25 MB
    instead of 1 GB per direction for CIFAR's n 50,000, K 16,384, B 128), and more speed. The
    backward pass reads `bank`, so a caller that updates the bank in place must pass a copy.
    """
    return torch.exp(torch.gather(anchor @ bank.t(), 1, contrast_index) / nce_t)


def nce_loss(probs: torch.Tensor, n_data: int, eps: float = NCE_EPS) -> torch.Tensor:
    """The paper's NCE (ContrastLoss, eq. 18) on `probs` (B, 1 + K): column 0 the positive, the others
    negatives, each already divided by Z. Noise distribution Pn = 1 / n_data, so K * Pn = K / n_data.

    -1/B * sum_i [log(p_i0 / (p_i0 + K Pn + eps)) + sum_{j>=1} log(K Pn / (p_ij + K Pn + eps))]
    """
    noise = (probs.size(1) - 1) / n_data
    positive, negative = probs[:, 0], probs[:, 1:]
    log_d1 = torch.log(positive / (positive + noise + eps))
    log_d0 = torch.log(noise / (negative + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / probs.size(0)


class Embed(nn.Module):
    """The paper's embedding head: linear to feat_dim, then L2 normalisation of each row."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.normalize is the paper's x / ||x|| except that it cannot divide by zero.
        return F.normalize(self.linear(x.flatten(1)), dim=1)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's rows of each tensor, concatenated in rank order (identity outside DDP).

    Ranks may hold a different number of rows (the last batch of an epoch), and all_gather needs
    equal shapes, so the counts are exchanged first and every rank pads to the largest.
    """
    if not _distributed():
        return tensors
    world = dist.get_world_size()
    count = torch.tensor([tensors[0].size(0)], device=tensors[0].device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    gathered = []
    for tensor in tensors:
        padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
        padded[:tensor.size(0)] = tensor
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        gathered.append(torch.cat([part[:c] for part, c in zip(parts, counts)]))
    return tuple(gathered)


class ContrastiveRepresentationDistillation(TrainingLoss):
    """ce_weight * CE + kd_weight * soft_target_kd(T) + distill_weight * CRD (module docstring).

    Defaults are the paper's CIFAR-100 ones (train_student.py: -r 1 -a 0 -b 0.8, feat_dim 128,
    nce_k 16384, nce_t 0.07, nce_m 0.5, kd_T 4). `bind` creates the two heads (parameters, trained
    with the student) and the two banks plus Z (buffers: in checkpoints, so resume is exact).
    Negatives come from the global torch RNG of the banks' device, which the trainer's checkpoint
    captures.
    """

    needs_teacher = True
    student_features = True

    def __init__(self, ce_weight: float = 1.0, kd_weight: float = 0.0, distill_weight: float = 0.8,
                 T: float = 4.0, feat_dim: int = 128, nce_k: int = 16384, nce_t: float = 0.07,
                 nce_mom: float = 0.5, negatives: str = "other_classes"):
        super().__init__()
        self.ce_weight = number("loss.ce_weight", ce_weight)
        self.kd_weight = number("loss.kd_weight", kd_weight)
        self.distill_weight = number("loss.distill_weight", distill_weight)
        self.T = temperature("loss.T", T)
        self.feat_dim = validators.integer("loss.feat_dim", feat_dim, at_least=1)
        self.nce_k = validators.integer("loss.nce_k", nce_k, at_least=1)
        self.nce_t = number("loss.nce_t", nce_t, positive=True)
        self.nce_mom = validators.number("loss.nce_mom", nce_mom, at_least=0, at_most=1)
        self.negatives = validators.choice("loss.negatives", negatives, NEGATIVE_DRAWS)
        # The teacher's logits are read (and cached) only when the KD term is on.
        self.teacher_fields = ("embedding", "logits") if self.kd_weight > 0 else ("embedding",)
        self.train_size = 0
        self.embed_student: Optional[Embed] = None
        self.embed_teacher: Optional[Embed] = None

    def loss_name(self) -> str:
        return "crd"

    def bind(self, student, teacher, *, train_size=0, train_labels=None):
        super().bind(student, teacher, train_size=train_size, train_labels=train_labels)
        if self.nce_k >= train_size:
            raise KDResearchError(
                f"loss=crd: nce_k={self.nce_k} negatives per sample need a training set larger than "
                f"{train_size} samples; set loss.nce_k below {train_size}, e.g. "
                f"loss.nce_k={max(1, train_size // 4)}")
        self.train_size = train_size
        if self.negatives == "other_classes":
            self.register_buffer("train_labels", self._labels_for_class_negatives(train_labels), persistent=False)
        # Creation order as CRDLoss: student head, teacher head, student bank, teacher bank.
        self.embed_student = Embed(student.embedding_dim, self.feat_dim)
        self.embed_teacher = Embed(teacher.embedding_dim, self.feat_dim)
        self.register_buffer("memory_student", init_memory_bank(train_size, self.feat_dim))
        self.register_buffer("memory_teacher", init_memory_bank(train_size, self.feat_dim))
        # Z for [student anchors, teacher anchors]; negative until the first batch sets it.
        self.register_buffer("nce_z", torch.full((2,), -1.0))

    def _labels_for_class_negatives(self, train_labels: Optional[torch.Tensor]) -> torch.Tensor:
        """The training labels, checked to leave nce_k samples of other classes to every anchor."""
        if train_labels is None or len(train_labels) != self.train_size:
            raise KDResearchError("loss=crd: negatives=other_classes draws from the other classes, so bind() "
                                  "needs the training labels (train_labels=, one per sample); or set "
                                  "loss.negatives=uniform")
        train_labels = torch.as_tensor(train_labels, dtype=torch.long)
        fewest_others = self.train_size - int(torch.bincount(train_labels).max())
        if self.nce_k > fewest_others:
            raise KDResearchError(
                f"loss=crd: nce_k={self.nce_k} negatives from the other classes need at least that many "
                f"samples outside each class, and the largest class leaves {fewest_others}; set loss.nce_k "
                f"at most {fewest_others} (e.g. loss.nce_k={max(1, fewest_others // 4)}) or loss.negatives=uniform")
        return train_labels

    def sample_negatives(self, index: torch.Tensor) -> torch.Tensor:
        """(B, nce_k) training-set indices of negatives for the anchors `index` (B,), drawn as
        `negatives` says, from the global RNG of the banks' device (captured by the trainer's
        checkpoint, so resume draws the same ones)."""
        device = self.memory_student.device
        if self.negatives == "uniform":
            return torch.randint(0, self.train_size, (index.numel(), self.nce_k), device=device)
        # K distinct samples of the other classes: the K largest of uniform keys, with the anchor's
        # class keyed below every other (a uniformly random K-subset of the others).
        anchor_labels = self.train_labels[index.to(self.train_labels.device, torch.long)]
        keys = torch.rand(index.numel(), self.train_size, device=device)
        keys.masked_fill_(self.train_labels[None, :].to(device) == anchor_labels[:, None].to(device), -1.0)
        return keys.topk(self.nce_k, dim=1, sorted=False).indices

    def contrast(self, student_embedding: torch.Tensor, teacher_embedding: torch.Tensor,
                 index: torch.Tensor, negatives: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The CRD term for one batch (`index`: the samples' rows in the banks), then the bank update.
        `negatives` (B, nce_k) defaults to `sample_negatives(index)`."""
        if self.embed_student is None:
            raise KDResearchError("loss=crd: call bind(student, teacher, train_size=...) before training")
        # Scored against copies: the update below changes the banks in place, and the backward pass
        # needs them as they were (a copy is n x feat_dim, 25 MB for CIFAR, cheaper than the paper's
        # (B, K+1, feat_dim) gather).
        bank_s, bank_t = self.memory_student.clone(), self.memory_teacher.clone()
        index = index.to(bank_s.device, torch.long)
        if negatives is None:
            negatives = self.sample_negatives(index)
        contrast_index = torch.cat([index[:, None], negatives.to(bank_s.device, torch.long)], dim=1)
        # exp(<., .> / 0.07) reaches e^14 ~ 1.6e6: scores, Z and the NCE ratios stay in float32 under
        # bf16 autocast (the heads are tiny, so they run in float32 too).
        with torch.autocast(bank_s.device.type, enabled=False):
            v_s = self.embed_student(student_embedding.float())
            v_t = self.embed_teacher(teacher_embedding.float())
            out_s = contrast_scores(v_s, bank_t, contrast_index, self.nce_t)  # student anchors, teacher bank
            out_t = contrast_scores(v_t, bank_s, contrast_index, self.nce_t)  # teacher anchors, student bank
            if bool((self.nce_z < 0).any()):
                self._estimate_z(out_s.detach(), out_t.detach())
            loss = (nce_loss(out_s / self.nce_z[0], self.train_size)
                    + nce_loss(out_t / self.nce_z[1], self.train_size))
            self._update_memory(index, v_s.detach(), v_t.detach())
        return loss

    @torch.no_grad()
    def _estimate_z(self, out_s: torch.Tensor, out_t: torch.Tensor) -> None:
        """ContrastMemory's Z: mean of the first batch's exp scores times n, then fixed for good."""
        z = torch.stack([out_s.mean(), out_t.mean()]) * self.train_size
        if _distributed():  # one Z for all ranks (each saw a different first batch)
            dist.all_reduce(z)
            z /= dist.get_world_size()
        self.nce_z.copy_(z)

    @torch.no_grad()
    def _update_memory(self, index: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        """M[i] <- normalise(nce_mom * M[i] + (1 - nce_mom) * v_i) for the positives, both banks."""
        index, v_s, v_t = _gather_rows(index, v_s, v_t)
        for bank, new in ((self.memory_student, v_s), (self.memory_teacher, v_t)):
            rows = bank.index_select(0, index).mul_(self.nce_mom).add_(new, alpha=1 - self.nce_mom)
            bank.index_copy_(0, index, F.normalize(rows, dim=1))

    def forward(self, student: ModelOutputs, teacher: ModelOutputs, labels: torch.Tensor,
                progress: Optional[Progress] = None):
        if progress is None or progress.index is None:
            raise KDResearchError("loss=crd needs the batch's sample indices (progress.index) to address "
                                  "its memory banks; the trainer passes them, a direct call must too")
        ce = F.cross_entropy(student.logits, labels)
        crd = self.contrast(student.embedding, teacher.embedding, progress.index)
        total = self.ce_weight * ce + self.distill_weight * crd
        parts = {"ce": ce, "crd": crd}
        if self.kd_weight > 0:
            kd = soft_target_kd(student.logits, teacher.logits, self.T)
            total = total + self.kd_weight * kd
            parts["kd"] = kd
        return total, parts
