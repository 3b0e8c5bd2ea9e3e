"""Several augmented views of each training image, for a loss that reads more than one.

A loss names the views it reads (`TrainingLoss.views`, e.g. ("weak", "strong")); the training
batches then hold `{view: normalised images}` instead of one image tensor, the student runs on
each view (`ViewsForward`, one module call so data-parallel training sees one forward per step)
and the teacher's outputs come per view (`kdresearch.teacher.outputs`, one cache entry per view
and epoch). The views:

- "weak": the data's own training view, random crop (padding 4) + horizontal flip
  (`kdresearch.data.augmentation`): the very images, and teacher-cache entries, of any other
  augmented job with the same augmentation seed;
- "strong": its own crop + flip, then RandAugment and Cutout (`kdresearch.data.randaugment`).

Both are pure functions of (augment_seed, epoch, sample index), so resume stays exact.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kdresearch.data.randaugment import StrongChoices, strong_view, strong_view_parameters
from kdresearch.errors import KDResearchError

WEAK, STRONG = "weak", "strong"
VIEWS = (WEAK, STRONG)
# In the names of the teacher's cached outputs on a view; the weak view's are any augmented job's.
# Bump a tag when that view's arithmetic changes, so that entries computed before are not read.
CACHE_TAGS = {WEAK: "", STRONG: "-strong1"}


# Data sets whose training views are drawn per image in DataLoader workers (data=imagenet), where
# the views here, drawn on batches of stored images, cannot be made.
VIEWS_IN_WORKERS = ("kdresearch.data.load_imagenet",)


def check_views(loss_name: str, views: tuple[str, ...], augment: bool, data_target: str = "") -> None:
    """Refuse, before the job starts, a loss asking for unknown views, for views of data that is
    not augmented (the weak view is the data's crop+flip: data.augment=false has none), or for views
    of data whose views its DataLoader workers draw (`data_target`: the data group's _target_)."""
    unknown = [view for view in views if view not in VIEWS]
    if unknown:
        raise KDResearchError(f"loss={loss_name}: unknown view {unknown[0]!r} (views: {', '.join(VIEWS)})")
    if views and not augment:
        raise KDResearchError(f"loss={loss_name} trains on {len(views)} augmented views of each image "
                              f"({', '.join(views)}): set data.augment=true")
    if views and data_target in VIEWS_IN_WORKERS:
        raise KDResearchError(f"loss={loss_name} trains on {len(views)} views of each image ({', '.join(views)}), "
                              f"drawn on batches of stored images; this data set draws its training views in its "
                              f"DataLoader workers: use in-memory data (cifar10, cifar100, tiny_imagenet, synthetic)")


class ViewMaker:
    """Makes the requested views of a batch of uint8 images; the strong view's choices of every
    training image are drawn once per (augmentation seed, epoch)."""

    def __init__(self, views: tuple[str, ...], count: int):
        self.views, self.count = tuple(views), count
        self._strong: Optional[tuple[tuple[int, int], StrongChoices]] = None

    def strong_choices(self, augment_seed: int, epoch: int) -> StrongChoices:
        if self._strong is None or self._strong[0] != (augment_seed, epoch):
            self._strong = ((augment_seed, epoch), strong_view_parameters(self.count, augment_seed, epoch))
        return self._strong[1]

    def __call__(self, images: torch.Tensor, weak: torch.Tensor, index: torch.Tensor, augment_seed: int,
                 epoch: int) -> dict[str, torch.Tensor]:
        """{view: uint8 images}; `weak` is the batch's ordinary (crop+flip) view, already made."""
        made = {}
        for view in self.views:
            if view == WEAK:
                made[view] = weak
            else:
                made[view] = strong_view(images, self.strong_choices(augment_seed, epoch)[index])
        return made


class ViewsForward(nn.Module):
    """The student run on each view of a `{view: images}` batch, in one call of this module (so DDP
    and torch.compile wrap one forward per step). Each view is its own forward pass, as the
    method's authors run it: batch-norm statistics are per view."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: dict[str, torch.Tensor], with_features: bool = False) -> dict:
        return {view: self.model(batch, with_features=with_features) for view, batch in images.items()}


def views_forward(model: nn.Module, views: tuple[str, ...]) -> nn.Module:
    """What the training loop calls: the model itself, or, for a loss reading several views, the
    model run on each (`ViewsForward`)."""
    return ViewsForward(model) if views else model
