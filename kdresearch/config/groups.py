"""Building a config group's object from its `_target_`, with one-line errors."""

from __future__ import annotations

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kdresearch.errors import KDResearchError


def build(node: DictConfig, group: str, *args):
    """Instantiate a config group's `_target_` (dropping its short `name`), with one-line errors."""
    params = OmegaConf.to_container(node, resolve=True)
    params.pop("name", None)
    try:
        made = instantiate(params)
        return made(*args) if args else made
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, KDResearchError):
            raise cause from None
        raise KDResearchError(f"{group}: {cause or error}") from None
    except (TypeError, ValueError) as error:  # e.g. torch.optim.SGD's own checks of its options
        raise KDResearchError(f"{group}: {error}") from None
