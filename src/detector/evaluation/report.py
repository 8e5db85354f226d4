"""What a run shows a person: the evaluation report (the seed's metrics, confusion matrix and
per-class table, extended with the numbers forensics papers report), its text, tables and the
JSON/CSV files that hold the numbers (figures: :mod:`detector.evaluation.plots`)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402

from detector.evaluation.metrics import (
    FPR_LEVELS,
    bootstrap_ci,
    predict,
    ranking_metrics,
    reliability_bins,
    threshold_metrics,
    tpr_at_fpr_key,
)

# The seed's headline numbers, printed first; Lightning logs these itself during ``trainer.test``.
HEADLINE_KEYS = ("loss", "accuracy", "precision", "recall", "f1", "auroc")
# Numbers of each class's row of the classification report, and of its averages.
CLASS_KEYS = ("precision", "recall", "f1")
# Numbers given a bootstrap confidence interval.
CI_KEYS = ("accuracy", "f1", "auroc")
# Threshold-dependent numbers shown for every threshold the report compares.
THRESHOLD_KEYS = ("accuracy", "balanced_accuracy", "precision", "recall", "f1")
# Column heads of the per-threshold table where the key is too wide.
_SHORT_HEADS = {"balanced_accuracy": "bal. acc"}
TPR_KEYS = tuple(tpr_at_fpr_key(x) for x in FPR_LEVELS)
_SCALAR_TAIL = (*CLASS_KEYS, "auroc", "average_precision", *TPR_KEYS, "eer", "ece")


def class_accuracy_keys(class_names: Sequence[str]) -> list[str]:
    return [f"accuracy_{n}" for n in class_names]


def scalar_keys(class_names: Sequence[str]) -> list[str]:
    """The one-number metrics of a report in table order, shared by the summary table and
    TensorBoard so that both show the same numbers."""
    return ["accuracy", "balanced_accuracy", *class_accuracy_keys(class_names), *_SCALAR_TAIL]


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
    at = threshold_metrics(probs, targets, threshold, names, positive_class)
    cm = torch.tensor(at["confusion_matrix"])
    table = _classification_table(cm, names)
    ranking = ranking_metrics(probs, targets, positive_class)
    calibration = reliability_bins(probs, targets, positive_class, calibration_bins)
    ci = bootstrap_ci(
        probs, targets, threshold, positive_class, bootstrap_resamples, bootstrap_seed
    )
    source = threshold_source(threshold_fit, threshold, default_threshold)
    report = {
        **_operating_point(names, positive_class, threshold, source, int(cm.sum())),
        **_headline(at, table["per_class"][names[positive_class]], ranking, calibration, names),
        "ci95": {k: ci[k] for k in CI_KEYS},
        "bootstrap": {k: ci[k] for k in ("resamples", "seed", "level")},
        "thresholds": threshold_table(
            probs, targets, names, positive_class, threshold, threshold_fit, default_threshold
        ),
        **table,
        "reliability": {"bins": calibration["bins"], "n_bins": calibration_bins},
    }
    if threshold_fit:
        report["threshold_fit"] = dict(threshold_fit)
    if loss is not None:
        report["loss"] = loss
    return report


def _operating_point(
    names: list[str], positive_class: int, threshold: float, source: str, n: int
) -> dict:
    """What the numbers are about, in words, so that metrics.json reads on its own."""
    pos = names[positive_class]
    return {
        "n": n,
        "positive_class": pos,
        "probability": f"P({names[1]}): class {names[1]} is predicted when it is >= threshold",
        "fpr": f"share of {names[1 - positive_class]} images predicted {pos}",
        "threshold": float(threshold),
        "threshold_source": source,
    }


def _headline(
    at: Mapping, positive_row: Mapping, ranking: Mapping, calibration: Mapping, names: list[str]
) -> dict:
    """The seed's numbers first, then the forensics ones, in the order metrics.json keeps."""
    return {
        "accuracy": at["accuracy"],
        **{k: positive_row[k] for k in CLASS_KEYS},
        "auroc": ranking["auroc"],
        "balanced_accuracy": at["balanced_accuracy"],
        **{k: at[k] for k in class_accuracy_keys(names)},
        "average_precision": ranking["average_precision"],
        **{k: ranking[k] for k in TPR_KEYS},
        "eer": ranking["eer"],
        "ece": calibration["ece"],
    }


def _classification_table(cm: torch.Tensor, names: list[str]) -> dict:
    """scikit-learn's classification report: each class in turn taken as positive."""
    per_class = {}
    for c, name in enumerate(names):
        tp = int(cm[c, c])
        predicted = int(cm[:, c].sum())
        support = int(cm[c, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    rows, n = per_class.values(), max(int(cm.sum()), 1)
    return {
        "confusion_matrix": cm.tolist(),
        "class_names": names,
        "per_class": per_class,
        "macro_avg": {k: sum(r[k] for r in rows) / len(rows) for k in CLASS_KEYS},
        "weighted_avg": {k: sum(r[k] * r["support"] for r in rows) / n for k in CLASS_KEYS},
    }


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
        keep = [*THRESHOLD_KEYS, *class_accuracy_keys(class_names), "confusion_matrix"]
        out.append({"name": name, "threshold": float(t), **{k: m[k] for k in keep}})
    return out


def fmt_number(value: float, digits: int = 4) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def format_report(report: Mapping) -> str:
    """The printed report: the seed's headline metrics, confusion matrix and classification
    report, with confidence intervals, the forensics metrics and a per-threshold table."""
    names = report["class_names"]
    width = max(12, *(len(n) + 2 for n in names))
    lines = [
        *_headline_lines(report),
        *_forensics_lines(report),
        *_threshold_lines(report),
        *_confusion_lines(report, width),
        *_classification_lines(report, width),
    ]
    return "\n".join(lines)


def _headline_lines(report: Mapping) -> list[str]:
    source = report.get("threshold_source")
    lines = [
        f"Test set: {report['n']} images; positive class {report['positive_class']}; "
        f"threshold {report['threshold']:.4f}" + (f" ({source})" if source else "")
    ]
    if "probability" in report:
        lines.append(f"  probability = {report['probability']}")
    ci = report.get("ci95", {})
    level = report.get("bootstrap", {})
    for key in HEADLINE_KEYS:
        if key in report:
            line = f"  {key:<10} {fmt_number(report[key])}"
            if key in ci:
                lo, hi = ci[key]
                line += f"  95% CI [{fmt_number(lo)}, {fmt_number(hi)}]"
            lines.append(line)
    if ci:
        lines.append(
            f"  (95% CI: percentile bootstrap, {level.get('resamples')} resamples, "
            f"seed {level.get('seed')})"
        )
    return lines


def _forensics_lines(report: Mapping) -> list[str]:
    """Empty for a report from before the forensics metrics existed."""
    if "average_precision" not in report:
        return []
    lines = [
        f"Forensics metrics (positive class {report['positive_class']}; "
        f"FPR = {report.get('fpr', '')})"
    ]
    extra = [
        ("balanced accuracy", report["balanced_accuracy"]),
        *((f"accuracy on {n}", report[f"accuracy_{n}"]) for n in report["class_names"]),
        ("average precision", report["average_precision"]),
        *((f"TPR at {x * 100:g}% FPR", report[tpr_at_fpr_key(x)]) for x in FPR_LEVELS),
        ("equal error rate", report["eer"]),
        (f"ECE ({report['reliability']['n_bins']} bins)", report["ece"]),
    ]
    for label, value in extra:
        lines.append(f"  {label:<20} {fmt_number(value)}")
    return lines


def _threshold_lines(report: Mapping) -> list[str]:
    if not report.get("thresholds"):
        return []
    names = report["class_names"]
    cols = [*THRESHOLD_KEYS, *class_accuracy_keys(names)]
    heads = [*(_SHORT_HEADS.get(k, k) for k in THRESHOLD_KEYS), *(f"acc {n}" for n in names)]
    cw = max(11, *(len(h) + 2 for h in heads))
    lines = ["Results per threshold", f"{'threshold':<22}" + "".join(f"{h:>{cw}}" for h in heads)]
    for row in report["thresholds"]:
        label = f"{row['threshold']:.4f} ({row['name']})"
        lines.append(f"{label:<22}" + "".join(f"{fmt_number(row[c]):>{cw}}" for c in cols))
    return lines


def _confusion_lines(report: Mapping, width: int) -> list[str]:
    names = report["class_names"]
    lines = [
        "Confusion matrix (rows: true, columns: predicted)",
        " " * width + "".join(f"{n:>{width}}" for n in names),
    ]
    for name, row in zip(names, report["confusion_matrix"], strict=True):
        lines.append(f"{name:>{width}}" + "".join(f"{v:>{width}}" for v in row))
    return lines


def _classification_lines(report: Mapping, width: int) -> list[str]:
    def scores(r: Mapping) -> str:
        return "".join(f"{r[k]:>11.4f}" for k in CLASS_KEYS)

    lines = [
        "Classification report",
        f"{'':>{width}}{'precision':>11}{'recall':>11}{'f1-score':>11}{'support':>11}",
    ]
    for name, r in report["per_class"].items():
        lines.append(f"{name:>{width}}{scores(r)}{r['support']:>11}")
    lines.append(f"{'accuracy':>{width}}{'':>22}{report['accuracy']:>11.4f}{report['n']:>11}")
    for label, avg in (
        ("macro avg", report["macro_avg"]),
        ("weighted avg", report["weighted_avg"]),
    ):
        lines.append(f"{label:>{width}}{scores(avg)}{report['n']:>11}")
    return lines


def summary_row(name: str, report: Mapping) -> dict:
    """One line of the per-test-set table."""
    row = {"set": name, "n": report["n"]}
    default = next((r for r in report.get("thresholds", []) if r["name"] == "default"), None)
    row.update({k: report.get(k, float("nan")) for k in scalar_keys(report["class_names"])})
    if default is not None:
        row["accuracy_at_0.5"] = default["accuracy"]
    for k in CI_KEYS:
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
        return fmt_number(v) if isinstance(v, float) else str(v)

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
    class_names: Sequence[str],
    sets: Sequence[str] | None = None,
    extra: Mapping[str, Sequence] | None = None,
) -> Path:
    """Per image (plus ``set`` when given): label and prediction as class names, as predict.py
    writes them, and as indices; probability is P(class 1) at full float32 precision, so every
    number of the report can be recomputed from the file."""
    columns = ["path", "label", "prediction", "probability", "label_index", "prediction_index"]
    values = zip(paths, targets.flatten().tolist(), probs.float().flatten().tolist(), strict=True)
    rows = [
        dict(zip(columns, (p, class_names[y], class_names[d], repr(q), y, d), strict=True))
        for (p, y, q), d in zip(values, predict(probs, threshold).tolist(), strict=True)
    ]
    for name, values in {**({"set": sets} if sets is not None else {}), **(extra or {})}.items():
        for row, value in zip(rows, values, strict=True):
            row[name] = value
        columns.append(name)
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
