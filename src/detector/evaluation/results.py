"""One test pass's results, written where the user looks: the predictions of every rank
gathered, the report printed, metrics.json, predictions.csv, the figures and TensorBoard.

Shared by the test at the end of training and by eval.py."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from detector.config import report_settings
from detector.data.decode import load_image
from detector.distributed import (
    gather_rows,
)
from detector.evaluation.ood import NO_OOD_MODEL, format_ood, ood_summary
from detector.evaluation.plots import (
    log_report,
    plot_confident_grid,
    plot_confusion_matrix,
    plot_pr_curve,
    plot_reliability,
    plot_roc,
    publish_figure,
    tensorboard_writers,
)
from detector.evaluation.report import (
    HEADLINE_KEYS,
    evaluation_report,
    format_report,
    most_confident,
    write_json,
    write_predictions,
)
from detector.module import DetectorModule

# Scalars Lightning logs itself during ``trainer.test`` in training runs (accuracy as "acc").
_LOGGED_BY_LIGHTNING = HEADLINE_KEYS


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
    probs, targets = _gather_predictions(model, trainer)
    # The same on every rank (the checkpoint's), so every rank gathers or none does.
    ood = gather_rows(trainer, torch.cat(model.test_ood)) if model.ood is not None else None
    tiles = gather_rows(trainer, torch.cat(model.test_tiles)) if model.test_tiles else None
    settings = settings or report_settings()
    report = _build_report(model, trainer, probs, targets, settings)
    if ood is not None and len(ood) == len(probs):
        hp = model.hparams
        report["ood"] = ood_summary(
            ood, model.ood, probs, targets, list(hp.class_names), hp.positive_class, model.threshold
        )
    if not trainer.is_global_zero:
        return report
    print("\n" + (f"== {title} ==\n" if title else "") + format_report(report))
    print(format_ood(report["ood"]) if "ood" in report else f"Out of domain: {NO_OOD_MODEL}")
    columns = (
        {}
        if "ood" not in report
        else {
            "ood_score": [repr(float(s)) for s in ood],
            "in_domain": [bool(b) for b in model.ood.in_domain(ood)],
        }
    )
    if tiles is not None and len(tiles) == len(probs):
        columns["n_tiles"] = tiles.tolist()
    samples = _write_files(report, output_dir, trainer, model, samples, probs, targets, columns)
    skip: tuple[str, ...] = ()
    if writers is None:
        writers = tensorboard_writers(trainer.loggers)
        skip = _LOGGED_BY_LIGHTNING
    figures = _figures(report, probs, targets, model, samples, settings["confident_images"])
    step = trainer.global_step
    for writer in writers:
        log_report(writer, tb_prefix, report, probs, targets, step=step, skip=skip)
        if "ood" in report:
            writer.add_scalar(f"{tb_prefix}/ood_flagged", report["ood"]["flagged"], step)
    for name, fig in figures.items():
        publish_figure(fig, output_dir / f"{name}.png", writers, f"{tb_prefix}/{name}", step)
    for writer in writers:
        writer.flush()
    return report


def _gather_predictions(
    model: DetectorModule, trainer: L.Trainer
) -> tuple[torch.Tensor, torch.Tensor]:
    """Under DDP each rank holds the predictions of its own shard: the report needs all."""
    probs = gather_rows(
        trainer, torch.cat(model.test_probs) if model.test_probs else torch.empty(0)
    )
    targets = gather_rows(
        trainer,
        torch.cat(model.test_targets) if model.test_targets else torch.empty(0, dtype=torch.long),
    )
    return probs, targets


def _build_report(
    model: DetectorModule,
    trainer: L.Trainer,
    probs: torch.Tensor,
    targets: torch.Tensor,
    settings: dict,
) -> dict:
    hp = model.hparams
    loss = trainer.callback_metrics.get("test/loss")
    return evaluation_report(
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


def _write_files(
    report: dict,
    output_dir: Path,
    trainer: L.Trainer,
    model: DetectorModule,
    samples: list[tuple[str, int]] | None,
    probs: torch.Tensor,
    targets: torch.Tensor,
    columns: dict[str, list],
) -> list[tuple[str, int]] | None:
    """Write metrics.json and, where the images are known, predictions.csv (with ``columns``
    added, one value per image); return the samples
    (the data module's test set when none are given), which the figures need too."""
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
            output_dir / "predictions.csv",
            [p for p, _ in samples],
            probs,
            targets,
            model.threshold,
            list(model.hparams.class_names),
            extra=columns,
        )
    return samples


def _figures(
    report: dict,
    probs: torch.Tensor,
    targets: torch.Tensor,
    model: DetectorModule,
    samples: list[tuple[str, int]] | None,
    confident_images: int,
) -> dict:
    """Figure name -> figure; the image grid only when every prediction has its image."""
    hp = model.hparams
    pos = hp.positive_class
    figures = {
        "confusion_matrix": plot_confusion_matrix(report),
        "roc_curve": plot_roc(probs, targets, pos, hp.class_names[pos]),
        "pr_curve": plot_pr_curve(probs, targets, pos, hp.class_names[pos]),
        "reliability": plot_reliability(report),
    }
    if samples is not None and len(samples) == len(probs) and confident_images:
        figures["confident"] = _confident_grid(samples, probs, targets, model, confident_images)
    return figures


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
