"""The robustness sweep: every test set re-scored under each degradation (JPEG, blur,
resizing, noise), same images and threshold, both classes degraded alike."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from detector.api import Detector
from detector.data.augment import DEGRADATIONS, Degradation, check_strength
from detector.data.datamodule import ImageFolderDataModule
from detector.data.datasets import CropDataset, ImageDataset
from detector.errors import ConfigError
from detector.evaluation.metrics import ranking_metrics, threshold_metrics
from detector.evaluation.plots import (
    plot_robustness,
    publish_figure,
)
from detector.evaluation.report import (
    markdown_table,
    write_csv,
    write_json,
)
from detector.module import DetectorModule


def score_loader(trainer: L.Trainer, model: DetectorModule, loader: DataLoader) -> torch.Tensor:
    """P(class 1) per image, in loader order: the API's scoring (:meth:`Detector.score`, what
    predict.py and the exports are checked against) on the device and precision of
    ``trainer``. A plain loop: ``trainer.predict`` costs about a second of set-up per call, and
    the sweep makes a dozen calls per test set."""
    detector = Detector(model, device=trainer.strategy.root_device)
    with trainer.precision_plugin.forward_context():
        # A crop model's batches are tiles with the tile count of each image (collate_tiles).
        out = [detector.score(images, *counts) for images, _, *counts in loader]
    return torch.cat(out) if out else torch.empty(0)


def robustness_spec(cfg: DictConfig) -> dict[str, list] | None:
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


def run_robustness(
    trainer: L.Trainer,
    spec: dict[str, list],
    model: DetectorModule,
    sets: list[tuple[str, ImageFolderDataModule]],
    clean: dict[str, dict],
    output_dir: Path,
    writers: list,
) -> list[dict]:
    """One piece: Re-evaluate every test set under each degradation of ``spec`` (same images, same
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
                degrade = Degradation(kind, strength)
                dataset = (
                    CropDataset(
                        samples,
                        datamodule.image_size,
                        train=False,
                        max_tiles=datamodule.max_tiles,
                        transform=degrade,
                    )
                    if datamodule.input == "crop"
                    else ImageDataset(samples, datamodule.image_size, transform=degrade)
                )
                loader = DataLoader(
                    dataset,
                    batch_size=datamodule.batch_size,
                    num_workers=datamodule.num_workers,
                    collate_fn=getattr(dataset, "collate_fn", None),
                )
                probs = score_loader(trainer, model, loader)
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
