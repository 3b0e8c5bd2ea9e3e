"""Softmax regression representation learning, SRD (Yang, Martinez, Bulat & Tzimiropoulos,
"Knowledge Distillation via Softmax Regression Representation Learning", ICLR 2021), as the
authors' code computes it: KD_SRRL (`train_imagenet_distillation.py`, `distiller_zoo/AIN.py`) and
its CIFAR-100 counterpart in the authors' SRD_ossl (`train_student.py --distill srd`,
`helper/loops.py`, `models/resnet.py`, `models/wrn.py`).

The student's penultimate representation is trained through the teacher's own, frozen classifier:
a connector maps the student's last stage onto the teacher's embedding width, and the result must
(a) match the teacher's embedding and (b) give the teacher's logits when passed through the
teacher's classifier (W_t, b_t). With the student's last-stage map S and h = mean_{h,w}
connector(S) (N, D_t),

    srd_feature = mean_{n,d} (h - e_t)^2                   e_t the teacher's embedding
    srd_logits  = mean_{n,k} (W_t h + b_t - z_t)^2         z_t the teacher's logits
    srd         = feature_weight * srd_feature + srd_logits
    total       = ce_weight * CE(student logits, labels) + distill_weight * srd

The connector is the authors' 1x1 convolution (no bias) -> BatchNorm -> ReLU, from the student's
last-stage channels to the teacher's embedding width, its convolution drawn from N(0, 2 / fan_out)
as theirs; it belongs to the loss (trained with the student, in checkpoints). The mean over
positions is the authors' `statm_loss` (which averages both maps over positions before the squared
difference) and the teacher's pooling in their `model_t(x=None, feat_s=...)` call. Their teacher
maps are the ones each teacher pools into its embedding, so the target here is the teacher's
`embedding` itself. On the student's side the connector reads our last stage, which for the ResNets,
VGGs and ShuffleNetV1 is exactly the map pooled into the embedding; WRN (a final BN + ReLU),
MobileNetV2 and ShuffleNetV2 (a final 1x1 conv) pool a map one step later, which the authors' WRN
(their `# adain` edit) hands to the connector instead.

The teacher's classifier is its last linear layer (the `Linear(embedding_dim, num_classes)` every
model here has, `logits = Linear(embedding)`). Its weights are loaded only after `bind` (bind runs
before the teacher step), so `bind` keeps a reference to that layer and the loss copies its weight
and bias into two buffers of its own on its first call, in training, when the teacher is loaded:
frozen (no gradient reaches them; it flows through them to the connector and the student), in every
checkpoint, and the same on resume (a resumed job keeps its teacher, so the copy is identical).
A cached teacher serves too: the loss reads only its `logits` and `embedding`.

Defaults are the authors' CIFAR-100 ones (SRD_ossl `-r 1 -a 0 -b 1`): CE weight 1, distill weight
1, feature weight 1 (their code multiplies the feature term by 10 when the student is ShuffleV1,
`loss.feature_weight=10` here), and the L2 distance on the logits (the paper's "simple L2 loss";
their code's `F.mse_loss(logit_tc, logit_t)`). `logit_term=kl` replaces it with the soft-target KD
term at temperature T (`kdresearch.losses.kd.soft_target_kd`, T^2 * KL(teacher || regressed)),
a matching of the softened class distributions instead of the logits.

torchdistill's `SRDLoss` is another method (Miles & Mikolajczyk, "Understanding the Role of the
Projector in Knowledge Distillation", AAAI 2024, whose code calls it SRD): a log-sum of powered
feature differences plus KD on the student's own logits; it is not this loss.

Logged parts: "ce", "srd_feature", "srd_logits" and "srd" (the weighted sum above), unweighted by
distill_weight.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from kdresearch.config import validators
from kdresearch.losses.base import WeightedDistillation, number, pair_error, temperature
from kdresearch.losses.fitnet import HintConnector
from kdresearch.losses.kd import soft_target_kd
from kdresearch.losses.relations import computed_in_float32
from kdresearch.models import Network

LOGIT_TERMS = ("mse", "kl")


@computed_in_float32
def softmax_regression(student_feature: torch.Tensor, teacher_embedding: torch.Tensor,
                       teacher_logits: torch.Tensor, classifier_weight: torch.Tensor,
                       classifier_bias: torch.Tensor, logit_term: str = "mse",
                       T: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(srd_feature, srd_logits) of the student's connected, pooled feature h (N, D_t): the mean
    squared difference to the teacher's embedding, and that of the teacher's classifier applied to h
    to the teacher's logits ("mse"), or the soft-target KD term between them at T ("kl")."""
    feature = F.mse_loss(student_feature, teacher_embedding)
    regressed = F.linear(student_feature, classifier_weight, classifier_bias)
    if logit_term == "mse":
        return feature, F.mse_loss(regressed, teacher_logits)
    return feature, soft_target_kd(regressed, teacher_logits, T)


def regression_connector(s_channels: int, t_width: int) -> HintConnector:
    """1x1 conv (no bias) -> BatchNorm -> ReLU from the student's last-stage channels to the teacher's
    embedding width; the convolution drawn from N(0, 2 / fan_out), as the authors' `transfer_conv`."""
    conv = nn.Conv2d(s_channels, t_width, kernel_size=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # std sqrt(2 / (1 * 1 * t_width))
    return HintConnector(conv, t_width)


def final_linear(model: Network) -> Optional[nn.Linear]:
    """The model's classifier: its one `Linear(embedding_dim, num_classes)`, None when it has none
    or several."""
    found = [module for module in model.modules() if isinstance(module, nn.Linear)
             and (module.in_features, module.out_features) == (model.embedding_dim, model.num_classes)]
    return found[0] if len(found) == 1 else None


class SoftmaxRegression(WeightedDistillation):
    """ce_weight * CE + distill_weight * (feature_weight * srd_feature + srd_logits); module docstring.

    `bind` creates the connector and the buffers the teacher's classifier is copied into (on the
    loss's first call, once the teacher's weights are loaded).
    """

    student_features = True
    teacher_fields = ("logits", "embedding")
    part_name = "srd"

    def __init__(self, feature_weight: float = 1.0, logit_term: str = "mse", T: float = 4.0,
                 ce_weight: float = 1.0, distill_weight: float = 1.0):
        super().__init__(ce_weight, distill_weight)
        self.feature_weight = number("loss.feature_weight", feature_weight)
        self.logit_term = validators.choice("loss.logit_term", logit_term, LOGIT_TERMS)
        self.T = temperature("loss.T", T)
        self.connector: Optional[nn.Module] = None
        self.register_buffer("classifier_weight", None)
        self.register_buffer("classifier_bias", None)
        # The teacher's classifier layer itself, kept in a tuple so that it is not a submodule of
        # the loss (not in its parameters or state_dict): its trained weights arrive after bind.
        self._teacher_classifier: tuple[nn.Linear, ...] = ()
        self._classifier_copied = False

    def bind(self, student, teacher, *, train_size=0, train_labels=None):
        super().bind(student, teacher, train_size=train_size, train_labels=train_labels)
        if not student.stage_channels:
            raise pair_error("srd", "the connector reads the student's last stage, and the student has none",
                             student, teacher)
        classifier = final_linear(teacher)
        if classifier is None:
            raise pair_error("srd", f"the teacher needs exactly one classifier layer, a Linear from its "
                             f"{teacher.embedding_dim}-wide embedding to its {teacher.num_classes} classes, to "
                             f"pass the student's feature through", student, teacher)
        self.connector = regression_connector(student.stage_channels[-1], teacher.embedding_dim)
        self.classifier_weight = torch.zeros(teacher.num_classes, teacher.embedding_dim)
        self.classifier_bias = torch.zeros(teacher.num_classes)
        self._teacher_classifier = (classifier,)
        self._classifier_copied = False

    def frozen_classifier(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher classifier's weight and bias, copied from the (by now loaded) teacher on the
        first call (module docstring)."""
        if not self._classifier_copied:
            (classifier,) = self._teacher_classifier
            with torch.no_grad():
                self.classifier_weight.copy_(classifier.weight)
                if classifier.bias is not None:
                    self.classifier_bias.copy_(classifier.bias)
            self._classifier_copied = True
        return self.classifier_weight, self.classifier_bias

    def forward(self, student, teacher, labels, progress=None):
        ce = F.cross_entropy(student.logits, labels)
        feature = self.connector(student.stages[-1]).mean(dim=(2, 3))
        weight, bias = self.frozen_classifier()
        srd_feature, srd_logits = softmax_regression(feature, teacher.embedding, teacher.logits, weight, bias,
                                                     self.logit_term, self.T)
        srd = self.feature_weight * srd_feature + srd_logits
        total = self.ce_weight * ce + self.distill_weight * srd
        return total, {"ce": ce, "srd_feature": srd_feature, "srd_logits": srd_logits, "srd": srd}
