"""Glue between the Hydra entry points and the tasks: user errors become one line, no traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from detector.errors import DetectorError

# Run folders are named to the second; the process id keeps two runs started in the same second
# apart. DDP ranks receive rank 0's folder as an override, so they never evaluate this.
if not OmegaConf.has_resolver("pid"):
    OmegaConf.register_new_resolver("pid", lambda: str(os.getpid()), use_cache=True)


def run(task: Callable[[DictConfig], dict], cfg: DictConfig) -> dict:
    try:
        return task(cfg)
    except DetectorError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
