"""``evaluate(cfg)``: test a checkpoint on one device on one or more test sets."""

from __future__ import annotations

import re
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from detector.checkpoint import (
    load_checkpoint,
)
from detector.config import report_settings
from detector.data.contract import Preprocessing
from detector.data.datamodule import ImageFolderDataModule
from detector.errors import ConfigError
from detector.evaluation.plots import tensorboard_writers
from detector.evaluation.report import (
    evaluation_report,
    markdown_table,
    summary_row,
    write_csv,
    write_json,
    write_predictions,
)
from detector.evaluation.results import write_test_report
from detector.evaluation.robustness import robustness_spec, run_robustness
from detector.module import DetectorModule
from detector.tasks.expert import refit_expert
from detector.tasks.ood import ood_reference, ood_separation, refit_ood
from detector.tasks.trainer import build_loggers, build_trainer


def data_config(cfg: DictConfig, model: DetectorModule) -> tuple[dict, object]:
    """``data`` as plain values at the checkpoint's image size, and ``data.test_dirs`` apart."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    spec = data_cfg.pop("test_dirs", None)
    if data_cfg.get("root") == "???":
        data_cfg["root"] = None
    contract = Preprocessing.from_hparams(model.hparams)
    given = data_cfg.get("input")
    if given is not None and given != contract.input:
        raise ConfigError(
            f"data.input={given} but the checkpoint was trained with data.input={contract.input}: "
            "eval follows the checkpoint's preprocessing; drop the setting"
        )
    data_cfg["input"] = contract.input
    for key in ("image_size", "max_tiles"):
        if data_cfg.get(key) is None:
            data_cfg[key] = getattr(contract, key)
    return data_cfg, spec


def _test_sets(cfg: DictConfig, model: DetectorModule) -> list[tuple[str, ImageFolderDataModule]]:
    """(name, data module set up for test) per test set: ``data.test_dirs`` ({name: folder} or
    a list of folders), else the one of ``data.test_dir`` / ``data.root``/test, named "test"."""
    data_cfg, spec = data_config(cfg, model)
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
    loggers = build_loggers(cfg)
    return loggers, tensorboard_writers(loggers)


def evaluate(cfg: DictConfig) -> dict:
    """Test a checkpoint on one device on one or more test sets (and, with ``robustness``,
    under degradations); print and write the reports, tables, figures and predictions.
    Returns the first set's report (``accuracy``, ``auroc``, ... at top level) with ``table``
    (one row per set, plus the pooled "all" row) and ``sets`` / ``robustness`` when present."""
    if cfg.get("ckpt"):
        print(f"loading the model from {cfg.ckpt} ...", flush=True)
    model = load_checkpoint(cfg.get("ckpt"))
    output_dir = Path(cfg.paths.output_dir)
    settings = report_settings(cfg)
    robustness = robustness_spec(cfg)
    sets = _test_sets(cfg, model)
    reference = ood_reference(cfg, [name for name, _ in sets])
    trainer = build_trainer(cfg, output_dir, devices=1, num_nodes=1, strategy="auto", logger=False)
    sets_data = data_config(cfg, model)[0]
    for refit in (refit_expert, refit_ood):  # onto a checkpoint, when asked: new files
        refit(cfg, sets_data, model, trainer, output_dir)
    loggers, writers = _tensorboard(cfg)
    several = len(sets) > 1
    reports, results, ood_scores = {}, {}, {}
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
        if model.test_ood:
            ood_scores[name] = torch.cat(model.test_ood)

    table = [summary_row(name, report) for name, report in reports.items()]
    for row, report in zip(table, reports.values(), strict=True):
        if "ood" in report:
            row["ood_flagged"] = report["ood"]["flagged"]
    if several:
        table.append(_pool(results, model, settings, output_dir))
    _write_table(table, model.threshold, reports[sets[0][0]]["positive_class"], output_dir)

    final = {**reports[sets[0][0]], "ckpt": str(cfg.ckpt), "table": table}
    if several:
        final["sets"] = reports
    if reference:
        final["ood_reference"] = ood_separation(reference, ood_scores, writers)
    if robustness:
        final["robustness"] = run_robustness(
            trainer, robustness, model, sets, reports, output_dir, writers
        )
    write_json(final, output_dir / "metrics.json")
    for logger in loggers:
        logger.finalize("success")
    _print_written(output_dir, list(reports) if several else [], bool(loggers))
    return final


def _print_written(output_dir: Path, set_folders: list[str], tensorboard: bool) -> None:
    """Where the report went: a user should not have to search the run folder for it."""
    figures = sorted(p.name for p in output_dir.glob("*.png"))
    tables = sorted(p.name for p in output_dir.iterdir() if p.suffix in (".json", ".csv"))
    print(f"\nWritten to {output_dir}:")
    print(f"  {', '.join(tables)}")
    if set_folders:
        print(f"  one folder per set ({', '.join(set_folders)}) with its report and figures")
    if figures:
        print(f"  figures: {', '.join(figures)}")
    if tensorboard:
        print(f"  TensorBoard: tensorboard --logdir {output_dir}")


def _pool(
    results: dict[str, tuple[torch.Tensor, torch.Tensor, list[str]]],
    model: DetectorModule,
    settings: dict,
    output_dir: Path,
) -> dict:
    """The "all" row of several test sets (their images pooled), and one predictions.csv that
    names each image's set."""
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
    write_predictions(
        output_dir / "predictions.csv",
        [p for r in results.values() for p in r[2]],
        probs,
        targets,
        model.threshold,
        list(model.hparams.class_names),
        sets=[name for name, r in results.items() for _ in r[2]],
    )
    return summary_row("all", pooled)


def _write_table(table: list[dict], threshold: float, positive: str, output_dir: Path) -> None:
    """The per-set table on screen (without confidence bounds) and, whole, in sets.csv/json."""
    columns = list(table[0])
    shown = [c for c in columns if not c.endswith(("_ci_low", "_ci_high"))]
    print(f"\nPer test set (threshold {threshold:.4f}; positive class {positive}):")
    print(markdown_table(table, shown))
    write_csv(table, output_dir / "sets.csv", columns)
    write_json({"rows": table}, output_dir / "sets.json")
