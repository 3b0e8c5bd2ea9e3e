"""Methods that combine: any losses summed, each with a weight from the config.

A term is a loss config placed inside the job's loss node with Hydra's own group syntax, so its
keys are the method's defaults (conf/loss/<name>.yaml, interpolations such as `${T}` resolved
against the job), recorded with the run and overridable like any other key:

    python train.py loss=combine +loss@loss.kd=kd +loss@loss.at=at loss.at.distill_weight=500
    python train.py loss=dkd +loss@loss.at=at            the chosen method plus AT
    python train.py loss=dkd +loss@loss.at=at +loss.weights.at=0.5

With `loss=combine` the terms are the nested configs alone; with another method, that method is
the first term (named by its `name`) and the nested configs follow it. Then

    total = sum_i weights[i] * total_i          (weights default to 1)

where each term computes its own total, except that cross-entropy on the labels counts once: the
first term's, with its own `ce_weight`; every later term is built with `ce_weight` 0. Each term's
parts are logged as `train/<part>`; a later term's part whose name is already taken (its "ce" is
dropped, being the first term's) becomes `train/<term>_<part>`.

Every term is bound to the pair; the teacher is asked for the union of the terms' fields, the
student for its features when any term reads them, and everything each term owns is in the
combined loss's state_dict (an `nn.ModuleDict`), so in checkpoints.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdresearch.config.groups import build
from kdresearch.errors import KDResearchError
from kdresearch.losses.base import Progress, TrainingLoss, number

COMBINE_TARGET = "kdresearch.losses.combine.CombinedLoss"
WEIGHTS_KEY = "weights"


def is_term(value) -> bool:
    """A nested loss config: a mapping with a `_target_`."""
    return isinstance(value, Mapping) and "_target_" in value


def build_loss(node: DictConfig) -> TrainingLoss:
    """The job's loss from its config node: the method itself, or, when the node holds nested
    loss configs (terms), a CombinedLoss of them (module docstring)."""
    values = OmegaConf.to_container(node, resolve=True)
    terms = {key: value for key, value in values.items() if is_term(value)}
    if not terms:
        return build(node, "loss")
    weights = values.pop(WEIGHTS_KEY, None) or {}
    built = {}
    if values["_target_"] != COMBINE_TARGET:
        first = {key: value for key, value in values.items() if key not in terms}
        if first["name"] in terms:
            raise KDResearchError(f"loss.{first['name']}: loss={first['name']} is already the first term; "
                                  f"add other methods as terms")
        built[first["name"]] = build(OmegaConf.create(first), "loss")
    for key, term in terms.items():
        built[key] = build(OmegaConf.create(term), f"loss.{key}")
    return CombinedLoss(built, weights)


class CombinedLoss(TrainingLoss):
    """sum_i weights[i] * total_i over the terms, CE counted once (module docstring).

    Built by `build_loss`; `loss=combine` without terms is refused in one line that says how to
    add them.
    """

    def __init__(self, terms: Optional[dict[str, TrainingLoss]] = None, weights: Optional[dict] = None):
        super().__init__()
        if not terms:
            raise KDResearchError("loss=combine needs terms: add each method as +loss@loss.NAME=NAME, "
                                  "e.g. +loss@loss.kd=kd +loss@loss.at=at")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(terms))
        if unknown:
            raise KDResearchError(f"loss.{WEIGHTS_KEY}.{unknown[0]}: no term of that name "
                                  f"(the terms: {', '.join(terms)})")
        self.weights = {name: number(f"loss.{WEIGHTS_KEY}.{name}", weights.get(name, 1.0)) for name in terms}
        self.terms = nn.ModuleDict(terms)
        for name, term in list(self.terms.items())[1:]:
            if not hasattr(term, "ce_weight"):
                raise KDResearchError(f"loss.{name}: a later term of a combined loss must have a ce_weight "
                                      f"(cross-entropy counts once, the first term's)")
            term.ce_weight = 0.0
        self.needs_teacher = any(term.needs_teacher for term in self.terms.values())
        self.student_features = any(term.student_features for term in self.terms.values())
        # A term reading several views (kdresearch.data.views) makes the batches hold them; the
        # other terms read the first of them (the weak view, the data's own).
        views = {term.views for term in self.terms.values() if term.views}
        if len(views) > 1:
            raise KDResearchError(f"loss=combine: its terms read different views ({' vs '.join(map(str, views))})")
        self.views = views.pop() if views else ()

    @property
    def first_name(self) -> str:
        return next(iter(self.terms))

    @property
    def ce_weight(self) -> float:
        """The weight cross-entropy enters the total with: the first term's, times its weight (a
        term without `ce_weight` is plain cross-entropy, weight 1)."""
        return self.weights[self.first_name] * getattr(self.terms[self.first_name], "ce_weight", 1.0)

    def loss_name(self) -> str:
        return "combine"

    def bind(self, student, teacher, *, train_size=0, train_labels=None):
        fields: list[str] = []
        for term in self.terms.values():
            term.bind(student, teacher, train_size=train_size, train_labels=train_labels)
            fields += [field for field in term.teacher_fields if field not in fields]
        self.teacher_fields = tuple(fields)

    def check_epochs(self, epochs: int) -> None:
        for term in self.terms.values():
            term.check_epochs(epochs)

    def forward(self, student, teacher, labels, progress: Optional[Progress] = None):
        total: Optional[torch.Tensor] = None
        parts: dict[str, torch.Tensor] = {}
        for index, (name, term) in enumerate(self.terms.items()):
            if self.views and not term.views:
                term_total, term_parts = term(student[self.views[0]], teacher[self.views[0]] if teacher else None,
                                              labels, progress)
            else:
                term_total, term_parts = term(student, teacher, labels, progress)
            weighted = self.weights[name] * term_total
            total = weighted if total is None else total + weighted
            for part, value in term_parts.items():
                if index > 0 and part == "ce":
                    continue
                parts[f"{name}_{part}" if part in parts else part] = value
        return total, parts
