"""Glue between the Hydra entry points and the tasks: user errors become one line, no traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

import detector.launch  # noqa: F401  (registers ${run_id:} and ${if_rank_zero:})
import detector.speed  # noqa: F401  (registers ${auto_precision:})
from detector.errors import DetectorError

# Run folders are named to the second; the process id keeps two runs started in the same second
# apart. DDP ranks receive rank 0's folder as an override, so they never evaluate this; processes
# that torchrun or srun start use the launcher's id instead (detector.launch.launcher_run_id).
if not OmegaConf.has_resolver("pid"):
    OmegaConf.register_new_resolver("pid", lambda: str(os.getpid()), use_cache=True)


def run(task: Callable[[DictConfig], dict], cfg: DictConfig) -> dict:
    try:
        return task(cfg)
    except Exception as e:
        # hydra.utils.instantiate wraps what a constructor raises (InstantiationException):
        # a user error found there is still a user error.
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, DetectorError):
            cause = cause.__cause__
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None
