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
from typing import Mapping, Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, MultiStepLR

from kdresearch.config import validators
from kdresearch.errors import KDResearchError


def check_options(options: Mapping[str, object], epochs: int, key: str = "scheduler") -> None:
    """The rules of every schedule option present in `options` (a `scheduler` config node, or a
    factory's arguments), named under `key` (`teacher.scheduler` for the teacher's recipe). The
    factories check their arguments with it; `check_config` checks both config nodes before
    anything starts. Keys no schedule knows are left to the factory's signature."""
    if "milestones" in options:
        milestones = options["milestones"]
        listed = list(milestones) if isinstance(milestones, Sequence) and not isinstance(milestones, str) else None
        if listed is None or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in listed) \
                or listed != sorted(set(listed)):
            raise KDResearchError(f"{key}.milestones must be increasing epoch numbers >= 1, got {milestones}")
    if "gamma" in options:
        validators.number(f"{key}.gamma", options["gamma"], above=0)
    if "warmup_epochs" in options:
        validators.integer(f"{key}.warmup_epochs", options["warmup_epochs"], at_least=0, below=epochs,
                           note="fewer than the epochs")
    if "min_factor" in options:
        validators.number(f"{key}.min_factor", options["min_factor"], at_least=0, at_most=1)


def constant(optimizer: Optimizer, epochs: int) -> LRScheduler:
    return LambdaLR(optimizer, lambda epoch_index: 1.0)


def multistep(optimizer: Optimizer, epochs: int, milestones: Sequence[int] = (150, 180, 210),
              gamma: float = 0.1) -> LRScheduler:
    check_options({"milestones": milestones, "gamma": gamma}, epochs)
    return MultiStepLR(optimizer, milestones=list(milestones), gamma=float(gamma))


def cosine(optimizer: Optimizer, epochs: int, warmup_epochs: int = 0, min_factor: float = 0.0) -> LRScheduler:
    check_options({"warmup_epochs": warmup_epochs, "min_factor": min_factor}, epochs)
    decay_epochs = epochs - warmup_epochs

    def factor(epoch_index: int) -> float:  # epoch_index = epochs already done (0 for epoch 1)
        if epoch_index < warmup_epochs:
            return (epoch_index + 1) / warmup_epochs
        done = min(epoch_index - warmup_epochs, decay_epochs)
        return min_factor + (1 - min_factor) * (1 + math.cos(math.pi * done / decay_epochs)) / 2

    return LambdaLR(optimizer, factor)
