"""``train(cfg)``: fit, keep the best checkpoint by validation AUROC, test it; a plain function
that train.py and the tests call.

Everything here runs on every DDP rank; files and prints are rank-zero only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from detector.checkpoint import (
    check_resume_checkpoint,
    fit_into_best_checkpoint,
    load_initial_weights,
    resolve_ckpt_path,
    run_folder_of,
    safe_loading,
)
from detector.config import check_train_settings
from detector.data.datamodule import ImageFolderDataModule
from detector.distributed import (
    check_launch,
    keep_files_to_rank_zero,
    launch_rank,
)
from detector.errors import ConfigError
from detector.evaluation.ood import OODModel, check_ood_settings, fit_on_data
from detector.evaluation.per_source import source_rows, write_source_table
from detector.evaluation.report import write_csv
from detector.evaluation.results import write_test_report
from detector.module import DetectorModule
from detector.tasks.expert import expert_settings, fit_expert_after_training
from detector.tasks.trainer import build_trainer
from detector.weights import check_backbone

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, keep the best checkpoint by val AUROC, then test it. Returns the final metrics."""
    check_train_settings(cfg)
    if OmegaConf.select(cfg, "model.backbone") is not None:
        check_backbone(cfg.model.backbone)  # before the data scan, which can take a while
    if cfg.get("ood"):  # fitted after training: a typo must not cost the run
        check_ood_settings(str(cfg.ood.get("feature")), float(cfg.ood.get("quantile", 0.95)))
    expert = expert_settings(cfg.get("expert"))  # fitted after training: checked now
    if cfg.get("ckpt_path") and cfg.get("init_ckpt"):
        raise ConfigError("ckpt_path resumes a run and init_ckpt starts a new one: set one")
    resume = _resume_from(cfg)
    output_dir = Path(cfg.paths.output_dir)
    # quiet: every rank would log it, before the other ranks' log files are closed
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule: ImageFolderDataModule = hydra.utils.instantiate(cfg.data)
    if isinstance(datamodule, ImageFolderDataModule):
        datamodule.check_layout()  # folder mistakes before the model is even built
    model: DetectorModule = hydra.utils.instantiate(cfg.model, family_expert=expert is not None)
    if resume is not None:
        check_resume_checkpoint(resume, model)
    elif cfg.get("init_ckpt"):
        load_initial_weights(model, cfg.init_ckpt)
    trainer = build_trainer(cfg, output_dir)
    _start_ranks(trainer, datamodule, sync_batchnorm=bool(cfg.trainer.get("sync_batchnorm")))

    with safe_loading():  # resume reads the checkpoint with weights_only=True
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    _log_hparams(trainer, cfg, metrics)
    if trainer.is_global_zero and getattr(datamodule, "source_names", None):
        _report_sources(metrics, datamodule.source_names, output_dir)
    if trainer.interrupted:
        rank_zero_only(log.warning)("training was interrupted; last checkpoint: %s", best)
        return metrics

    if best and expert is not None:
        fit_expert_after_training(trainer, model, datamodule, Path(best), expert)
    if best and cfg.get("ood") and hasattr(datamodule, "features_dataloader"):
        _fit_ood(trainer, model, datamodule, Path(best), cfg.ood)

    # Under DDP every rank tests its own shard of the test set with the best checkpoint (one
    # Trainer, one process group: no rank waits for another) and write_test_report gathers them.
    if cfg.get("test") and datamodule.has_test:
        # Test in float32 whatever precision trained (bf16 by default on bf16 hardware): the
        # numbers then equal what eval.py, predict.py and exported models give for this checkpoint.
        trainer.strategy.precision_plugin = Precision()
        with safe_loading():
            trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        write_test_report(model, output_dir, trainer)
    elif cfg.get("test"):
        root = getattr(datamodule, "root", None)
        where = f"{root / 'test'} (or data.test_dir)" if root else "(data.test_dir is not set)"
        rank_zero_only(log.info)("no test folder %s: test skipped", where)

    metrics["best_model_path"] = best
    _print_next_steps(best, trainer)
    return metrics


def _fit_ood(
    trainer: L.Trainer, model: DetectorModule, datamodule, best: Path, settings: DictConfig
) -> None:
    """Fit the out-of-domain model with the best checkpoint's weights and store it there."""
    splits = (getattr(datamodule, "train_set", None), getattr(datamodule, "val_set", None))
    sizes = " + ".join(f"{len(s):,}" for s in splits if s is not None)
    rank_zero_only(log.info)("fitting the out-of-domain model on %s images ...", sizes)

    def fit() -> OODModel:
        model.ood = fit_on_data(
            model, datamodule, trainer, str(settings.feature), float(settings.quantile)
        )
        return model.ood

    def store(checkpoint: dict, ood: OODModel) -> dict:
        checkpoint["ood"] = ood.state()
        return checkpoint

    ood = fit_into_best_checkpoint(trainer, model, best, "out-of-domain model", fit, store)
    if ood is not None:
        rank_zero_only(log.info)(
            "out-of-domain model (%s, %d training images) stored in %s: threshold "
            "%.4g flags %.1f%% of the %d validation images",
            ", ".join(ood.models),
            ood.info["train_images"],
            best,
            ood.threshold,
            100 * ood.info["val_flagged"],
            ood.info["val_images"],
        )


def _log_hparams(trainer: L.Trainer, cfg: DictConfig, metrics: dict[str, float]) -> None:
    """The run's row in TensorBoard's HParams tab: its data, model and trainer settings with
    its final validation metrics and the best checkpoint's score (detector.tensorboard)."""
    params: dict[str, object] = {"seed": cfg.get("seed")}

    def flatten(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key not in ("_target_", "_partial_"):
                    flatten(value, f"{prefix}.{key}")
        else:
            params[prefix] = node if isinstance(node, int | float | str | bool) else str(node)

    for group in ("data", "model", "trainer"):
        flatten(OmegaConf.to_container(cfg.get(group) or {}, resolve=True), group)
    final = {k.replace("/", "_"): v for k, v in metrics.items() if k.startswith("val/")}
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "best_model_score", None) is not None:
        final["best_val_auroc"] = float(callback.best_model_score)
    for logger in trainer.loggers:
        if hasattr(logger, "log_final") and final:
            logger.log_final(params, final)


def _report_sources(metrics: dict[str, float], names: list[str], output_dir: Path) -> None:
    """Several training sources: the last validation pass per source, on screen and in
    ``val_sources.md`` / ``val_sources.csv`` (the TensorBoard tags are ``val/<source>/...``)."""
    rows = source_rows(metrics, names)
    output_dir.mkdir(parents=True, exist_ok=True)
    table = write_source_table(rows, output_dir / "val_sources.md")
    write_csv(rows, output_dir / "val_sources.csv")
    print(f"\nValidation per training source (last epoch):\n{table}")


def _resume_from(cfg: DictConfig) -> Path | None:
    """The checkpoint ``ckpt_path`` names (``last``: the newest last.ckpt of earlier runs of this
    task). A resumed run continues in the folder of the run that wrote it, so its checkpoints,
    best-model bookkeeping, history and report stay together; this session's own folder keeps
    only its log and config."""
    resume = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.task_name)
    if resume is None:
        return None
    run_dir = run_folder_of(resume)
    if run_dir is not None and run_dir != Path(cfg.paths.output_dir).resolve():
        rank_zero_only(log.info)(
            "resuming %s: training continues in %s (this session's log: %s)",
            resume,
            run_dir,
            cfg.paths.output_dir,
        )
        with open_dict(cfg):
            cfg.paths.output_dir = str(run_dir)
    else:
        rank_zero_only(log.info)("resuming from %s", resume)
    return resume


def _start_ranks(
    trainer: L.Trainer, datamodule: ImageFolderDataModule, sync_batchnorm: bool
) -> None:
    """Every process runs the code before ``fit``: refuse bad launches while there is only
    one process, then keep log files and prints to global rank 0."""
    world = trainer.num_devices * trainer.num_nodes
    per_device = datamodule.per_device_batch_size(world)
    check_launch(trainer, HydraConfig.get() if HydraConfig.initialized() else None, sync_batchnorm)
    rank = launch_rank(trainer)
    rank_zero_only.rank = rank  # Lightning sets it inside fit; prints before that need it too
    keep_files_to_rank_zero(rank)
    rank_zero_only(log.info)(
        "%d process(es) (%d device(s) x %d node(s), %s): global batch %d, %d per process",
        world,
        trainer.num_devices,
        trainer.num_nodes,
        type(trainer.strategy).__name__,
        datamodule.batch_size,
        per_device,
    )


@rank_zero_only
def _print_next_steps(best: str, trainer: L.Trainer) -> None:
    print(f"\nBest checkpoint: {best}")
    print(f"Run folder:      {trainer.default_root_dir}")
    print("Look further:    tensorboard --logdir logs")
    print(f"                 python eval.py ckpt={best}")
