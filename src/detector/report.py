"""What a run shows a person: the seed's report (metrics, confusion matrix, per-class table),
its figures (training history, confusion matrix, ROC) and the JSON that holds the numbers."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchmetrics.functional.classification import (  # noqa: E402
    binary_auroc,
    binary_confusion_matrix,
    binary_roc,
)


def evaluation_report(
    probs: torch.Tensor,
    targets: torch.Tensor,
    class_names: Sequence[str],
    positive_class: int = 1,
    threshold: float = 0.5,
    loss: float | None = None,
) -> dict:
    """All numbers of the seed's report from per-image P(class 1) and labels.

    Per-class rows treat each class in turn as positive, as scikit-learn's classification report.
    """
    probs = probs.float().flatten()
    targets = targets.long().flatten()
    preds = (probs >= threshold).long()
    cm = binary_confusion_matrix(preds, targets).long()  # rows: true class, cols: predicted
    per_class = {}
    for c, name in enumerate(class_names):
        tp = int(cm[c, c])
        predicted = int(cm[:, c].sum())
        support = int(cm[c, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    total = int(cm.sum())
    pos = class_names[positive_class]
    scores = probs if positive_class == 1 else 1.0 - probs
    labels = targets if positive_class == 1 else 1 - targets
    auc = float(binary_auroc(scores, labels)) if 0 < int(labels.sum()) < total else float("nan")
    macro = {
        k: sum(r[k] for r in per_class.values()) / len(per_class)
        for k in ("precision", "recall", "f1")
    }
    weighted = {
        k: sum(r[k] * r["support"] for r in per_class.values()) / max(total, 1)
        for k in ("precision", "recall", "f1")
    }
    report = {
        "n": total,
        "positive_class": pos,
        "threshold": threshold,
        "accuracy": float((preds == targets).float().mean()) if total else float("nan"),
        "precision": per_class[pos]["precision"],
        "recall": per_class[pos]["recall"],
        "f1": per_class[pos]["f1"],
        "auroc": auc,
        "confusion_matrix": cm.tolist(),
        "class_names": list(class_names),
        "per_class": per_class,
        "macro_avg": macro,
        "weighted_avg": weighted,
    }
    if loss is not None:
        report["loss"] = loss
    return report


def format_report(report: Mapping) -> str:
    """The seed's printed report: headline metrics, confusion matrix, classification report."""
    names = report["class_names"]
    width = max(12, *(len(n) + 2 for n in names))
    lines = [
        f"Test set: {report['n']} images; positive class {report['positive_class']}; "
        f"threshold {report['threshold']:.4f}"
    ]
    for key in ("loss", "accuracy", "precision", "recall", "f1", "auroc"):
        if key in report:
            lines.append(f"  {key:<10} {report[key]:.4f}")
    lines.append("Confusion matrix (rows: true, columns: predicted)")
    lines.append(" " * width + "".join(f"{n:>{width}}" for n in names))
    for name, row in zip(names, report["confusion_matrix"], strict=True):
        lines.append(f"{name:>{width}}" + "".join(f"{v:>{width}}" for v in row))
    lines.append("Classification report")
    lines.append(f"{'':>{width}}{'precision':>11}{'recall':>11}{'f1-score':>11}{'support':>11}")
    for name, r in report["per_class"].items():
        lines.append(
            f"{name:>{width}}{r['precision']:>11.4f}{r['recall']:>11.4f}{r['f1']:>11.4f}{r['support']:>11}"
        )
    lines.append(f"{'accuracy':>{width}}{'':>22}{report['accuracy']:>11.4f}{report['n']:>11}")
    for label, avg in (
        ("macro avg", report["macro_avg"]),
        ("weighted avg", report["weighted_avg"]),
    ):
        lines.append(
            f"{label:>{width}}{avg['precision']:>11.4f}{avg['recall']:>11.4f}{avg['f1']:>11.4f}{report['n']:>11}"
        )
    return "\n".join(lines)


def write_json(data: Mapping, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")
    return path


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


def plot_history(history: Sequence[Mapping[str, float]]) -> plt.Figure:
    """The seed's 2x2 training-history figure: accuracy, precision, recall, loss; train vs val."""
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5))
    epochs = [h["epoch"] + 1 for h in history]
    for ax, key in zip(axes.flat, ("acc", "precision", "recall", "loss"), strict=True):
        for stage in ("train", "val"):
            values = [h.get(f"{stage}/{key}") for h in history]
            if any(v is not None for v in values):
                ax.plot(
                    epochs,
                    [float("nan") if v is None else v for v in values],
                    marker="o",
                    label=stage,
                )
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    fig.savefig(path, dpi=110)
    return Path(path)
