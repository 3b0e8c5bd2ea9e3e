"""Factor transfer, FT (Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via
Factor Transfer", NeurIPS 2018), as the authors' code (github.com/Jangho-Kim/Factor-Transfer-pytorch:
`train_Paraphraser.py`, `train_student.py`, `Models/FeatureProjection.py`, `utils.FT`), torchdistill
(`FTLoss`, `Paraphraser4FactorTransfer`, `Translator4FactorTransfer`) and RepDistiller, whose CIFAR-100
table results here are compared with (`models/util.py` Paraphraser / Translator, `helper/pretrain.py`,
`train_student.py --distill factor`), compute and train it.

The teacher's last-stage map T is "paraphrased" into a smaller factor by an encoder trained, with a
decoder, to reconstruct T; the student's last-stage map S is "translated" into a factor of the same
shape by a translator trained with the student to match it:

    paraphraser   encoder: conv3x3 (C_t -> C_t), conv3x3 (C_t -> F), conv3x3 (F -> F)
                  decoder: convT3x3 (F -> F), convT3x3 (F -> C_t), convT3x3 (C_t -> C_t)
                  each followed by LeakyReLU(0.1), no BatchNorm; F = int(C_t * paraphrase_rate)
    translator    conv3x3 (C_s -> C_s), conv3x3 (C_s -> F), conv3x3 (F -> F), each + BatchNorm + LeakyReLU(0.1)

    ft_reconstruction = mean (decoder(encoder(T)) - T)^2
    ft                = mean_{n,i} | f_s / ||f_s||_2 - f_t / ||f_t||_2 |         (p = 1)
                        f_s = translator(S), f_t = encoder(T), each flattened per sample

(the larger factor average-pooled to the smaller size first, where the two maps differ in size, as
RepDistiller does). Training, in two stages (`kdresearch.losses.init_stage`):
- epochs 1 .. init_epochs: the paraphraser alone learns to reconstruct the teacher's map; the loss
  is `ft_reconstruction`, and neither the student (its classifier included) nor the translator gets
  a gradient, so their weights stay as initialised (the student's BatchNorm running statistics still
  follow the batches: the trainer runs its forward in training mode, where RepDistiller's init stage
  runs it in eval mode);
- later epochs: ce_weight * CE + distill_weight * ft, the paraphraser frozen (its factor computed
  without gradient, as the authors detach it), the translator trained with the student.
The paraphraser, the translator and their optimizer state are the loss's (in its state_dict, and in
the one optimizer's), so in every checkpoint: a job resumed in either stage continues exactly.

Defaults: the factor loss is the paper's, the authors' code's and torchdistill's (the whole factor
flattened and L2-normalised, the mean absolute difference) with the authors' weight beta = 500;
paraphrase rate 0.5, the stage (the last) and CE weight 1 are the authors' and RepDistiller's;
init_epochs 30 is RepDistiller's (the authors' CIFAR-10 code trains the paraphraser beforehand, for
6 epochs at lr 0.1). RepDistiller's CIFAR-100 recipe trains the paraphraser for those 30 epochs
before its 240 (here `epochs=270` with the milestones shifted by 30: 180, 210, 240) with an
optimizer of its own (lr 0.01 for ResNet and WRN students, else its main lr); here the paraphraser
trains with the job's optimizer and learning rate. The differences from RepDistiller, whose table
FT row uses beta = 200: its factor loss compares normalised channel means of the squared factors
(AT's attention map, `FactorTransfer(p1=2, p2=1)`), not the whole factor; the paraphraser's
reconstruction loss is the mean squared error as there and in the paper (the authors' code uses the
mean absolute error); its translator has BatchNorm as there and in torchdistill (the authors' has
none).

Logged parts: "ce" in both stages (from detached logits in the init stage), "ft_reconstruction" in
the init stage, "ft" after it, unweighted.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kdresearch.config import validators
from kdresearch.losses.at import pool_to_common_size
from kdresearch.losses.base import number, pair_error
from kdresearch.losses.init_stage import InitStageDistillation
from kdresearch.losses.relations import computed_in_float32
from kdresearch.models import stage_field

LEAKY_SLOPE = 0.1  # the authors' LeakyReLU slope, in the paraphraser and the translator


@computed_in_float32
def factor_transfer(student_factor: torch.Tensor, teacher_factor: torch.Tensor) -> torch.Tensor:
    """mean over samples and elements of |f_s / ||f_s|| - f_t / ||f_t|||, each factor flattened per
    sample (after pooling the larger to the smaller size)."""
    student_factor, teacher_factor = pool_to_common_size(student_factor, teacher_factor)
    return (F.normalize(student_factor.flatten(1), dim=1) - F.normalize(teacher_factor.flatten(1), dim=1)).abs().mean()


@computed_in_float32
def reconstruction_error(reconstructed: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The paraphraser's init-stage loss: the mean squared error of its reconstruction."""
    return F.mse_loss(reconstructed, target)


def _layers(convs: list[nn.Module], batch_norm: bool) -> nn.Sequential:
    """Each convolution followed by (BatchNorm and) LeakyReLU(0.1)."""
    layers = []
    for conv in convs:
        layers.append(conv)
        if batch_norm:
            layers.append(nn.BatchNorm2d(conv.out_channels))
        layers.append(nn.LeakyReLU(LEAKY_SLOPE, inplace=True))
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """The teacher-side autoencoder (module docstring): `encoder` gives the factor, `forward` the
    reconstruction."""

    def __init__(self, channels: int, factor_channels: int):
        super().__init__()
        c, f = channels, factor_channels
        self.encoder = _layers([nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, f, 3, padding=1),
                                nn.Conv2d(f, f, 3, padding=1)], batch_norm=False)
        self.decoder = _layers([nn.ConvTranspose2d(f, f, 3, padding=1), nn.ConvTranspose2d(f, c, 3, padding=1),
                                nn.ConvTranspose2d(c, c, 3, padding=1)], batch_norm=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def translator(channels: int, factor_channels: int) -> nn.Sequential:
    """The student-side encoder (module docstring)."""
    c, f = channels, factor_channels
    return _layers([nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, f, 3, padding=1), nn.Conv2d(f, f, 3, padding=1)],
                   batch_norm=True)


class FactorTransfer(InitStageDistillation):
    """The paraphraser's reconstruction alone for the first `init_epochs` epochs, then ce_weight * CE +
    distill_weight * ft; module docstring. `bind` sizes the paraphraser and the translator from the
    pair's last stages."""

    student_features = True
    part_name = "ft"
    init_part_name = "ft_reconstruction"
    init_stage_optional = False

    def __init__(self, paraphrase_rate: float = 0.5, init_epochs: int = 30, ce_weight: float = 1.0,
                 distill_weight: float = 500.0):
        validators.integer("loss.init_epochs", init_epochs, at_least=1,
                           note="FT's paraphraser learns the teacher's factors in its init stage")
        super().__init__(init_epochs, ce_weight, distill_weight)
        self.paraphrase_rate = number("loss.paraphrase_rate", paraphrase_rate, positive=True)
        self.paraphraser = self.translator = None
        self.teacher_stage = None

    def bind(self, student, teacher, *, train_size=0, train_labels=None):
        super().bind(student, teacher, train_size=train_size, train_labels=train_labels)
        if not student.stage_channels or not teacher.stage_channels:
            raise pair_error("ft", "the translator and the paraphraser read each model's last stage, and one of "
                             "them has none", student, teacher)
        t_channels = teacher.stage_channels[-1]
        factor_channels = int(t_channels * self.paraphrase_rate)
        if factor_channels < 1:
            raise pair_error("ft", f"loss.paraphrase_rate={self.paraphrase_rate:g} of the teacher's {t_channels} "
                             f"last-stage channels leaves the factor no channel", student, teacher)
        self.paraphraser = Paraphraser(t_channels, factor_channels)
        self.translator = translator(student.stage_channels[-1], factor_channels)
        self.teacher_stage = len(teacher.stage_channels) - 1
        self.teacher_fields = (stage_field(self.teacher_stage),)

    def init_stage_term(self, student, teacher, progress):
        target = teacher.stages[self.teacher_stage]
        return reconstruction_error(self.paraphraser(target), target)

    def distillation_term(self, student, teacher, progress=None):
        with torch.no_grad():  # the paraphraser is frozen after its init stage
            teacher_factor = self.paraphraser.encoder(teacher.stages[self.teacher_stage])
        return factor_transfer(self.translator(student.stages[-1]), teacher_factor)
