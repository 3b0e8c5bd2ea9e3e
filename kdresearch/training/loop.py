"""The training loop's pieces: seeding, one epoch of training, and the one evaluation loop."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from kdresearch import optimizers
from kdresearch.errors import KDResearchError
from kdresearch.losses.base import Progress
from kdresearch.models import ModelOutputs
from kdresearch.runtime import devices, interrupts


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)



def forward(model: nn.Module, images: torch.Tensor, with_features: bool) -> ModelOutputs:
    """The model's outputs as a loss reads them; {view: outputs} for a batch of several views
    (`model` is then a kdresearch.data.views.ViewsForward)."""
    out = model(images, with_features=with_features)
    if isinstance(out, dict):
        return {view: value if with_features else ModelOutputs(value) for view, value in out.items()}
    return out if with_features else ModelOutputs(out)


@dataclass
class Predictions:
    """One pass of a model over a split: each image's predicted class and label, and the loss; with
    `keep_logits`, every image's logits; against a reference's logits, the fidelity to it."""

    predicted: torch.Tensor  # int64 (N,), on the model's device
    labels: torch.Tensor  # int64 (N,), on the model's device
    loss: float  # mean cross-entropy; NaN or inf when some logits are not finite
    logits: Optional[torch.Tensor] = None  # float32 (N, classes), in stored order, with keep_logits
    agreement: Optional[float] = None  # percent of images whose top-1 class is the reference's
    kl_to_reference: Optional[float] = None  # mean KL(reference || model) at temperature 1

    @property
    def accuracy(self) -> float:
        """In percent."""
        return 100.0 * (self.predicted == self.labels).sum().item() / self.labels.numel()


def kl_sum(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Sum over the rows of KL(softmax(reference) || softmax(logits)), in float32 (a device scalar)."""
    return F.kl_div(F.log_softmax(logits.float(), dim=1), F.log_softmax(reference_logits.float(), dim=1),
                    reduction="sum", log_target=True)


@torch.no_grad()
def predict(model: nn.Module, batches, device: torch.device, precision: str, keep_logits: bool = False,
            reference: Optional[torch.Tensor] = None) -> Predictions:
    """Run `model` (in eval mode) over `batches` of (images, labels, index): the one evaluation
    loop, behind the trainer's test/val metrics, the teacher's measured accuracy and logits
    (`keep_logits`) and scripts/evaluate.py. With `reference`, the logits of another model (the
    teacher) for every image of the split, indexed like the batches' index, the pass also measures
    the model's fidelity to it: top-1 agreement and KL(reference || model). Nothing is read back
    from the device until the pass is over (a read per batch would make the host wait each time)."""
    model.eval()
    predicted, labels_seen, loss_sums, kept, agreements, kl_sums = [], [], [], [], [], []
    for images, labels, index in batches:
        interrupts.check()
        with devices.autocast(device, precision):
            logits = model(images)
        loss_sums.append(F.cross_entropy(logits.float(), labels, reduction="sum"))
        predicted.append(logits.argmax(dim=1))
        labels_seen.append(labels)
        if keep_logits:
            kept.append(logits.float())
        if reference is not None:
            reference_logits = reference[index.to(reference.device)]
            agreements.append((predicted[-1] == reference_logits.argmax(dim=1)).sum())
            kl_sums.append(kl_sum(reference_logits, logits))
    if not predicted:
        raise KDResearchError("the split to evaluate on holds no images")
    labels = torch.cat(labels_seen)
    count = labels.numel()
    loss = torch.stack(loss_sums).cpu().double().sum().item() / count
    predictions = Predictions(torch.cat(predicted), labels, loss, torch.cat(kept) if keep_logits else None)
    if reference is not None:
        predictions.agreement = 100.0 * torch.stack(agreements).sum().item() / count
        predictions.kl_to_reference = torch.stack(kl_sums).double().sum().item() / count
    return predictions


def evaluate(model: nn.Module, batches, device: torch.device, precision: str) -> tuple[float, float]:
    """(accuracy in percent, mean cross-entropy) on `batches`."""
    predictions = predict(model, batches, device, precision)
    return predictions.accuracy, predictions.loss


PROGRESS_EVERY = 25  # steps between progress-bar loss updates (each reads the loss: a device sync)


def train_one_epoch(student, loss_fn, loss_call, teacher_outputs, optimizer, batches, epoch, cfg, device) -> dict:
    """One pass over the training batches; returns the mean of each loss part as train/<part>.

    `loss_call` is `loss_fn` itself, or its DDP wrapper when the loss owns parameters. The loss
    and its parts are summed on the device and read once, at the end of the epoch (a read per
    step would make the host wait for the device every step); a non-finite loss is reported
    then, with the first step where it appeared.
    """
    student.train()
    loss_fn.train()
    steps = len(batches)
    losses = torch.zeros(steps, device=device)  # every step's total loss, read once at the end
    part_sums: dict[str, torch.Tensor] = {}
    show = not cfg.quiet
    bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", disable=not show, leave=False,
               dynamic_ncols=True)
    for step, (images, labels, index) in enumerate(bar, start=1):
        interrupts.check()
        progress = Progress(epoch, step, cfg.epochs, steps, index)
        with devices.autocast(device, cfg.device.precision):
            student_out = forward(student, images, loss_fn.student_features)
            teacher_out = teacher_outputs(images, index) if teacher_outputs else None
            total, parts = loss_call(student_out, teacher_out, labels, progress)
        optimizer.zero_grad(set_to_none=True)
        optimizers.backward(optimizer, loss_fn, total, parts)  # DOT: the task and distillation gradients apart
        optimizer.step()
        losses[step - 1] = total.detach()
        for name, part in parts.items():
            value = part.detach().float()
            part_sums[name] = part_sums[name] + value if name in part_sums else value
        if show and step % PROGRESS_EVERY == 0:
            bar.set_postfix(loss=f"{losses[:step].mean().item():.4f}", refresh=False)
    finite = torch.isfinite(losses)
    if not bool(finite.all()):
        step = int((~finite).nonzero()[0]) + 1
        raise KDResearchError(
            f"training diverged: the loss is {losses[step - 1].item()} at epoch {epoch}, step {step}; "
            f"try a lower optimizer.lr"
        )
    means = {"train/loss": float(losses.mean())}
    means.update({f"train/{name}": float(value) / steps for name, value in part_sums.items()})
    return means
