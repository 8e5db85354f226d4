"""Glue between the Hydra entry points and the tasks: user errors become one line, no traceback."""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from detector.errors import ConfigError, DetectorError
from detector.overrides import check_overrides, compose_for

# Hydra flags that take the next argument as their value (not a key=value override).
_FLAGS_WITH_VALUE = {"-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn"}
_FLAGS_WITH_VALUE |= {"--config-name", "-cd", "--config-dir", "--experimental-rerun"}


# What Lightning and torch print on every command that a user cannot act on.
_NOISE = re.compile(r"^(GPU|TPU|HPU) available|Tip: |litlogger|litmodels")
_NOISY_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",  # torch deprecation inside Lightning, every run
    r"The number of training batches .* is smaller than the logging interval",  # epoch logging
    r"Precision .* is not supported by the model summary",
    # Lightning's own gather under DDP, on every run: a torch deprecation nobody here can act on
    r"torch.distributed.nn.functional.all_gather is deprecated",
    # DetectorModule logs values it has already gathered from every rank (module.py)
    r"It is recommended to use `self.log\(.*sync_dist=True\)`",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _NOISE.search(record.getMessage())


def quiet() -> None:
    """Silence the advertisements, hardware inventory and deprecation notices above; what a
    user can act on (precision chosen, checkpoint restored, real warnings) stays."""
    for pattern in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropNoise())


def _overrides(args: Sequence[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in _FLAGS_WITH_VALUE:
            skip = True
        elif not a.startswith("-"):
            out.append(a)
    return out


def preflight(config_name: str, argv: Sequence[str] | None = None) -> None:
    """Before Hydra: ``--help`` from the YAML comments, and every key=value checked against
    the keys this command reads (:mod:`detector.overrides`); a mistake is one ``error:`` line
    and exit status 2. Fast: nothing heavy is imported."""
    argv = list(sys.argv if argv is None else argv)
    quiet()
    command = Path(argv[0]).name
    conf_dir = Path(argv[0]).resolve().parent / "conf"
    overrides = _overrides(argv[1:])
    if "--help" in argv or "-h" in argv:
        from detector.help import help_text  # only for --help

        parsed = OverridesParser.create().parse_overrides(overrides)
        cfg = compose_for(conf_dir, config_name, parsed)
        chosen = {o.key_or_group: o.get_value_element_as_str() for o in parsed}
        print(help_text(command, conf_dir, config_name, cfg, chosen))
        raise SystemExit(0)
    try:
        check_overrides(command, conf_dir, config_name, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception:  # noqa: S110 - a malformed override or group: Hydra reports it itself
        pass


class _Tee:
    """stdout that also goes into the task's log file (``<run>/predict.log``, ...), so the log
    holds what the command printed; a progress bar's redraws (``\r``, escape codes) stay
    on screen only."""

    def __init__(self, stream, handler: logging.FileHandler) -> None:
        self.stream, self.handler = stream, handler

    def write(self, text: str) -> int:
        written = self.stream.write(text)
        if text and "\r" not in text and "\x1b[" not in text and self.handler.stream:
            self.handler.acquire()
            try:
                self.handler.stream.write(text)
                self.handler.flush()
            finally:
                self.handler.release()
        return written

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _log_file() -> logging.FileHandler | None:
    handlers = logging.getLogger().handlers
    return next((h for h in handlers if isinstance(h, logging.FileHandler)), None)


def user_error(error: BaseException) -> DetectorError | None:
    """The user mistake behind ``error``, if any: hydra.utils.instantiate wraps what a
    constructor raises (InstantiationException), and a user error found there is still one."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, DetectorError):
        cause = cause.__cause__
    return cause


def run(task: Callable[[DictConfig], dict], cfg: DictConfig) -> dict:
    """Run ``task``; what it prints also goes into the task's log file, and a user error
    (DetectorError) becomes one ``error:`` line with exit status 2."""
    handler = _log_file()
    stdout = sys.stdout
    if handler is not None:
        sys.stdout = _Tee(stdout, handler)
    try:
        return task(cfg)
    except Exception as e:
        cause = user_error(e)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        if handler is not None and handler.stream:
            handler.stream.write(f"error: {cause}\n")
            handler.flush()
        raise SystemExit(2) from None
    finally:
        sys.stdout = stdout
