"""Glue between the Hydra entry points and the tasks: user errors become one line, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from omegaconf import DictConfig

from detector.errors import DetectorError


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
