"""Learning-rate schedules (the `scheduler` config group), stepped once per epoch.

Every factory takes the optimizer and the job's epoch count and returns a torch LR scheduler, whose
`state_dict()` goes into each checkpoint (resume mid-schedule continues exactly). The lr of epoch
e (1-based) is base_lr * factor(e):
- `constant`: 1 (the tutorial's);
- `multistep`: gamma ** (number of milestones <= e - 1), i.e. torch's MultiStepLR: with
  milestones [150, 180, 210] epochs 151-180 run at 0.1x (the CIFAR-100 benchmark recipe);
- `cosine`: with `warmup_epochs` w, a linear warm-up e / w for e <= w, then
  min_factor + (1 - min_factor) * (1 + cos(pi * (e - 1 - w) / (epochs - w))) / 2,
  i.e. torch's CosineAnnealingLR(T_max = epochs - w, eta_min = min_factor * base_lr) after it.
"""

from __future__ import annotations

import math
from typing import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, MultiStepLR

from kdresearch.errors import KDResearchError


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise KDResearchError(f"scheduler: {message}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def constant(optimizer: Optimizer, epochs: int) -> LRScheduler:
    return LambdaLR(optimizer, lambda epoch_index: 1.0)


def multistep(optimizer: Optimizer, epochs: int, milestones: Sequence[int] = (150, 180, 210),
              gamma: float = 0.1) -> LRScheduler:
    milestones = list(milestones)
    _check(all(_is_int(m) and m >= 1 for m in milestones) and milestones == sorted(set(milestones)),
           f"scheduler.milestones must be increasing epoch numbers >= 1, got {milestones}")
    _check(_is_number(gamma) and gamma > 0, f"scheduler.gamma must be a number > 0, got {gamma!r}")
    return MultiStepLR(optimizer, milestones=milestones, gamma=float(gamma))


def cosine(optimizer: Optimizer, epochs: int, warmup_epochs: int = 0, min_factor: float = 0.0) -> LRScheduler:
    _check(_is_int(warmup_epochs) and 0 <= warmup_epochs < epochs,
           f"scheduler.warmup_epochs must be an integer in [0, epochs), got {warmup_epochs!r} (epochs={epochs})")
    _check(_is_number(min_factor) and 0 <= min_factor <= 1,
           f"scheduler.min_factor must be a number in [0, 1], got {min_factor!r}")
    decay_epochs = epochs - warmup_epochs

    def factor(epoch_index: int) -> float:  # epoch_index = epochs already done (0 for epoch 1)
        if epoch_index < warmup_epochs:
            return (epoch_index + 1) / warmup_epochs
        done = min(epoch_index - warmup_epochs, decay_epochs)
        return min_factor + (1 - min_factor) * (1 + math.cos(math.pi * done / decay_epochs)) / 2

    return LambdaLR(optimizer, factor)
