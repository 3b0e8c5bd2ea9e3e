"""The `scheduler` group: the lr of every epoch equals torch's own scheduler's, bad options are one line."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, MultiStepLR

from kdresearch import schedules
from kdresearch.errors import KDResearchError

BASE_LR = 0.05


def optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=BASE_LR, momentum=0.9)


def lrs_per_epoch(scheduler, optimizer, epochs):
    """The lr each epoch trains with (read before the epoch's scheduler.step(), as the trainer does)."""
    seen = []
    for _ in range(epochs):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_constant_keeps_the_lr():
    opt = optimizer()
    assert lrs_per_epoch(schedules.constant(opt, 5), opt, 5) == [BASE_LR] * 5


def test_multistep_equals_torch_multisteplr():
    mine_opt, torch_opt = optimizer(), optimizer()
    mine = schedules.multistep(mine_opt, 12, milestones=[3, 7, 10], gamma=0.1)
    reference = MultiStepLR(torch_opt, milestones=[3, 7, 10], gamma=0.1)
    ours, theirs = lrs_per_epoch(mine, mine_opt, 12), lrs_per_epoch(reference, torch_opt, 12)
    assert ours == theirs
    # The recipe's reading: epochs 1-3 at lr, 4-7 at 0.1 lr, 8-10 at 0.01 lr, 11-12 at 0.001 lr.
    expected = [BASE_LR] * 3 + [BASE_LR * 0.1] * 4 + [BASE_LR * 0.01] * 3 + [BASE_LR * 0.001] * 2
    assert ours == pytest.approx(expected)


@pytest.mark.parametrize("min_factor", [0.0, 0.1])
def test_cosine_equals_torch_cosineannealinglr(min_factor):
    mine_opt, torch_opt = optimizer(), optimizer()
    mine = schedules.cosine(mine_opt, 10, min_factor=min_factor)
    reference = CosineAnnealingLR(torch_opt, T_max=10, eta_min=min_factor * BASE_LR)
    assert lrs_per_epoch(mine, mine_opt, 10) == pytest.approx(lrs_per_epoch(reference, torch_opt, 10), rel=1e-9)


def test_cosine_warmup_is_linear_then_torch_cosine():
    mine_opt, torch_opt = optimizer(), optimizer()
    mine = lrs_per_epoch(schedules.cosine(mine_opt, 10, warmup_epochs=3), mine_opt, 10)
    assert mine[:3] == pytest.approx([BASE_LR / 3, 2 * BASE_LR / 3, BASE_LR])
    after = lrs_per_epoch(CosineAnnealingLR(torch_opt, T_max=7), torch_opt, 7)
    assert mine[3:] == pytest.approx(after, rel=1e-9)
    assert mine[3] == BASE_LR and math.isclose(mine[-1], BASE_LR * (1 + math.cos(math.pi * 6 / 7)) / 2)


def test_state_dict_continues_mid_schedule():
    opt = optimizer()
    scheduler = schedules.multistep(opt, 8, milestones=[2, 5])
    lrs_per_epoch(scheduler, opt, 3)
    state = scheduler.state_dict()
    again_opt = optimizer()
    again = schedules.multistep(again_opt, 8, milestones=[2, 5])
    again_opt.load_state_dict(opt.state_dict())
    again.load_state_dict(state)
    assert lrs_per_epoch(again, again_opt, 5) == lrs_per_epoch(scheduler, opt, 5)


@pytest.mark.parametrize("make, message", [
    (lambda opt: schedules.multistep(opt, 10, milestones=[5, 3]), "scheduler.milestones must be increasing"),
    (lambda opt: schedules.multistep(opt, 10, milestones=["a"]), "scheduler.milestones must be increasing"),
    (lambda opt: schedules.multistep(opt, 10, gamma="x"), "scheduler.gamma must be a number, got 'x'"),
    (lambda opt: schedules.cosine(opt, 10, warmup_epochs=10), "scheduler.warmup_epochs must be an integer in [0, 10)"),
    (lambda opt: schedules.cosine(opt, 10, min_factor=2), "scheduler.min_factor must be in [0, 1], got 2"),
])
def test_bad_options_are_one_line(make, message):
    with pytest.raises(KDResearchError) as raised:
        make(optimizer())
    assert message in str(raised.value) and "\n" not in str(raised.value)
