"""``train(cfg)`` and ``evaluate(cfg)``: plain functions that the entry points and tests call.

Everything here runs on every DDP rank; files and prints are rank-zero only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from detector.data import ImageFolderDataModule
from detector.errors import CheckpointError, ConfigError
from detector.module import DetectorModule
from detector.report import (
    evaluation_report,
    format_report,
    plot_confusion_matrix,
    plot_roc,
    save_figure,
    write_json,
)

log = logging.getLogger(__name__)


def _instantiate_trainer(cfg: DictConfig, output_dir: Path, **overrides) -> L.Trainer:
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    return hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(output_dir),
        **overrides,
    )


def _check_settings(cfg: DictConfig) -> None:
    """Settings that would otherwise fail deep inside Lightning, long after start-up."""
    opt = OmegaConf.select(cfg, "model.optimizer")
    if opt is not None and "lr" in opt and not float(opt.lr) > 0:
        raise ConfigError(f"model.optimizer.lr={opt.lr} must be > 0")
    epochs = OmegaConf.select(cfg, "trainer.max_epochs")
    if epochs is not None and epochs != -1 and epochs <= 0:
        raise ConfigError(f"trainer.max_epochs={epochs} must be > 0 (or -1 for no limit)")


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, keep the best checkpoint by val AUROC, then test it. Returns the final metrics."""
    _check_settings(cfg)
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule: ImageFolderDataModule = hydra.utils.instantiate(cfg.data)
    model: DetectorModule = hydra.utils.instantiate(cfg.model)
    trainer = _instantiate_trainer(cfg, output_dir)

    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if trainer.interrupted:
        log.warning("training was interrupted; last checkpoint: %s", best)
        return metrics

    if cfg.get("test") and datamodule.has_test:
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        write_test_report(model, output_dir, trainer)
    elif cfg.get("test"):
        rank_zero_only(log.info)("no test folder (data.root/test or data.test_dir): test skipped")

    metrics["best_model_path"] = best
    _print_next_steps(best, trainer)
    return metrics


@rank_zero_only
def _print_next_steps(best: str, trainer: L.Trainer) -> None:
    print(f"\nBest checkpoint: {best}")
    print(f"Run folder:      {trainer.default_root_dir}")
    print("Look further:    tensorboard --logdir logs")
    print(f"                 python eval.py ckpt={best}")


def write_test_report(model: DetectorModule, output_dir: Path, trainer: L.Trainer) -> dict:
    """Print the seed's report and write its numbers and figures into ``output_dir``."""
    probs = torch.cat(model.test_probs) if model.test_probs else torch.empty(0)
    targets = (
        torch.cat(model.test_targets) if model.test_targets else torch.empty(0, dtype=torch.long)
    )
    hp = model.hparams
    loss = trainer.callback_metrics.get("test/loss")
    report = evaluation_report(
        probs,
        targets,
        hp.class_names,
        hp.positive_class,
        model.threshold,
        loss=None if loss is None else float(loss),
    )
    if not trainer.is_global_zero:
        return report
    print("\n" + format_report(report))
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(report, output_dir / "metrics.json")
    figures = {
        "confusion_matrix": plot_confusion_matrix(report),
        "roc_curve": plot_roc(probs, targets, hp.positive_class, hp.class_names[hp.positive_class]),
    }
    for name, fig in figures.items():
        save_figure(fig, output_dir / f"{name}.png")
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):
                experiment.add_figure(f"test/{name}", fig, global_step=trainer.global_step)
    return report


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> DetectorModule:
    """A trained detector from a checkpoint, with a one-line error for every way that fails."""
    if not path:
        raise CheckpointError("ckpt is not set: pass ckpt=PATH to a .ckpt file written by train.py")
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"ckpt={path}: no such file")
    try:
        return DetectorModule.load_from_checkpoint(path, map_location=map_location)
    except PermissionError as e:
        raise CheckpointError(f"ckpt={path}: cannot read it ({e.strerror})") from e
    except Exception as e:
        raise CheckpointError(
            f"ckpt={path}: not a checkpoint of this detector ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no details'})"
        ) from e


def evaluate(cfg: DictConfig) -> dict:
    """Test a checkpoint on one device and write the report, figures and metrics.json."""
    model = load_checkpoint(cfg.get("ckpt"))
    output_dir = Path(cfg.paths.output_dir)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    if data_cfg.get("image_size") is None:
        data_cfg["image_size"] = int(model.hparams.image_size)
    datamodule: ImageFolderDataModule = hydra.utils.instantiate(data_cfg)
    if not datamodule.has_test:
        raise ConfigError("nothing to evaluate: set data.root (holding test/) or data.test_dir")
    datamodule.setup("test")
    if list(datamodule.classes) != list(model.hparams.class_names):
        raise ConfigError(
            f"test folder {datamodule.test_dir} has classes {datamodule.classes} but the "
            f"checkpoint was trained on {list(model.hparams.class_names)}"
        )
    trainer = _instantiate_trainer(cfg, output_dir, devices=1, num_nodes=1, strategy="auto")
    trainer.test(model, datamodule=datamodule)
    report = write_test_report(model, output_dir, trainer)
    report["ckpt"] = str(cfg.ckpt)
    write_json(report, output_dir / "metrics.json")
    return report
