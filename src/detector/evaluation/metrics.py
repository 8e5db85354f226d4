"""The numbers a forensics evaluation reports, from per-image P(class 1) and labels.

Conventions, shared by every function here:

* ``probs`` is the network's probability of class index 1 (REAL in CIFAKE) and a prediction is
  class 1 when ``probs >= threshold``, so one threshold means the same thing whichever class the
  metrics treat as positive.
* ``positive_class`` picks the class that precision, recall, F1, AUROC, AP, TPR/FPR and the
  calibration error are about; ``positive_view`` turns (probs, labels) into (score of the
  positive class, 1 for positive). The false positive rate (FPR) is the share of the *other*
  class predicted positive: with REAL positive, it is the share of FAKE images passed as REAL.
* torchmetrics computes every metric it has; what it lacks (threshold fitting, a vectorised
  bootstrap, reliability-diagram bins) is here, written against the same definitions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_average_precision,
    binary_calibration_error,
    binary_confusion_matrix,
    binary_eer,
    binary_f1_score,
    binary_precision,
    binary_recall,
    binary_sensitivity_at_specificity,
    binary_specificity,
)

THRESHOLD_RULES = ("balanced_accuracy", "target_fpr", "fixed")
FPR_LEVELS = (0.01, 0.05)

NAN = float("nan")


def positive_view(
    probs: torch.Tensor, targets: torch.Tensor, positive_class: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(score of the positive class, 1 where the image is of the positive class)."""
    probs = probs.detach().double().flatten().cpu()
    targets = targets.detach().long().flatten().cpu()
    if positive_class == 1:
        return probs, targets
    return 1.0 - probs, 1 - targets


def predict(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Class index per image: 1 where ``probs >= threshold``."""
    return (probs.detach().double().flatten().cpu() >= threshold).long()


def _both_classes(labels: torch.Tensor) -> bool:
    return 0 < int(labels.sum()) < len(labels)


def tpr_at_fpr_key(level: float) -> str:
    return f"tpr_at_{level * 100:g}pct_fpr"


def threshold_metrics(
    probs: torch.Tensor,
    targets: torch.Tensor,
    threshold: float,
    class_names: Sequence[str] = ("FAKE", "REAL"),
    positive_class: int = 1,
) -> dict:
    """Everything that depends on the decision threshold.

    ``accuracy_<CLASS>`` is the share of that class's images classified correctly (recall of
    the class); ``balanced_accuracy`` is their mean, which a skewed test set cannot inflate.
    """
    targets = targets.detach().long().flatten().cpu()
    preds = predict(probs, threshold)
    n = len(targets)
    out: dict = {"threshold": float(threshold), "n": n}
    if n == 0:
        out.update(
            dict.fromkeys(("accuracy", "balanced_accuracy", "precision", "recall", "f1"), NAN)
        )
        out.update({f"accuracy_{c}": NAN for c in class_names})
        out["confusion_matrix"] = [[0, 0], [0, 0]]
        return out
    pos_preds = preds if positive_class == 1 else 1 - preds
    labels = targets if positive_class == 1 else 1 - targets
    cm = binary_confusion_matrix(preds, targets).long()  # rows: true class index, cols: predicted
    per_class_acc = {}
    for c, name in enumerate(class_names):
        support = int(cm[c].sum())
        per_class_acc[name] = float(cm[c, c]) / support if support else NAN
    out["accuracy"] = float(binary_accuracy(pos_preds, labels))
    out["precision"] = float(binary_precision(pos_preds, labels))
    out["recall"] = float(binary_recall(pos_preds, labels))
    out["f1"] = float(binary_f1_score(pos_preds, labels))
    sensitivity = float(binary_recall(pos_preds, labels)) if int(labels.sum()) else NAN
    specificity = float(binary_specificity(pos_preds, labels)) if int((1 - labels).sum()) else NAN
    out["balanced_accuracy"] = (sensitivity + specificity) / 2
    out.update({f"accuracy_{name}": acc for name, acc in per_class_acc.items()})
    out["confusion_matrix"] = cm.tolist()
    return out


def ranking_metrics(
    probs: torch.Tensor,
    targets: torch.Tensor,
    positive_class: int = 1,
    fpr_levels: Sequence[float] = FPR_LEVELS,
) -> dict:
    """Threshold-free metrics: AUROC, average precision, TPR at fixed FPRs, equal error rate.

    TPR at FPR x is the highest TPR of any threshold whose FPR is at most x (no interpolation);
    the EER is torchmetrics' mean of FPR and FNR where they are closest.
    """
    scores, labels = positive_view(probs, targets, positive_class)
    out = {"auroc": NAN, "average_precision": NAN, "eer": NAN}
    out.update({tpr_at_fpr_key(x): NAN for x in fpr_levels})
    if not _both_classes(labels):
        return out
    out["auroc"] = float(binary_auroc(scores, labels))
    out["average_precision"] = float(binary_average_precision(scores, labels))
    out["eer"] = float(binary_eer(scores, labels))
    for x in fpr_levels:
        tpr, _ = binary_sensitivity_at_specificity(scores, labels, min_specificity=1.0 - x)
        out[tpr_at_fpr_key(x)] = float(tpr)
    return out


def reliability_bins(
    probs: torch.Tensor, targets: torch.Tensor, positive_class: int = 1, n_bins: int = 15
) -> dict:
    """Expected calibration error (torchmetrics, L1, equal-width bins over the positive-class
    probability) and the bins of its reliability diagram.

    A bin holds scores in [lo, hi); torchmetrics gives a score of exactly 1.0 a bin of its own,
    the diagram counts it in the last bin, so the two agree unless some score is exactly 1.0.
    """
    scores, labels = positive_view(probs, targets, positive_class)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    bins = []
    if len(scores):
        index = (torch.bucketize(scores, edges, right=True) - 1).clamp(0, n_bins - 1)
        count = torch.bincount(index, minlength=n_bins).double()
        conf = torch.bincount(index, weights=scores, minlength=n_bins) / count.clamp(min=1)
        freq = torch.bincount(index, weights=labels.double(), minlength=n_bins) / count.clamp(min=1)
        for b in range(n_bins):
            bins.append(
                {
                    "lo": float(edges[b]),
                    "hi": float(edges[b + 1]),
                    "count": int(count[b]),
                    "mean_score": float(conf[b]) if count[b] else NAN,
                    "fraction_positive": float(freq[b]) if count[b] else NAN,
                }
            )
        ece = float(binary_calibration_error(scores.float(), labels, n_bins=n_bins, norm="l1"))
    else:
        ece = NAN
    return {"ece": ece, "bins": bins}


def fit_threshold(
    probs: torch.Tensor,
    targets: torch.Tensor,
    rule: str = "balanced_accuracy",
    positive_class: int = 1,
    target_fpr: float = 0.05,
) -> tuple[float, dict]:
    """The decision threshold on ``probs`` that the rule prefers on these (validation) images.

    Candidates lie halfway between adjacent distinct scores (plus one below and one above all
    of them), so the choice does not hinge on ties and generalises no worse than any other
    point of the same interval. ``balanced_accuracy`` maximises the mean of the two class
    accuracies; ``target_fpr`` maximises the TPR among thresholds whose FPR is at most
    ``target_fpr``. Remaining ties go to the candidate nearest 0.5.
    """
    if rule not in THRESHOLD_RULES or rule == "fixed":
        raise ValueError(
            f"threshold rule {rule!r} cannot be fitted; use one of {THRESHOLD_RULES[:2]}"
        )
    p = probs.detach().flatten().cpu()
    if not p.is_floating_point():
        p = p.double()
    y = targets.detach().long().flatten().cpu()
    if not _both_classes(y):
        raise ValueError("fitting a threshold needs images of both classes")
    candidates = _candidate_thresholds(torch.unique(p)).double()
    p = p.double()
    # Share of each class predicted as class 1 at every candidate.
    rate = {}
    for c in (0, 1):
        sorted_c = torch.sort(p[y == c]).values
        predicted_1 = len(sorted_c) - torch.searchsorted(sorted_c, candidates, right=False)
        rate[c] = predicted_1.double() / len(sorted_c)
    balanced = (rate[1] + 1 - rate[0]) / 2
    if positive_class == 1:
        tpr, fpr = rate[1], rate[0]
    else:
        tpr, fpr = 1 - rate[0], 1 - rate[1]
    closeness = -(candidates - 0.5).abs()
    if rule == "balanced_accuracy":
        keys = [balanced, closeness]
        allowed = torch.ones_like(balanced, dtype=torch.bool)
    else:
        keys = [tpr, -fpr, closeness]
        allowed = fpr <= target_fpr + 1e-12
    best = _lexicographic_argmax(keys, allowed)
    info = {
        "rule": rule,
        "n": len(y),
        "balanced_accuracy": float(balanced[best]),
        "tpr": float(tpr[best]),
        "fpr": float(fpr[best]),
    }
    if rule == "target_fpr":
        info["target_fpr"] = float(target_fpr)
    return float(candidates[best]), info


def _candidate_thresholds(values: torch.Tensor) -> torch.Tensor:
    """0, the midpoints of adjacent sorted ``values`` and a value above the largest, in the
    dtype of ``values`` and strictly above the lower neighbour: compared in that precision
    (float32 for network outputs) every candidate splits the scores where it should."""
    inf = torch.tensor(math.inf, dtype=values.dtype)
    lo, hi = values[:-1], values[1:]
    mid = ((lo.double() + hi.double()) / 2).to(values.dtype)
    mid = torch.where(mid > lo, mid, torch.nextafter(lo, inf))
    top = torch.nextafter(values[-1:], inf)
    return torch.cat([torch.zeros(1, dtype=values.dtype), mid, top])


def _lexicographic_argmax(keys: Sequence[torch.Tensor], allowed: torch.Tensor) -> int:
    keep = allowed.clone()
    for key in keys:
        best = key[keep].max()
        keep &= key >= best - 1e-12
    return int(torch.nonzero(keep)[0])


def bootstrap_ci(
    probs: torch.Tensor,
    targets: torch.Tensor,
    threshold: float,
    positive_class: int = 1,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Percentile bootstrap intervals (``level``, two-sided) for accuracy, F1 and AUROC at
    ``threshold``; the same seed gives the same intervals."""
    out = {"resamples": int(resamples), "seed": int(seed), "level": float(level)}
    samples = bootstrap_samples(probs, targets, threshold, positive_class, resamples, seed)
    alpha = (1 - level) / 2
    q = torch.tensor([alpha, 1 - alpha], dtype=torch.float64)
    for name, v in samples.items():
        valid = ~v.isnan()
        out[name] = [float(x) for x in torch.quantile(v[valid], q)] if valid.any() else [NAN, NAN]
    return out


def bootstrap_samples(
    probs: torch.Tensor,
    targets: torch.Tensor,
    threshold: float,
    positive_class: int = 1,
    resamples: int = 1000,
    seed: int = 0,
    chunk: int = 100,
) -> dict[str, torch.Tensor]:
    """Accuracy, F1 and AUROC of ``resamples`` bootstrap resamples (images drawn with
    replacement). Resample ``r`` takes images ``torch.randint(n, (resamples, n))[r]`` (in the
    given order), drawn in chunks of ``chunk`` rows from a generator seeded with ``seed``.

    Every image is reduced to (distinct score, class), which fixes its prediction too, so a
    resample is a row of counts per (score, class): accuracy and F1 are matrix products of
    those counts and AUROC is the Mann-Whitney statistic from their cumulative sums (ties
    count a half). Nothing loops over resamples in Python except the chunks that bound memory.
    A resample without both classes has AUROC NaN.
    """
    scores, labels = positive_view(probs, targets, positive_class)
    n = len(scores)
    if n == 0 or resamples < 1:
        return {k: torch.full((max(resamples, 0),), NAN) for k in ("accuracy", "f1", "auroc")}
    pos_pred = predict(probs, threshold)
    if positive_class != 1:
        pos_pred = 1 - pos_pred
    values, group = torch.unique(scores, sorted=True, return_inverse=True)
    n_groups = len(values)
    key = labels * len(values) + group  # column of (class, score group) in the count matrix
    # Predicted positive per score group (one prediction per distinct score).
    group_pred = torch.zeros(n_groups).scatter_(0, group, pos_pred.float())

    generator = torch.Generator().manual_seed(int(seed))
    acc, f1, auc = [], [], []
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        idx = torch.randint(n, (b, n), generator=generator)
        counts = torch.zeros(b, 2 * n_groups).scatter_add_(1, key[idx], torch.ones(b, n))
        neg, pos = counts[:, :n_groups], counts[:, n_groups:]
        tp = (pos @ group_pred).double()
        fp = (neg @ group_pred).double()
        n_pos, n_neg = pos.sum(1).double(), neg.sum(1).double()
        fn, tn = n_pos - tp, n_neg - fp
        acc.append((tp + tn) / n)
        denom = 2 * tp + fp + fn
        f1.append(torch.where(denom > 0, 2 * tp / denom.clamp(min=1), 0.0))
        # Negatives scoring below each group, plus half of those tied with it (exact in float32:
        # counts stay below 2^24).
        below = torch.cumsum(neg, 1) - 0.5 * neg
        wins = (pos * below).double().sum(1)
        auc.append(torch.where((n_pos > 0) & (n_neg > 0), wins / (n_pos * n_neg).clamp(min=1), NAN))
    return {"accuracy": torch.cat(acc), "f1": torch.cat(f1), "auroc": torch.cat(auc)}
