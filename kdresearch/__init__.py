"""kdresearch: knowledge-distillation experiments as Hydra jobs tracked in MLflow."""

from kdresearch.errors import KDResearchError

__all__ = ["KDResearchError"]
