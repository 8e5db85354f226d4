"""Every figure of the reports (matplotlib, Agg), and logging figures and report scalars to
TensorBoard."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchmetrics.functional.classification import (  # noqa: E402
    binary_auroc,
    binary_precision_recall_curve,
    binary_roc,
)

from detector.evaluation.metrics import positive_view, ranking_metrics
from detector.evaluation.report import fmt_number, scalar_keys

# The robustness figure's rows.
ROBUSTNESS_METRICS = ("accuracy", "auroc")


def plot_confusion_matrix(report: Mapping) -> plt.Figure:
    names = report["class_names"]
    cm = torch.tensor(report["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(cm, cmap="Blues")
    for i in range(len(names)):
        for j in range(len(names)):
            color = "white" if cm[i, j] > cm.max() / 2 else "black"
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", color=color)
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix (threshold {report['threshold']:.3f})")
    fig.tight_layout()
    return fig


def plot_roc(
    probs: torch.Tensor, targets: torch.Tensor, positive_class: int, class_name: str
) -> plt.Figure:
    scores = probs.float() if positive_class == 1 else 1.0 - probs.float()
    labels = targets.long() if positive_class == 1 else 1 - targets.long()
    fpr, tpr, _ = binary_roc(scores, labels)
    auc = float(binary_auroc(scores, labels))
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot(fpr.numpy(), tpr.numpy(), label=f"AUC = {auc:.4f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC (positive class {class_name})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


HISTORY_PANELS = {
    "acc": "accuracy",
    "precision": "precision",
    "recall": "recall",
    "f1": "F1",
    "auroc": "AUROC (picks the checkpoint)",
    "loss": "loss (binary cross-entropy)",
}


def plot_history(
    history: Sequence[Mapping[str, float]], best_epoch: int | None = None
) -> plt.Figure:
    """The seed's training-history figure, train vs val, plus F1 and AUROC (the metric that
    picks the checkpoint), and dotted, the validation of each training source when there are
    several (``val/<source>/acc``, ...). Epochs are numbered as in checkpoint names
    (``epoch000`` is the first); ``best_epoch``, the best checkpoint's, is marked on every
    panel."""
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    epochs = [int(h["epoch"]) for h in history]
    sources = list(dict.fromkeys(k.split("/")[1] for h in history for k in h if k.count("/") == 2))
    for ax, (key, label) in zip(axes.flat, HISTORY_PANELS.items(), strict=True):
        lines = [(s, f"{s}/{key}", "-") for s in ("train", "val")]
        lines += [(f"val {s}", f"val/{s}/{key}", ":") for s in sources]
        for name, tag, style in lines:
            values = [h.get(tag) for h in history]
            if any(v is not None for v in values):
                ax.plot(
                    epochs,
                    [float("nan") if v is None else v for v in values],
                    marker="o",
                    linestyle=style,
                    label=name,
                )
        if best_epoch is not None:
            best = f"best (epoch{best_epoch:03d})"
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=best)
        ax.set_title(key)
        ax.set_xlabel("epoch (as in checkpoint names)")
        ax.set_ylabel(label)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    fig.savefig(path, dpi=110)
    return Path(path)


def publish_figure(
    fig: plt.Figure, path: str | Path, writers: Sequence = (), tag: str = "", step: int = 0
) -> Path:
    """Save ``fig`` as a PNG and add the same pixels to each TensorBoard writer, rendering it
    once (``add_figure`` would render it again), then close it."""
    fig.set_dpi(110)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    plt.close(fig)
    Image.fromarray(rgba).convert("RGB").save(path)
    for writer in writers:
        writer.add_image(tag, rgba[..., :3], global_step=step, dataformats="HWC")
    return Path(path)


def plot_pr_curve(
    probs: torch.Tensor, targets: torch.Tensor, positive_class: int, class_name: str
) -> plt.Figure:
    scores, labels = positive_view(probs, targets, positive_class)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    if 0 < int(labels.sum()) < len(labels):
        precision, recall, _ = binary_precision_recall_curve(scores, labels)
        ap = ranking_metrics(probs, targets, positive_class)["average_precision"]
        ax.step(recall.numpy(), precision.numpy(), where="post", label=f"AP = {ap:.4f}")
        ax.axhline(float(labels.float().mean()), ls="--", color="grey", lw=1, label="chance")
        ax.legend(loc="lower left")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"Precision-recall (positive class {class_name})")
    fig.tight_layout()
    return fig


def plot_reliability(report: Mapping) -> plt.Figure:
    """Observed share of the positive class against mean predicted probability, per bin, with
    the bin counts underneath: bars below the diagonal are over-confident."""
    bins = [b for b in report["reliability"]["bins"] if b["count"]]
    pos = report["positive_class"]
    fig, (ax, hist) = plt.subplots(
        2, 1, figsize=(4.5, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    if bins:
        width = bins[0]["hi"] - bins[0]["lo"]
        ax.bar(
            [b["lo"] for b in bins],
            [b["fraction_positive"] for b in bins],
            width=width,
            align="edge",
            edgecolor="black",
            alpha=0.7,
            label="observed",
        )
        ax.plot(
            [b["mean_score"] for b in bins],
            [b["fraction_positive"] for b in bins],
            "o",
            color="C3",
            ms=4,
            label="bin mean",
        )
        hist.bar([b["lo"] for b in bins], [b["count"] for b in bins], width=width, align="edge")
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"share of {pos}")
    ax.set_title(f"Reliability (ECE = {fmt_number(report['ece'])})")
    ax.legend(loc="upper left")
    hist.set_xlim(0, 1)
    hist.set_xlabel(f"predicted P({pos})")
    hist.set_ylabel("images")
    fig.tight_layout()
    return fig


def plot_confident_grid(
    images: Mapping[str, Sequence[torch.Tensor]], titles: Mapping[str, Sequence[str]], k: int
) -> plt.Figure:
    """Rows "right" and "wrong", ``k`` columns; an empty cell where there are fewer images."""
    fig, axes = plt.subplots(2, k, figsize=(1.6 * k, 3.9), squeeze=False)
    for r, row in enumerate(("right", "wrong")):
        for c in range(k):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(images.get(row, [])):
                ax.imshow(images[row][c].permute(1, 2, 0).numpy(), interpolation="nearest")
                ax.set_title(titles[row][c], fontsize=7)
        axes[r, 0].text(
            -0.15, 0.5, row, rotation=90, va="center", ha="right", transform=axes[r, 0].transAxes
        )
    fig.suptitle("Most confident right (top) and wrong (bottom) predictions", fontsize=9)
    fig.tight_layout()
    return fig


def plot_robustness(rows: Sequence[Mapping], kinds: Sequence[str]) -> plt.Figure:
    """Accuracy (top) and AUROC (bottom) against degradation strength, one column per kind and
    one line per test set; the first point of every line is the clean set."""
    sets = list(dict.fromkeys(r["set"] for r in rows))
    fig, axes = plt.subplots(2, len(kinds), figsize=(3.2 * len(kinds), 5.5), squeeze=False)
    labels = {
        "jpeg": "JPEG quality",
        "blur": "blur sigma",
        "resize": "scale",
        "noise": "noise sigma",
    }
    for c, kind in enumerate(kinds):
        for s in sets:
            clean = [r for r in rows if r["set"] == s and r["degradation"] == "none"]
            points = clean + [r for r in rows if r["set"] == s and r["degradation"] == kind]
            ticks = [
                "clean" if r["degradation"] == "none" else f"{r['strength']:g}" for r in points
            ]
            for r_, metric in enumerate(ROBUSTNESS_METRICS):
                axes[r_, c].plot(range(len(points)), [p[metric] for p in points], "o-", label=s)
                axes[r_, c].set_xticks(range(len(points)), ticks)
        axes[1, c].set_xlabel(labels.get(kind, kind))
        axes[0, c].set_title(kind)
        for r_, metric in enumerate(ROBUSTNESS_METRICS):
            axes[r_, c].set_ylim(0, 1.02)
            axes[r_, c].grid(alpha=0.3)
            if c == 0:
                axes[r_, c].set_ylabel(metric)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def log_report(
    writer,
    prefix: str,
    report: Mapping,
    probs: torch.Tensor,
    targets: torch.Tensor,
    step: int = 0,
    skip: Sequence[str] = (),
) -> None:
    """Scalars of ``report`` and TensorBoard's own PR curve, under ``prefix/`` (``writer`` is a
    ``SummaryWriter``); ``skip`` leaves out scalars already logged elsewhere."""
    for key in ["loss", "threshold", *scalar_keys(report["class_names"])]:
        if key in report and key not in skip and not math.isnan(report[key]):
            writer.add_scalar(f"{prefix}/{key}", report[key], global_step=step)
    for row in report.get("thresholds", []):
        writer.add_scalar(f"{prefix}/accuracy_at_{row['name']}_threshold", row["accuracy"], step)
    positive = report["class_names"].index(report["positive_class"])
    scores, labels = positive_view(probs, targets, positive)
    if len(labels):
        # Not "pr_curve": that tag is the figure, and one tag holds one kind of data.
        writer.add_pr_curve(
            f"{prefix}/precision_recall", labels.numpy(), scores.float().numpy(), step, 127
        )


def tensorboard_writers(loggers) -> list:
    """The TensorBoard ``SummaryWriter``s among Lightning loggers."""
    writers = []
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_figure") and hasattr(experiment, "add_pr_curve"):
            writers.append(experiment)
    return writers
