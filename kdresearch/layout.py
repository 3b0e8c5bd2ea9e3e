"""Where things are: the configs, the project folder, and a job folder's layout.

One place knows each of them. The configs ship inside the package (`kdresearch/conf`; in a checkout
the top-level `conf/` is that same folder), so an installed wheel runs jobs from any folder. The
*project folder* holds the default MLflow store and caches: the checkout kdresearch is imported
from, or, for an installed package, the folder the job runs in.
"""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR / "conf"


def _project_root() -> Path:
    checkout = PACKAGE_DIR.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "train.py").is_file():
        return checkout
    return Path.cwd().resolve()


PROJECT_ROOT = _project_root()
# The real CIFAR-10 sample (12,000 images) the benchmarks read by default, beside the checkout.
SHARED_CIFAR10_SAMPLE = PROJECT_ROOT.parent / "shared" / "data" / "cifar10-real-10k"

# A job folder (Hydra's run folder of one job):
#   checkpoints/epoch_NNNN.pt   one per epoch, the newest `checkpoint.keep_last` kept
#   checkpoints/final.pt        the last state, also the run's artifact FINAL_CHECKPOINT
#   teacher/                    the job folder of an automatic teacher this job trained
CHECKPOINT_DIR = "checkpoints"
EPOCH_CHECKPOINTS = "epoch_*.pt"
FINAL_CHECKPOINT = f"{CHECKPOINT_DIR}/final.pt"  # also the artifact path of every run's final checkpoint
TEACHER_DIR = "teacher"


class JobFolder:
    """The files of one job folder (see the layout above)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINT_DIR

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:04d}.pt"

    def epoch_checkpoints(self) -> list[Path]:
        """Every epoch checkpoint, oldest first."""
        return sorted(self.checkpoints.glob(EPOCH_CHECKPOINTS))

    def has_epoch_checkpoint(self) -> bool:
        return bool(self.epoch_checkpoints())

    @property
    def final_checkpoint(self) -> Path:
        return self.path / FINAL_CHECKPOINT

    @property
    def teacher(self) -> "JobFolder":
        return JobFolder(self.path / TEACHER_DIR)


def train_command() -> list[str]:
    """The command line that starts one training job in a fresh process (checkout or installed package)."""
    return [sys.executable, "-m", "kdresearch.train"]
