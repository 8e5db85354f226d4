"""``train(cfg)`` and ``evaluate(cfg)``: plain functions that the entry points and tests call.

Everything here runs on every DDP rank; files and prints are rank-zero only.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader

from detector.augment import DEGRADATIONS, Degradation, check_strength
from detector.checkpoint import (  # noqa: F401  (load_checkpoint: predict/export import it here)
    AtomicCheckpointIO,
    check_resume_checkpoint,
    load_checkpoint,
    resolve_ckpt_path,
    run_folder_of,
    safe_loading,
    training_callbacks,
)
from detector.data import ImageDataset, ImageFolderDataModule, load_image
from detector.errors import ConfigError
from detector.launch import (
    check_launch,
    gather_rows,
    keep_files_to_rank_zero,
    launch_rank,
    set_collective_timeout,
)
from detector.metrics import ranking_metrics, threshold_metrics
from detector.module import DetectorModule
from detector.report import (
    evaluation_report,
    format_report,
    log_report,
    markdown_table,
    most_confident,
    plot_confident_grid,
    plot_confusion_matrix,
    plot_pr_curve,
    plot_reliability,
    plot_robustness,
    plot_roc,
    publish_figure,
    summary_row,
    write_csv,
    write_json,
    write_predictions,
)
from detector.speed import resolve_precision

log = logging.getLogger(__name__)


def _instantiate_trainer(cfg: DictConfig, output_dir: Path, **overrides) -> L.Trainer:
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
        ] + training_callbacks()  # stop at a NaN loss; carry the RNG state across resumes
    # Checkpoints are written to a temporary file and renamed: never half a file on disk.
    kwargs.setdefault("plugins", [AtomicCheckpointIO()])
    if "logger" not in kwargs:
        kwargs["logger"] = _instantiate_loggers(cfg) or False
    if "precision" not in kwargs:  # auto: bf16-mixed where the hardware has bf16 (detector.speed)
        kwargs["precision"] = resolve_precision(
            cfg.trainer.get("precision"), kwargs.get("accelerator", cfg.trainer.get("accelerator"))
        )
    trainer = hydra.utils.instantiate(cfg.trainer, **kwargs)
    set_collective_timeout(trainer, cfg.get("ddp_timeout"))
    return trainer


def _instantiate_loggers(cfg: DictConfig) -> list:
    return [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c]


def _check_settings(cfg: DictConfig) -> None:
    """Settings that would otherwise fail deep inside Lightning, long after start-up."""
    opt = OmegaConf.select(cfg, "model.optimizer")
    if opt is not None and "lr" in opt and not float(opt.lr) > 0:
        raise ConfigError(f"model.optimizer.lr={opt.lr} must be > 0")
    for key in ("data.image_size", "data.batch_size"):
        value = OmegaConf.select(cfg, key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value <= 0
        ):
            raise ConfigError(f"{key}={value} must be a positive integer")
    backbone = OmegaConf.select(cfg, "model.backbone")
    if backbone is not None:
        import difflib

        import timm

        if not timm.is_model(backbone):
            close = difflib.get_close_matches(str(backbone), timm.list_models(), n=5)
            hint = f" (similar: {', '.join(close)})" if close else ""
            raise ConfigError(
                f"model.backbone={backbone!r} is not a timm model{hint}; see timm.list_models()"
            )
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
            rank_zero_only(log.warning)(
                "trainer.max_epochs=%d is not a multiple of trainer.check_val_every_n_epoch=%d:"
                " the last %d epoch(s) are trained but never validated, so the best checkpoint"
                " cannot include them",
                epochs,
                every,
                epochs % every,
            )


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, keep the best checkpoint by val AUROC, then test it. Returns the final metrics."""
    _check_settings(cfg)
    resume = _resume_from(cfg)
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule: ImageFolderDataModule = hydra.utils.instantiate(cfg.data)
    if isinstance(datamodule, ImageFolderDataModule):
        datamodule.check_layout()  # folder mistakes before the model is even built
    model: DetectorModule = hydra.utils.instantiate(cfg.model)
    if resume is not None:
        check_resume_checkpoint(resume, model)
    trainer = _instantiate_trainer(cfg, output_dir)
    _start_ranks(trainer, datamodule, sync_batchnorm=bool(cfg.trainer.get("sync_batchnorm")))

    with safe_loading():  # resume reads the checkpoint with weights_only=True
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if trainer.interrupted:
        rank_zero_only(log.warning)("training was interrupted; last checkpoint: %s", best)
        return metrics

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


# Scalars Lightning logs itself during ``trainer.test`` in training runs.
_LOGGED_BY_LIGHTNING = ("loss", "precision", "recall", "f1", "auroc")


def _report_settings(cfg: DictConfig | None = None) -> dict:
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


def write_test_report(
    model: DetectorModule,
    output_dir: Path,
    trainer: L.Trainer,
    *,
    samples: list[tuple[str, int]] | None = None,
    writers: list | None = None,
    tb_prefix: str = "test",
    settings: dict | None = None,
    title: str | None = None,
) -> dict:
    """Print the report of the last ``trainer.test`` and write it into ``output_dir``:
    metrics.json, predictions.csv, figures, and TensorBoard scalars, PR curve and figures.

    ``samples`` (path, label) are the test images in loader order (default: the attached
    data module's test set); ``writers`` are TensorBoard ``SummaryWriter``s (default: the
    trainer's loggers', whose test scalars Lightning has already logged).
    """
    # Under DDP each rank holds the predictions of its own shard: the report needs all of them.
    probs = gather_rows(
        trainer, torch.cat(model.test_probs) if model.test_probs else torch.empty(0)
    )
    targets = gather_rows(
        trainer,
        torch.cat(model.test_targets) if model.test_targets else torch.empty(0, dtype=torch.long),
    )
    settings = settings or _report_settings()
    hp = model.hparams
    loss = trainer.callback_metrics.get("test/loss")
    report = evaluation_report(
        probs,
        targets,
        hp.class_names,
        hp.positive_class,
        model.threshold,
        loss=None if loss is None else float(loss),
        threshold_fit=model.threshold_fit,
        bootstrap_resamples=settings["bootstrap_resamples"],
        bootstrap_seed=settings["bootstrap_seed"],
        calibration_bins=settings["calibration_bins"],
    )
    if not trainer.is_global_zero:
        return report
    print("\n" + (f"== {title} ==\n" if title else "") + format_report(report))
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(report, output_dir / "metrics.json")
    if samples is None:
        test_set = getattr(trainer.datamodule, "test_set", None) if trainer.datamodule else None
        samples = list(test_set.samples) if test_set is not None else None
    # limit_test_batches / fast_dev_run test a prefix on one device; under DDP a prefix of each
    # rank's shard, which names no prefix of the samples: no per-image output then.
    partial_ok = trainer.world_size == 1
    if (
        samples is not None
        and len(samples) >= len(probs)
        and (partial_ok or len(samples) == len(probs))
    ):
        samples = samples[: len(probs)]
        write_predictions(
            output_dir / "predictions.csv", [p for p, _ in samples], probs, targets, model.threshold
        )
    skip: tuple[str, ...] = ()
    if writers is None:
        writers = _writers(trainer.loggers)
        skip = (*_LOGGED_BY_LIGHTNING, "accuracy")
    pos = hp.positive_class
    figures = {
        "confusion_matrix": plot_confusion_matrix(report),
        "roc_curve": plot_roc(probs, targets, pos, hp.class_names[pos]),
        "pr_curve": plot_pr_curve(probs, targets, pos, hp.class_names[pos]),
        "reliability": plot_reliability(report),
    }
    if samples is not None and len(samples) == len(probs) and settings["confident_images"]:
        figures["confident"] = _confident_grid(
            samples, probs, targets, model, settings["confident_images"]
        )
    step = trainer.global_step
    for writer in writers:
        log_report(writer, tb_prefix, report, probs, targets, step=step, skip=skip)
    for name, fig in figures.items():
        publish_figure(fig, output_dir / f"{name}.png", writers, f"{tb_prefix}/{name}", step)
    for writer in writers:
        writer.flush()
    return report


def _writers(loggers) -> list:
    """The TensorBoard ``SummaryWriter``s among Lightning loggers."""
    writers = []
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_figure") and hasattr(experiment, "add_pr_curve"):
            writers.append(experiment)
    return writers


def _confident_grid(
    samples: list[tuple[str, int]],
    probs: torch.Tensor,
    targets: torch.Tensor,
    model: DetectorModule,
    k: int,
):
    names = list(model.hparams.class_names)
    picked = most_confident(probs, targets, model.threshold, k)
    images, titles = {}, {}
    for row, indices in picked.items():
        images[row] = [load_image(samples[i][0], int(model.hparams.image_size)) for i in indices]
        titles[row] = []
        for i in indices:
            p = float(probs[i])
            predicted = int(p >= model.threshold)
            confidence = p if predicted == 1 else 1 - p
            titles[row].append(f"{names[int(targets[i])]}: P({names[predicted]})={confidence:.3f}")
    return plot_confident_grid(images, titles, k)


def _test_sets(cfg: DictConfig, model: DetectorModule) -> list[tuple[str, ImageFolderDataModule]]:
    """(name, data module set up for test) per test set: ``data.test_dirs`` ({name: folder} or
    a list of folders), else the one of ``data.test_dir`` / ``data.root``/test, named "test"."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    spec = data_cfg.pop("test_dirs", None)
    if data_cfg.get("root") == "???":
        data_cfg["root"] = None
    if data_cfg.get("image_size") is None:
        data_cfg["image_size"] = int(model.hparams.image_size)
    split = cfg.get("split") or "test"
    if split not in ("test", "val"):
        raise ConfigError(f"split={split!r} must be test or val")
    if split == "val":
        return [("val", _validation_set(cfg, data_cfg, spec, model))]
    if not spec:
        datamodule: ImageFolderDataModule = hydra.utils.instantiate(data_cfg)
        if not data_cfg.get("test_dir"):
            datamodule.prepare_data()  # e.g. the demo set, made on first use
        if not datamodule.has_test:
            raise ConfigError(
                "nothing to evaluate: set data.root (holding test/), data.test_dir or "
                "data.test_dirs"
            )
        sets = [("test", datamodule)]
    else:
        if data_cfg.get("test_dir"):
            raise ConfigError("set data.test_dirs or data.test_dir, not both")
        sets = [
            (name, hydra.utils.instantiate({**data_cfg, "test_dir": folder}))
            for name, folder in _name_test_dirs(spec)
        ]
    for name, datamodule in sets:
        # bad_files.json beside the set's report
        datamodule.report_dir = Path(cfg.paths.output_dir) / (name if len(sets) > 1 else "")
        datamodule.setup("test")
        _check_classes(f"test folder {datamodule.test_dir}", datamodule, model)
    return sets


def _validation_set(
    cfg: DictConfig, data_cfg: dict, spec, model: DetectorModule
) -> ImageFolderDataModule:
    """``split=val``: the seeded validation split of the training folder, evaluated as a test
    set. It is where thresholds and recipes are tuned, so the test split stays untouched."""
    if spec or data_cfg.get("test_dir"):
        raise ConfigError(
            "split=val evaluates the validation split of data.root/train (or data.train_dir): "
            "drop data.test_dir / data.test_dirs"
        )
    datamodule: ImageFolderDataModule = hydra.utils.instantiate(data_cfg)
    datamodule.report_dir = Path(cfg.paths.output_dir)
    datamodule.prepare_data()
    datamodule.setup("fit")
    _check_classes(f"training folder {datamodule.train_dir}", datamodule, model)
    datamodule.test_set = datamodule.val_set
    return datamodule


def _check_classes(what: str, datamodule: ImageFolderDataModule, model: DetectorModule) -> None:
    if list(datamodule.classes) != list(model.hparams.class_names):
        raise ConfigError(
            f"{what} has classes {datamodule.classes} but the checkpoint was trained on "
            f"{list(model.hparams.class_names)}"
        )


def _name_test_dirs(spec) -> list[tuple[str, str]]:
    if isinstance(spec, dict):
        items = [(str(k), str(v)) for k, v in spec.items()]
    elif isinstance(spec, list | tuple):
        items = []
        for folder in map(str, spec):
            path = Path(folder).expanduser()
            name = path.parent.name if path.name in ("test", "val", "train") else path.name
            base, i = name or "set", 2
            while name in {n for n, _ in items} or not name:
                name, i = f"{base}_{i}", i + 1
            items.append((name, folder))
    else:
        raise ConfigError(
            f"data.test_dirs={spec!r} must be a mapping {{name: folder}} or a list of folders"
        )
    for name, folder in items:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", "..", "all"):
            raise ConfigError(
                f"data.test_dirs: set name {name!r} must be letters, digits, '_', '-' or '.' "
                "(and not 'all'): it names the set's output folder"
            )
        if not folder or folder == "None":
            raise ConfigError(f"data.test_dirs.{name} has no folder")
    return items


def _tensorboard(cfg: DictConfig) -> tuple[list, list]:
    """Loggers of the config and their TensorBoard writers: eval writes its own tags (one
    prefix per test set) rather than Lightning's ``test/`` ones, which would collide."""
    loggers = _instantiate_loggers(cfg)
    return loggers, _writers(loggers)


def _predict(trainer: L.Trainer, model: DetectorModule, loader: DataLoader) -> torch.Tensor:
    """P(class 1) per image, in loader order, on the device and precision of ``trainer`` (which
    has run ``test``). A plain loop: ``trainer.predict`` costs about a second of set-up per
    call, and the robustness sweep makes a dozen calls per test set."""
    device, before = trainer.strategy.root_device, model.device
    if device != before:
        model.to(device)
    model.eval()
    out = []
    with torch.inference_mode(), trainer.precision_plugin.forward_context():
        for images, _ in loader:
            out.append(torch.sigmoid(model(images.to(device)).float()).cpu())
    if device != before:
        model.to(before)
    return torch.cat(out) if out else torch.empty(0)


def _robustness_spec(cfg: DictConfig) -> dict[str, list] | None:
    """``robustness`` as {degradation: [strengths]}, checked before any image is read."""
    if cfg.get("robustness") is None:
        return None
    if not isinstance(cfg.robustness, DictConfig):
        raise ConfigError(f"robustness={cfg.robustness!r}: pick a config, e.g. robustness=default")
    spec = OmegaConf.to_container(cfg.robustness, resolve=True)
    for kind in spec:
        if kind not in DEGRADATIONS:
            raise ConfigError(
                f"robustness.{kind} is not a degradation (known: {', '.join(DEGRADATIONS)})"
            )
        if spec[kind] is not None and not isinstance(spec[kind], list):
            raise ConfigError(f"robustness.{kind}={spec[kind]!r} must be a list of strengths")
        for strength in spec[kind] or []:
            check_strength(kind, strength, f"robustness.{kind}")
    return {k: v for k, v in spec.items() if v}


def _robustness(
    trainer: L.Trainer,
    spec: dict[str, list],
    model: DetectorModule,
    sets: list[tuple[str, ImageFolderDataModule]],
    clean: dict[str, dict],
    output_dir: Path,
    writers: list,
) -> list[dict]:
    """Re-evaluate every test set under each degradation of ``spec`` (same images, same
    threshold, both classes degraded alike): a table and a figure in the run folder."""
    kinds = list(spec)
    names = list(model.hparams.class_names)
    pos = model.hparams.positive_class
    rows = []
    for set_name, datamodule in sets:
        samples = datamodule.test_set.samples
        base = clean[set_name]
        rows.append(_robustness_row(set_name, "none", 0, base, names))
        for kind in kinds:
            for strength in spec[kind]:
                dataset = ImageDataset(
                    samples, datamodule.image_size, transform=Degradation(kind, strength)
                )
                loader = DataLoader(
                    dataset, batch_size=datamodule.batch_size, num_workers=datamodule.num_workers
                )
                probs = _predict(trainer, model, loader)
                targets = torch.tensor([y for _, y in samples[: len(probs)]])
                m = threshold_metrics(probs, targets, model.threshold, names, pos)
                m.update(ranking_metrics(probs, targets, pos))
                rows.append(_robustness_row(set_name, kind, strength, m, names))
    columns = list(rows[0])
    print(f"\nRobustness (threshold {model.threshold:.4f}; every image degraded alike):")
    print(markdown_table(rows, columns))
    write_csv(rows, output_dir / "robustness.csv", columns)
    write_json({"threshold": model.threshold, "rows": rows}, output_dir / "robustness.json")
    fig = plot_robustness(rows, kinds)
    publish_figure(fig, output_dir / "robustness.png", writers, "robustness")
    for writer in writers:
        for set_name, _ in sets:
            for kind in kinds:
                # Step = level: 0 clean, then the strengths in config order (see the figure).
                points = [r for r in rows if r["set"] == set_name and r["degradation"] == "none"]
                points += [r for r in rows if r["set"] == set_name and r["degradation"] == kind]
                for level, r in enumerate(points):
                    for metric in ("accuracy", "auroc"):
                        if not math.isnan(r[metric]):
                            tag = f"robustness/{set_name}/{kind}/{metric}"
                            writer.add_scalar(tag, r[metric], global_step=level)
    return rows


def _robustness_row(set_name: str, kind: str, strength, m: dict, names: list[str]) -> dict:
    return {
        "set": set_name,
        "degradation": kind,
        "strength": strength,
        "accuracy": m["accuracy"],
        "balanced_accuracy": m["balanced_accuracy"],
        **{f"accuracy_{n}": m[f"accuracy_{n}"] for n in names},
        "auroc": m["auroc"],
        "average_precision": m["average_precision"],
    }


def evaluate(cfg: DictConfig) -> dict:
    """Test a checkpoint on one device on one or more test sets (and, with ``robustness``,
    under degradations); print and write the reports, tables, figures and predictions.

    Returns the first set's report (``accuracy``, ``auroc``, ... at top level) with ``table``
    (one row per set, plus the pooled "all" row) and ``sets`` / ``robustness`` when present.
    """
    model = load_checkpoint(cfg.get("ckpt"))
    output_dir = Path(cfg.paths.output_dir)
    settings = _report_settings(cfg)
    robustness = _robustness_spec(cfg)
    sets = _test_sets(cfg, model)
    trainer = _instantiate_trainer(
        cfg, output_dir, devices=1, num_nodes=1, strategy="auto", logger=False
    )
    loggers, writers = _tensorboard(cfg)
    several = len(sets) > 1
    reports, results = {}, {}
    for name, datamodule in sets:
        trainer.test(model, dataloaders=datamodule.test_dataloader(), verbose=False)
        samples = datamodule.test_set.samples
        reports[name] = write_test_report(
            model,
            output_dir / name if several else output_dir,
            trainer,
            samples=samples,
            writers=writers,
            tb_prefix=f"test/{name}" if several else "test",
            settings=settings,
            title=f"{name}: {datamodule.test_dir}" if several else None,
        )
        probs, targets = torch.cat(model.test_probs), torch.cat(model.test_targets)
        results[name] = (probs, targets, [p for p, _ in samples[: len(probs)]])

    table = [summary_row(name, report) for name, report in reports.items()]
    if several:
        probs = torch.cat([r[0] for r in results.values()])
        targets = torch.cat([r[1] for r in results.values()])
        pooled = evaluation_report(
            probs,
            targets,
            model.hparams.class_names,
            model.hparams.positive_class,
            model.threshold,
            threshold_fit=model.threshold_fit,
            bootstrap_resamples=settings["bootstrap_resamples"],
            bootstrap_seed=settings["bootstrap_seed"],
            calibration_bins=settings["calibration_bins"],
        )
        table.append(summary_row("all", pooled))
        write_predictions(
            output_dir / "predictions.csv",
            [p for r in results.values() for p in r[2]],
            probs,
            targets,
            model.threshold,
            sets=[name for name, r in results.items() for _ in r[2]],
        )
    columns = list(table[0])
    shown = [c for c in columns if not c.endswith(("_ci_low", "_ci_high"))]
    print(
        f"\nPer test set (threshold {model.threshold:.4f}; positive class "
        f"{reports[sets[0][0]]['positive_class']}):"
    )
    print(markdown_table(table, shown))
    write_csv(table, output_dir / "sets.csv", columns)
    write_json({"rows": table}, output_dir / "sets.json")

    final = {**reports[sets[0][0]], "ckpt": str(cfg.ckpt), "table": table}
    if several:
        final["sets"] = reports
    if robustness:
        final["robustness"] = _robustness(
            trainer, robustness, model, sets, reports, output_dir, writers
        )
    write_json(final, output_dir / "metrics.json")
    for logger in loggers:
        logger.finalize("success")
    return final
