"""Config glue: every OmegaConf resolver the YAML files use, and the checks of settings that
would otherwise fail deep inside Lightning.

Call :func:`register_resolvers` before composing a config (the entry points, tests and bench
do); nothing is registered as a side effect of importing a module."""

from __future__ import annotations

import logging
import os

from omegaconf import DictConfig, OmegaConf

from detector.errors import ConfigError
from detector.hardware import AUTO, auto_precision, auto_workers
from detector.launch_env import launcher_rank_is_zero, launcher_run_id

log = logging.getLogger(__name__)


def register_resolvers() -> None:
    """Register every resolver the YAML files use (idempotent).

    * ``${run_id:<time>_<pid>}`` (conf/hydra): the run folder's name, or the id that every
      process of a torchrun / srun launch sees (:func:`detector.distributed.launcher_run_id`).
    * ``${if_rank_zero:.hydra}``: keeps the saved config to the first process (Lightning's
      re-launched ranks already get null).
    * ``${cwd:}`` (conf/paths): the folder the command was started from. Hydra's
      ``${hydra:runtime.cwd}`` is the same but unset while a multirun names its sweep folder.
    * ``${pid:}``: run folders are named to the second; the process id keeps two runs started in
      the same second apart (DDP ranks receive rank 0's folder, so never evaluate it).
    * ``${auto_precision:accelerator}`` (conf/trainer), ``${auto_workers:accelerator}``
      (conf/data): the defaults of :mod:`detector.hardware` for this machine.
    """
    resolvers = {
        "run_id": _run_id,
        "if_rank_zero": _if_rank_zero,
        "cwd": os.getcwd,
        "pid": lambda: str(os.getpid()),
        "auto_precision": lambda accelerator=AUTO: auto_precision(accelerator),
        "auto_workers": lambda accelerator=AUTO: auto_workers(accelerator),
    }
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver, use_cache=name == "pid")


def _run_id(default: str) -> str:
    return launcher_run_id() or default


def _if_rank_zero(value: str) -> str | None:
    return value if launcher_rank_is_zero() else None


def check_train_settings(cfg: DictConfig) -> None:
    """Settings that would otherwise fail deep inside Lightning, long after start-up.

    Settings that belong to one object are checked by it (the data module checks ``data.*``,
    the LightningModule ``model.*``, :func:`detector.weights.check_backbone` the backbone), each
    once; here only what spans the config (optimizer factory, trainer epochs and validation).
    """
    opt = OmegaConf.select(cfg, "model.optimizer")
    if opt is not None and "lr" in opt and not float(opt.lr) > 0:
        raise ConfigError(f"model.optimizer.lr={opt.lr} must be > 0")
    epochs = OmegaConf.select(cfg, "trainer.max_epochs")
    if epochs is not None and epochs != -1 and epochs <= 0:
        raise ConfigError(f"trainer.max_epochs={epochs} must be > 0 (or -1 for no limit)")
    every = OmegaConf.select(cfg, "trainer.check_val_every_n_epoch")
    if isinstance(every, int) and every > 0 and epochs is not None and epochs > 0:
        # The best checkpoint is chosen by val AUROC: an unvalidated run would keep none, and
        # an unvalidated last epoch would be trained but never kept as the best.
        if epochs < every:
            raise ConfigError(
                f"trainer.max_epochs={epochs} is less than trainer.check_val_every_n_epoch="
                f"{every}: the run would never validate, so no best checkpoint; lower the latter"
            )
        if epochs % every:
            from lightning.pytorch.utilities import rank_zero_only  # training only

            rank_zero_only(log.warning)(
                "trainer.max_epochs=%d is not a multiple of trainer.check_val_every_n_epoch=%d:"
                " the last %d epoch(s) are trained but never validated, so the best checkpoint"
                " cannot include them",
                epochs,
                every,
                epochs % every,
            )


def report_settings(cfg: DictConfig | None = None) -> dict:
    """``report:`` of eval.yaml (bootstrap, calibration bins, image grid), with defaults for
    training runs whose config has no such block."""
    settings = {
        "bootstrap_resamples": 1000,
        "bootstrap_seed": 0,
        "calibration_bins": 15,
        "confident_images": 8,
    }
    given = OmegaConf.select(cfg, "report") if cfg is not None else None
    if given:
        unknown = set(given) - set(settings)
        if unknown:
            raise ConfigError(
                f"report.{sorted(unknown)[0]} is not a report setting ({', '.join(settings)})"
            )
        settings.update(OmegaConf.to_container(given, resolve=True))
    for key in ("bootstrap_resamples", "calibration_bins", "confident_images"):
        if not isinstance(settings[key], int) or settings[key] < (key != "bootstrap_resamples"):
            raise ConfigError(f"report.{key}={settings[key]} must be a positive integer")
    return settings
