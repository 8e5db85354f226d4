"""What a run shows a person: the evaluation report (the seed's metrics, confusion matrix and
per-class table, extended with the numbers forensics papers report), its figures, tables and the
JSON/CSV files that hold the numbers."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchmetrics.functional.classification import (  # noqa: E402
    binary_auroc,
    binary_precision_recall_curve,
    binary_roc,
)

from detector.metrics import (  # noqa: E402
    FPR_LEVELS,
    bootstrap_ci,
    positive_view,
    predict,
    ranking_metrics,
    reliability_bins,
    threshold_metrics,
    tpr_at_fpr_key,
)

# Threshold-dependent numbers shown for every threshold the report compares.
THRESHOLD_KEYS = ("accuracy", "balanced_accuracy", "precision", "recall", "f1")


def evaluation_report(
    probs: torch.Tensor,
    targets: torch.Tensor,
    class_names: Sequence[str],
    positive_class: int = 1,
    threshold: float = 0.5,
    loss: float | None = None,
    *,
    threshold_fit: Mapping | None = None,
    default_threshold: float = 0.5,
    bootstrap_resamples: int = 1000,
    bootstrap_seed: int = 0,
    calibration_bins: int = 15,
) -> dict:
    """Every number of the report from per-image P(class 1) and labels.

    Headline numbers (``accuracy``, ``precision``, ... at top level) are at ``threshold``, the
    model's operating threshold; ``thresholds`` repeats the threshold-dependent ones at
    ``default_threshold`` too, so the effect of the fitted threshold is visible. Per-class rows
    treat each class in turn as positive, as scikit-learn's classification report.
    """
    probs = probs.float().flatten().cpu()
    targets = targets.long().flatten().cpu()
    names = list(class_names)
    pos = names[positive_class]
    at = threshold_metrics(probs, targets, threshold, names, positive_class)
    cm = torch.tensor(at["confusion_matrix"])
    per_class = {}
    for c, name in enumerate(names):
        tp = int(cm[c, c])
        predicted = int(cm[:, c].sum())
        support = int(cm[c, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    total = int(cm.sum())
    macro = {
        k: sum(r[k] for r in per_class.values()) / len(per_class)
        for k in ("precision", "recall", "f1")
    }
    weighted = {
        k: sum(r[k] * r["support"] for r in per_class.values()) / max(total, 1)
        for k in ("precision", "recall", "f1")
    }
    ranking = ranking_metrics(probs, targets, positive_class)
    calibration = reliability_bins(probs, targets, positive_class, calibration_bins)
    ci = bootstrap_ci(
        probs, targets, threshold, positive_class, bootstrap_resamples, bootstrap_seed
    )
    negative = names[1 - positive_class]
    report = {
        "n": total,
        "positive_class": pos,
        "probability": f"P({names[1]}): class {names[1]} is predicted when it is >= threshold",
        "fpr": f"share of {negative} images predicted {pos}",
        "threshold": float(threshold),
        "threshold_source": threshold_source(threshold_fit, threshold, default_threshold),
        "accuracy": at["accuracy"],
        "precision": per_class[pos]["precision"],
        "recall": per_class[pos]["recall"],
        "f1": per_class[pos]["f1"],
        "auroc": ranking["auroc"],
        "balanced_accuracy": at["balanced_accuracy"],
        **{f"accuracy_{name}": at[f"accuracy_{name}"] for name in names},
        "average_precision": ranking["average_precision"],
        **{tpr_at_fpr_key(x): ranking[tpr_at_fpr_key(x)] for x in FPR_LEVELS},
        "eer": ranking["eer"],
        "ece": calibration["ece"],
        "ci95": {k: ci[k] for k in ("accuracy", "f1", "auroc")},
        "bootstrap": {k: ci[k] for k in ("resamples", "seed", "level")},
        "thresholds": threshold_table(
            probs, targets, names, positive_class, threshold, threshold_fit, default_threshold
        ),
        "confusion_matrix": cm.tolist(),
        "class_names": names,
        "per_class": per_class,
        "macro_avg": macro,
        "weighted_avg": weighted,
        "reliability": {"bins": calibration["bins"], "n_bins": calibration_bins},
    }
    if threshold_fit:
        report["threshold_fit"] = dict(threshold_fit)
    if loss is not None:
        report["loss"] = loss
    return report


def threshold_source(fit: Mapping | None, threshold: float, default: float = 0.5) -> str:
    if fit:
        rule = fit.get("rule")
        how = (
            f"best TPR at FPR <= {fit.get('target_fpr')}"
            if rule == "target_fpr"
            else "maximum balanced accuracy"
        )
        split = {"val": "the validation split"}.get(fit.get("split"), fit.get("split"))
        return f"fitted on {split}: {how}, {fit.get('n', '?')} images"
    return "default" if threshold == default else "configured"


def threshold_table(
    probs: torch.Tensor,
    targets: torch.Tensor,
    class_names: Sequence[str],
    positive_class: int,
    threshold: float,
    threshold_fit: Mapping | None,
    default_threshold: float = 0.5,
) -> list[dict]:
    """Threshold-dependent metrics at the default threshold and at the model's own."""
    rows = [("default", default_threshold)]
    if threshold_fit or threshold != default_threshold:
        rows.append(("fitted" if threshold_fit else "configured", threshold))
    out = []
    for name, t in rows:
        m = threshold_metrics(probs, targets, t, class_names, positive_class)
        keep = [*THRESHOLD_KEYS, *(f"accuracy_{c}" for c in class_names), "confusion_matrix"]
        out.append({"name": name, "threshold": float(t), **{k: m[k] for k in keep}})
    return out


def _fmt(value: float, digits: int = 4) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def format_report(report: Mapping) -> str:
    """The printed report: the seed's headline metrics, confusion matrix and classification
    report, with confidence intervals, the forensics metrics and a per-threshold table."""
    names = report["class_names"]
    width = max(12, *(len(n) + 2 for n in names))
    source = report.get("threshold_source")
    lines = [
        f"Test set: {report['n']} images; positive class {report['positive_class']}; "
        f"threshold {report['threshold']:.4f}" + (f" ({source})" if source else "")
    ]
    if "probability" in report:
        lines.append(f"  probability = {report['probability']}")
    ci = report.get("ci95", {})
    level = report.get("bootstrap", {})
    for key in ("loss", "accuracy", "precision", "recall", "f1", "auroc"):
        if key in report:
            line = f"  {key:<10} {_fmt(report[key])}"
            if key in ci:
                lo, hi = ci[key]
                line += f"  95% CI [{_fmt(lo)}, {_fmt(hi)}]"
            lines.append(line)
    if ci:
        lines.append(
            f"  (95% CI: percentile bootstrap, {level.get('resamples')} resamples, "
            f"seed {level.get('seed')})"
        )
    if "average_precision" in report:
        pos = report["positive_class"]
        lines.append(f"Forensics metrics (positive class {pos}; FPR = {report.get('fpr', '')})")
        extra = [
            ("balanced accuracy", report["balanced_accuracy"]),
            *((f"accuracy on {n}", report[f"accuracy_{n}"]) for n in names),
            ("average precision", report["average_precision"]),
            *((f"TPR at {x * 100:g}% FPR", report[tpr_at_fpr_key(x)]) for x in FPR_LEVELS),
            ("equal error rate", report["eer"]),
            (f"ECE ({report['reliability']['n_bins']} bins)", report["ece"]),
        ]
        for label, value in extra:
            lines.append(f"  {label:<20} {_fmt(value)}")
    if report.get("thresholds"):
        lines.append("Results per threshold")
        cols = [*THRESHOLD_KEYS, *(f"accuracy_{n}" for n in names)]
        heads = ["accuracy", "bal. acc", "precision", "recall", "f1", *(f"acc {n}" for n in names)]
        cw = max(11, *(len(h) + 2 for h in heads))
        lines.append(f"{'threshold':<22}" + "".join(f"{h:>{cw}}" for h in heads))
        for row in report["thresholds"]:
            label = f"{row['threshold']:.4f} ({row['name']})"
            lines.append(f"{label:<22}" + "".join(f"{_fmt(row[c]):>{cw}}" for c in cols))
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


def summary_row(name: str, report: Mapping) -> dict:
    """One line of the per-test-set table."""
    names = report["class_names"]
    row = {"set": name, "n": report["n"]}
    default = next((r for r in report.get("thresholds", []) if r["name"] == "default"), None)
    keys = [
        "accuracy",
        "balanced_accuracy",
        *(f"accuracy_{n}" for n in names),
        "precision",
        "recall",
        "f1",
        "auroc",
        "average_precision",
        *(tpr_at_fpr_key(x) for x in FPR_LEVELS),
        "eer",
        "ece",
    ]
    row.update({k: report.get(k, float("nan")) for k in keys})
    if default is not None:
        row["accuracy_at_0.5"] = default["accuracy"]
    for k in ("accuracy", "f1", "auroc"):
        lo, hi = report.get("ci95", {}).get(k, (float("nan"), float("nan")))
        row[f"{k}_ci_low"], row[f"{k}_ci_high"] = lo, hi
    row["threshold"] = report["threshold"]
    return row


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table; floats with 4 decimals."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())

    def cell(v) -> str:
        return _fmt(v) if isinstance(v, float) else str(v)

    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|",
    ]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: Sequence[Mapping], path: str | Path, columns: Sequence[str] | None = None):
    path = Path(path)
    columns = list(columns or (rows[0].keys() if rows else []))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_predictions(
    path: str | Path,
    paths: Sequence[str],
    probs: torch.Tensor,
    targets: torch.Tensor,
    threshold: float,
    sets: Sequence[str] | None = None,
) -> Path:
    """``path,label,probability,prediction`` per image (plus ``set`` when given): label and
    prediction are class indices, probability is P(class 1) at full float32 precision, so every
    number of the report can be recomputed from the file."""
    preds = predict(probs, threshold).tolist()
    probs_list = probs.float().flatten().tolist()
    rows = [
        {"path": p, "label": int(y), "probability": repr(float(q)), "prediction": d}
        for p, y, q, d in zip(paths, targets.flatten().tolist(), probs_list, preds, strict=True)
    ]
    columns = ["path", "label", "probability", "prediction"]
    if sets is not None:
        for row, s in zip(rows, sets, strict=True):
            row["set"] = s
        columns.append("set")
    return write_csv(rows, path, columns)


def write_json(data: Mapping, path: str | Path) -> Path:
    """Strict JSON: NaN (an undefined metric, e.g. AUROC of a one-class set) is written null."""
    path = Path(path)
    path.write_text(json.dumps(_no_nan(data), indent=2, default=float, allow_nan=False) + "\n")
    return path


def _no_nan(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_no_nan(v) for v in value]
    return value


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
    ax.set_title(f"Reliability (ECE = {_fmt(report['ece'])})")
    ax.legend(loc="upper left")
    hist.set_xlim(0, 1)
    hist.set_xlabel(f"predicted P({pos})")
    hist.set_ylabel("images")
    fig.tight_layout()
    return fig


def most_confident(
    probs: torch.Tensor, targets: torch.Tensor, threshold: float, k: int = 8
) -> dict[str, list[int]]:
    """Indices of the ``k`` most confident right and wrong predictions; confidence is the
    probability given to the predicted class."""
    probs = probs.float().flatten().cpu()
    targets = targets.long().flatten().cpu()
    preds = predict(probs, threshold)
    confidence = torch.where(preds == 1, probs, 1 - probs)
    out = {}
    for name, mask in (("right", preds == targets), ("wrong", preds != targets)):
        idx = torch.nonzero(mask).flatten()
        order = torch.argsort(confidence[idx], descending=True, stable=True)
        out[name] = idx[order][:k].tolist()
    return out


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
            for r_, metric in enumerate(("accuracy", "auroc")):
                axes[r_, c].plot(range(len(points)), [p[metric] for p in points], "o-", label=s)
                axes[r_, c].set_xticks(range(len(points)), ticks)
        axes[1, c].set_xlabel(labels.get(kind, kind))
        axes[0, c].set_title(kind)
        for r_, metric in enumerate(("accuracy", "auroc")):
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
    keys = [
        "loss",
        "threshold",
        "accuracy",
        "balanced_accuracy",
        *(f"accuracy_{n}" for n in report["class_names"]),
        "precision",
        "recall",
        "f1",
        "auroc",
        "average_precision",
        *(tpr_at_fpr_key(x) for x in FPR_LEVELS),
        "eer",
        "ece",
    ]
    for key in keys:
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
