"""Methods whose authors train in two stages (FSP, AB, FT): an init stage in which one term alone
trains, then classification.

- epochs 1 .. init_epochs: the loss is the init stage's term alone: the distillation term (FSP, AB:
  it shapes the student's feature layers) or one of the method's own (FT: its paraphraser's
  reconstruction of the teacher's features, `init_stage_term`, logged as `init_part_name`). The
  classifier is not in the term, so it gets no gradient and stays as initialised, as the authors'
  init stages train only the feature layers or the method's modules (RepDistiller `helper/pretrain.py`);
- later epochs: ce_weight * CE + distill_weight * term (the methods' second stage).

One optimizer (and its momentum) carries on from the first stage into the second, where the
authors' code starts a new one. Cross-entropy is logged in both stages ("ce", from detached logits
in the init stage, for comparison) next to the term, unweighted. The stage is read from the epoch,
so a resumed job continues in the stage its checkpoint was in.
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch.nn import functional as F

from kdresearch.config import validators
from kdresearch.errors import KDResearchError
from kdresearch.losses.base import WeightedDistillation


class InitStageDistillation(WeightedDistillation):
    """The term alone for the first `init_epochs` epochs, then ce_weight * CE + distill_weight * term
    (module docstring). Subclasses set `part_name` and implement `distillation_term`; one whose
    init stage trains another term overrides `init_stage_term` and names that part `init_part_name`."""

    init_part_name: Optional[str] = None  # the init stage's part, when not `part_name`
    init_stage_optional = True  # False where the method needs its init stage (FT: an untrained paraphraser)

    def __init__(self, init_epochs: int, ce_weight: float, distill_weight: float):
        super().__init__(ce_weight, distill_weight)
        self.init_epochs = validators.integer("loss.init_epochs", init_epochs, at_least=0)

    def bind(self, student, teacher, *, train_size=0, train_labels=None):
        super().bind(student, teacher, train_size=train_size, train_labels=train_labels)
        self.check_init_stage()

    def check_init_stage(self) -> None:
        """Refuse an init stage under distributed training: DDP expects a gradient for every
        parameter at each step, and the init stage gives the classifier none."""
        if self.init_epochs > 0 and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise KDResearchError(f"loss={self.part_name}: the init stage (loss.init_epochs={self.init_epochs}) "
                                  f"trains without the classifier, which distributed training cannot; run it in "
                                  f"one process{' or set loss.init_epochs=0' if self.init_stage_optional else ''}")

    def check_epochs(self, epochs: int) -> None:
        if epochs <= self.init_epochs:
            raise KDResearchError(f"loss={self.part_name}: loss.init_epochs={self.init_epochs} leaves none of the "
                                  f"{epochs} epochs to train the classifier; set epochs above "
                                  f"{self.init_epochs} or lower loss.init_epochs")

    def forward(self, student, teacher, labels, progress=None):
        if progress is None:
            raise KDResearchError(f"loss={self.part_name} needs the epoch (progress) to tell its init stage from "
                                  f"the classification stage; the trainer passes it, a direct call must too")
        self.check_epochs(progress.epochs)
        if progress.epoch > self.init_epochs:
            return super().forward(student, teacher, labels, progress)
        term = self.init_stage_term(student, teacher, progress)
        # The classifier's CE is shown for comparison with the second stage; it is not trained.
        return term, {"ce": F.cross_entropy(student.logits.detach(), labels),
                      self.init_part_name or self.part_name: term}

    def init_stage_term(self, student, teacher, progress):
        """The loss of the init stage: the distillation term, unless the method trains something else
        first (module docstring)."""
        return self.distillation_term(student, teacher, progress)
