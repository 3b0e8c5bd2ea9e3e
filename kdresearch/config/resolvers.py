"""The config resolvers the presets use, registered with OmegaConf when `kdresearch.config` is imported.

    ${scaled_lr:BASE,BATCH}        BASE x BATCH / 256: the linear scaling rule of the ImageNet recipe
                                   (Goyal et al. 2017; lr 0.1 for batch 256, 0.2 for 512). `batch_size`
                                   is the global batch (every data-parallel process takes its share).
    ${on_cuda:TYPE,YES,NO}         YES when device.type TYPE trains on CUDA (cuda, or auto with a CUDA
                                   device here), else NO: bf16 on GPUs, the CPU default elsewhere.
"""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

REFERENCE_BATCH = 256


def scaled_lr(base_lr: float, global_batch: int) -> float:
    return float(base_lr) * int(global_batch) / REFERENCE_BATCH


def on_cuda(device_type: str, yes, no):
    uses_cuda = device_type == "cuda" or (device_type == "auto" and torch.cuda.is_available())
    return yes if uses_cuda else no


OmegaConf.register_new_resolver("scaled_lr", scaled_lr, replace=True)
OmegaConf.register_new_resolver("on_cuda", on_cuda, replace=True)
