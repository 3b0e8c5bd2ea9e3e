"""What a finished job returns, and the one rule for what a Hydra sweeper optimises.

Kept apart from the training code (no torch import), so that a sweeper reading finished runs
back from MLflow (kdresearch.sweeps.search) applies the same rule as the job that returned it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional


def objective(metrics: Mapping[str, float]) -> Optional[float]:
    """What a sweeper optimises, from a job's last-epoch metrics: val/acc when the job held out a
    validation split (data.val_size > 0: a search must not select on the test set), else test/acc;
    None when the job logged neither."""
    for key in ("val/acc", "test/acc"):
        if key in metrics:
            return float(metrics[key])
    return None


@dataclass
class JobResult:
    run_id: str
    test_acc: float
    checkpoint: Path
    objective: float  # what a sweeper optimises (`objective`)

    @classmethod
    def of(cls, run_id: str, metrics: Mapping[str, float], checkpoint: Path) -> "JobResult":
        """From the last epoch's metrics."""
        return cls(run_id, metrics["test/acc"], checkpoint, objective(metrics))

    @classmethod
    def untracked(cls, checkpoint: Path = Path()) -> "JobResult":
        """What a data-parallel rank other than 0 returns: it tracks and evaluates nothing."""
        return cls("", float("nan"), checkpoint, float("nan"))
