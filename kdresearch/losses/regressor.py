"""The PyTorch KD tutorial's hint loss: a trainable convolution maps the student's last feature
map onto the teacher's, and the MSE between them is the distillation term."""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from kdresearch.losses.base import WeightedDistillation, pair_error
from kdresearch.models import stage_field


class RegressorMSE(WeightedDistillation):
    """ce_weight * CE + distill_weight * MSE(regressor(student last stage), teacher last stage).

    The regressor is the tutorial's Conv2d(C_student, C_teacher, 3, padding=1), sized from the
    pair in `bind` (16 -> 32 for LightNN -> DeepNN). It belongs to the loss, so the student network
    (and its checkpoint) stays plain; the optimizer trains it through `loss.parameters()`. The two
    maps must have the same spatial size.
    """

    student_features = True
    part_name = "regressor"

    def __init__(self, ce_weight: float = 0.75, distill_weight: float = 0.25):
        super().__init__(ce_weight, distill_weight)
        self.regressor = None

    def bind(self, student, teacher, *, train_size=0, train_labels=None):
        s_size, t_size = student.stage_sizes[-1], teacher.stage_sizes[-1]
        if s_size != t_size:
            raise pair_error("regressor", f"the last feature maps differ in size ({s_size}x{s_size} vs "
                             f"{t_size}x{t_size})", student, teacher)
        self.regressor = nn.Conv2d(student.stage_channels[-1], teacher.stage_channels[-1], kernel_size=3, padding=1)
        self.teacher_fields = (stage_field(len(teacher.stage_channels) - 1),)

    def distillation_term(self, student, teacher, progress=None):
        return F.mse_loss(self.regressor(student.feature_map), teacher.feature_map)
