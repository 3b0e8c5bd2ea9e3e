"""The training entry point: `python -m kdresearch.train`, `kdresearch-train` or the checkout's `python train.py`
(one job, or a sweep with -m). See README.md; `--help` lists the options."""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from kdresearch.errors import KDResearchError
from kdresearch.layout import CONF_DIR

log = logging.getLogger("train")


class SweepJobFailed(CompactHydraException):
    """A job of a multirun that stopped on a KDResearchError. Hydra's launchers keep the exception
    of each failed job, run the others, then raise the first one; being compact, it is printed as
    its message alone (after Hydra's "Error executing job with overrides: [...]") instead of a
    traceback, and the sweep exits 1."""


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    from kdresearch.runtime import interrupts
    from kdresearch.training.job import (
        run,  # after Hydra parsed the command line: --help stays fast
    )

    # Ctrl-C and SIGTERM (a scheduler stopping the job) stop at the next safe point: the MLflow
    # run ends KILLED and the last complete checkpoint stays.
    interrupts.install()
    try:
        return run(cfg)
    except KDResearchError as error:
        log.error("error: %s", error)  # in a sweep: one line in the failed job's place
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise SweepJobFailed(str(error)) from None  # the other jobs still run; the sweep then fails
        sys.exit(1)
    except KeyboardInterrupt:
        log.error("interrupted: the MLflow run is marked KILLED; the last epoch checkpoint is kept")
        sys.exit(interrupts.exit_status())


if __name__ == "__main__":
    main()
