"""The benchmark suites' weight initialisation, shared by the VGG, WideResNet and MobileNetV2 here.

Convolutions: normal(0, sqrt(2 / fan_out)) with fan_out = k_h * k_w * out_channels (He et al.);
BatchNorm: weight 1, bias 0; linear layers: bias 0, and the weight normal(0, `linear_std`) when
given (VGG, MobileNetV2) or left at torch's default (WideResNet).
"""

from __future__ import annotations

import math
from typing import Optional

from torch import nn


def init_suite_weights(model: nn.Module, linear_std: Optional[float] = None) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(module.weight, 0.0, linear_std)
            nn.init.zeros_(module.bias)
