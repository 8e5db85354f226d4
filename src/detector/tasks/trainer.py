"""The Lightning Trainer and its loggers from the config, as train and eval use them."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from detector.callbacks import training_callbacks
from detector.checkpoint import (
    AtomicCheckpointIO,
)
from detector.distributed import (
    set_collective_timeout,
)
from detector.hardware import resolve_precision


def build_trainer(cfg: DictConfig, output_dir: Path, **overrides) -> L.Trainer:
    """``overrides`` win over the config, ``callbacks`` and ``logger`` included."""
    kwargs = {
        "default_root_dir": str(output_dir),
        # The data module shards every split itself (val/test without padding): see detector.data.
        "use_distributed_sampler": False,
        **overrides,
    }
    if "callbacks" not in kwargs:
        kwargs["callbacks"] = [
            hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c
        ] + training_callbacks(cfg.get("resume_command"))  # NaN loss stops; RNG state resumes
    # Checkpoints are written to a temporary file and renamed: never half a file on disk.
    kwargs.setdefault("plugins", [AtomicCheckpointIO()])
    if "logger" not in kwargs:
        kwargs["logger"] = build_loggers(cfg) or False
    # auto: bf16-mixed where the hardware has bf16 (detector.hardware)
    if "precision" not in kwargs:
        kwargs["precision"] = resolve_precision(
            cfg.trainer.get("precision"), kwargs.get("accelerator", cfg.trainer.get("accelerator"))
        )
    trainer = hydra.utils.instantiate(cfg.trainer, **kwargs)
    set_collective_timeout(trainer, cfg.get("ddp_timeout"))
    return trainer


def build_loggers(cfg: DictConfig) -> list:
    return [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
