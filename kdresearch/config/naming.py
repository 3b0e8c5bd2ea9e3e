"""Readable MLflow run names, from the loss config's defaults."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from kdresearch.layout import CONF_DIR


def run_name(cfg: DictConfig) -> str:
    """Readable MLflow run names: deep-ce, light-ce, light-kd-T2, light-kd-T4-w0.5, resnet20-dkd-T4-beta4,
    resnet8-dkd+at-T4 (a combined loss: its terms follow the loss name).

    The temperature always shows; every other `loss.*` hyperparameter shows when it differs from
    the loss config's default (`w` is the distillation weight, `ce` the cross-entropy weight).
    """
    values = OmegaConf.to_container(cfg.loss, resolve=True)
    terms = [key for key, value in values.items() if isinstance(value, dict) and "_target_" in value]
    name = "-".join([cfg.model.name, "+".join([cfg.loss.name, *terms])])  # a combined loss: resnet8-dkd+at
    defaults = loss_defaults(cfg.loss.name)
    if "T" in values:
        name += f"-T{values['T']:g}"
    short = {"distill_weight": "w", "ce_weight": "ce"}
    for key in sorted(values, key=lambda k: (k not in short, short.get(k, k))):
        value = values[key]
        if key in ("T", "name", "_target_") or key not in defaults or value == defaults[key]:
            continue
        if isinstance(value, bool):
            shown = "" if value else "-no"
        elif isinstance(value, float):
            shown = f"{value:g}"
        else:
            shown = str(value).replace(" ", "")
        name += f"-{shown}{short.get(key, key)}" if isinstance(value, bool) else f"-{short.get(key, key)}{shown}"
    return name


def loss_defaults(loss_name: str) -> dict:
    """The values conf/loss/<name>.yaml gives, its interpolations (`${T}`, `${kd_weights.ce}`)
    resolved against conf/config.yaml's own values; {} for a loss defined elsewhere."""
    path = CONF_DIR / "loss" / f"{loss_name}.yaml"
    if not path.is_file():
        return {}
    top = OmegaConf.load(CONF_DIR / "config.yaml")
    top = OmegaConf.create({key: top[key] for key in top if key not in ("defaults", "hydra")})
    merged = OmegaConf.merge(top, {"loss": OmegaConf.load(path)})
    return OmegaConf.to_container(merged.loss, resolve=True)
