"""Optimizers of our own, and the one backward pass every training step takes through them.

DOT, the distillation-oriented trainer (Zhao, Cui, Song, Qiu & Liang, "DOT: A Distillation-Oriented
Trainer", ICCV 2023), as the authors' mdistiller computes it (`mdistiller/engine/dot.py`,
`DistillationOrientedTrainer`, and the `DOT` trainer in `mdistiller/engine/trainer.py`): SGD that
keeps two momentum buffers per parameter, one for the task loss (the weighted cross-entropy) and
one for the distillation loss (the rest of the total), with momenta

    m_task = momentum - delta,    m_distill = momentum + delta       (mdistiller: 0.9 -/+ 0.075)

so the distillation gradients are averaged over more steps than the task's. Per parameter p with
task gradient g_t and distillation gradient g_d (either may be absent), weight decay wd:

    task:     d = g_t + wd * p;  b_t = d on its first step, else  m * b_t + d;   p -= lr * b_t
    distill:  d = g_d;           b_d = d on its first step, else  m' * b_d + d;  p -= lr * b_d

where m is m_task and m' is m_distill for a parameter that has both gradients this step, and both
are (m_task + m_distill) / 2 for one that has only one of them (a connector the task loss does not
reach); such a distillation-only parameter takes the weight decay into its distillation step,
except on its first step (mdistiller adds it only once a buffer exists). Dampening is 0, as there.
The task update is applied before the distillation update, as mdistiller does.

The two gradients come from two backward passes over the one graph (the distillation loss first,
its graph retained), as mdistiller's trainer does; `backward` below is the training step's single
call, which stays one `total.backward()` for every other optimizer.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch.optim import Optimizer

from kdresearch.errors import KDResearchError
from kdresearch.losses.base import number

DISTILL_GRAD = "distill_grad"  # per-parameter state: the distillation gradient of the current step, until step()
TASK_MOMENTUM = "task_momentum"
DISTILL_MOMENTUM = "distill_momentum"


class DOT(Optimizer):
    """SGD with separate task and distillation momenta (module docstring).

    `backward_split(task, distillation)` takes the place of `total.backward()`; `step()` then
    applies both updates. Its state (both buffers per parameter) is in `state_dict()`.
    """

    def __init__(self, params, lr: float = 0.05, momentum: float = 0.9, delta: float = 0.075,
                 weight_decay: float = 0.0):
        lr = number("optimizer.lr", lr, positive=True)
        momentum = number("optimizer.momentum", momentum)
        delta = number("optimizer.delta", delta)
        weight_decay = number("optimizer.weight_decay", weight_decay)
        if delta > momentum or momentum + delta >= 1:
            raise KDResearchError(f"optimizer.delta={delta:g} with optimizer.momentum={momentum:g}: the task "
                                  f"momentum (momentum - delta) must be >= 0 and the distillation momentum "
                                  f"(momentum + delta) < 1")
        super().__init__(params, dict(lr=lr, momentum=momentum, delta=delta, weight_decay=weight_decay))

    def backward_split(self, task: torch.Tensor, distillation: torch.Tensor) -> None:
        """The two gradients of this step: the distillation loss's, kept in the state, then the
        task loss's, left in `.grad`. Call after `zero_grad`."""
        distillation.backward(retain_graph=True)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p][DISTILL_GRAD] = p.grad
                    p.grad = None
        task.backward()

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise KDResearchError("optimizer=dot takes its two gradients from backward_split, not a closure")
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            m_task, m_distill = group["momentum"] - group["delta"], group["momentum"] + group["delta"]
            m_alone = (m_task + m_distill) / 2  # for a parameter with one of the two gradients
            for p in group["params"]:
                state = self.state[p]
                g_task, g_distill = p.grad, state.pop(DISTILL_GRAD, None)
                both = g_task is not None and g_distill is not None
                if g_task is not None:
                    d = g_task.add(p, alpha=wd) if wd != 0 else g_task
                    _momentum_step(p, state, TASK_MOMENTUM, d, m_task if both else m_alone, lr)
                if g_distill is not None:
                    if not both and wd != 0 and DISTILL_MOMENTUM in state:
                        g_distill = g_distill.add(p, alpha=wd)
                    _momentum_step(p, state, DISTILL_MOMENTUM, g_distill, m_distill if both else m_alone, lr)
        return None


def _momentum_step(p: torch.Tensor, state: dict, key: str, d: torch.Tensor, momentum: float, lr: float) -> None:
    """b = d on the first step, else momentum * b + d; then p -= lr * b."""
    buffer = state.get(key)
    if buffer is None:
        buffer = state[key] = torch.clone(d).detach()
    else:
        buffer.mul_(momentum).add_(d)
    p.add_(buffer, alpha=-lr)


DOT_TARGET = f"{DOT.__module__}.{DOT.__qualname__}"


def check_split(optimizer_node: Mapping, loss_fn, loss_name: str, key: str = "optimizer") -> None:
    """Refuse DOT for a loss it cannot split: DOT needs a distillation loss with a cross-entropy
    term (a `ce_weight`), and the teacher's own training (cross-entropy alone) has nothing to split."""
    if optimizer_node.get("_target_") != DOT_TARGET:
        return
    if key != "optimizer" or not loss_fn.needs_teacher or not hasattr(loss_fn, "ce_weight"):
        trained = "the teacher's cross-entropy" if key != "optimizer" else f"loss={loss_name}"
        raise KDResearchError(f"{key}=dot needs a distillation loss with a cross-entropy term (a ce_weight) to "
                              f"split into task and distillation gradients; {trained} has none")
    # An init stage (FSP, AB, FT) trains one term without cross-entropy, so there is no task gradient to split.
    terms = [loss_fn, *getattr(loss_fn, "terms", {}).values()]
    staged = [term for term in terms if getattr(term, "init_epochs", 0) > 0]
    if staged:
        raise KDResearchError(f"{key}=dot splits the cross-entropy gradient from the distillation gradient, but "
                              f"loss={staged[0].loss_name()}'s init stage (loss.init_epochs={staged[0].init_epochs}) "
                              f"trains without cross-entropy; use optimizer=sgd, or loss.init_epochs=0 where the "
                              f"method allows it")


def backward(optimizer: Optimizer, loss_fn, total: torch.Tensor, parts: Mapping[str, torch.Tensor]) -> None:
    """The training step's backward pass: `total.backward()`, or, for DOT, the task loss (the loss's
    `ce_weight` times its "ce" part) and the distillation loss (the rest of the total) apart
    (`check_split` refused the losses without them before the job started)."""
    if not isinstance(optimizer, DOT):
        total.backward()
        return
    task = loss_fn.ce_weight * parts["ce"]
    optimizer.backward_split(task, total - task)
