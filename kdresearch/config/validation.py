"""Checks of the keys users type, run before anything starts."""

from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf

from kdresearch.errors import KDResearchError
from kdresearch.runtime import devices


def check_config(cfg: DictConfig) -> None:
    """The top-level keys users type; Hydra passes any string through, so check them here,
    before anything starts (an error after the first epoch would waste it)."""
    integers = [("epochs", 1, None), ("batch_size", 1, None), ("seed", 0, 2**32 - 1),
                ("checkpoint.keep_last", 0, None), ("teacher.epochs", 1, None), ("teacher.batch_size", 1, None)]
    if cfg.augment_seed is not None:  # null: the views follow `seed`
        integers.append(("augment_seed", 0, 2**32 - 1))
    for key, minimum, maximum in integers:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
                maximum is not None and value > maximum):
            bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
            raise KDResearchError(f"{key} must be an integer {bound}, got {value!r}")
    for key in ("T", "cache.max_gb", "tracking.retry_minutes"):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise KDResearchError(f"{key} must be a number > 0, got {value!r}")
    for key in ("data.augment", "teacher.augment", "tracking.log_model", "tracking.system_metrics"):
        if not isinstance(OmegaConf.select(cfg, key), bool):
            raise KDResearchError(f"{key} must be true or false, got {OmegaConf.select(cfg, key)!r}")
    for key, may_be_null in (("tracking.experiment", False), ("tracking.register_model", True)):
        value = OmegaConf.select(cfg, key)
        if not (value is None and may_be_null) and (not isinstance(value, str) or not value.strip()):
            raise KDResearchError(f"{key} must be a non-empty name{' or null' if may_be_null else ''}, got {value!r}")
    devices.check_precision(cfg.device.precision)
