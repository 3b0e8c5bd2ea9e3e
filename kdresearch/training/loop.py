"""The training loop's pieces: seeding, one epoch of training, and the one evaluation loop."""

from __future__ import annotations

import random
from dataclasses import dataclass

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
    out = model(images, with_features=with_features)
    return out if with_features else ModelOutputs(out)


@dataclass
class Predictions:
    """One pass of a model over a split: each image's predicted class and label, and the loss."""

    predicted: torch.Tensor  # int64 (N,), on the model's device
    labels: torch.Tensor  # int64 (N,), on the model's device
    loss: float  # mean cross-entropy; NaN or inf when some logits are not finite

    @property
    def accuracy(self) -> float:
        """In percent."""
        return 100.0 * (self.predicted == self.labels).sum().item() / self.labels.numel()


@torch.no_grad()
def predict(model: nn.Module, batches, device: torch.device, precision: str) -> Predictions:
    """Run `model` (in eval mode) over `batches` of (images, labels, index): the one evaluation
    loop, behind both the trainer's test/val metrics and scripts/evaluate.py. Nothing is read back
    from the device until the pass is over (a read per batch would make the host wait each time)."""
    model.eval()
    predicted, labels_seen, loss_sums = [], [], []
    for images, labels, _ in batches:
        interrupts.check()
        with devices.autocast(device, precision):
            logits = model(images)
        loss_sums.append(F.cross_entropy(logits.float(), labels, reduction="sum"))
        predicted.append(logits.argmax(dim=1))
        labels_seen.append(labels)
    if not predicted:
        raise KDResearchError("the split to evaluate on holds no images")
    labels = torch.cat(labels_seen)
    loss = torch.stack(loss_sums).cpu().double().sum().item() / labels.numel()
    return Predictions(torch.cat(predicted), labels, loss)


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
