"""Validation numbers per training source (``data.train_dirs``): ``val/<source>/auroc``, ...

Why apart from the overall metrics: a model trained on several generators can look fine
overall while one source lags; the per-source rows show it. They are computed from the
validation predictions gathered across ranks, so every rank computes the same numbers and logs
them as plain values, with no collective of their own (the DDP-safe pattern of
:meth:`detector.module.DetectorModule._log_epoch_metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch.nn.functional import binary_cross_entropy
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_f1_score,
    binary_precision,
    binary_recall,
)

from detector.files import atomic_write_text

# The overall val/ metrics' names, in their order
KEYS = ("acc", "precision", "recall", "f1", "auroc", "loss")


def source_metrics(
    probs: torch.Tensor,
    targets: torch.Tensor,
    sources: torch.Tensor,
    names: Sequence[str],
    positive_class: int = 1,
    stage: str = "val",
) -> dict[str, float]:
    """``{stage}/<name>/<key>`` for each source: P(class 1) ``probs`` and 0/1 ``targets`` of the
    images of ``sources == k``, scored like the overall metrics (threshold 0.5 on the positive
    class's probability; the loss is the binary cross-entropy of P(class 1)). AUROC of a
    source with one class is NaN."""
    out: dict[str, float] = {}
    probs, targets = probs.float(), targets.long()
    for k, name in enumerate(names):
        mask = sources == k
        p, t = probs[mask], targets[mask]
        if not len(t):
            continue
        loss = binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), t.float())
        if positive_class == 0:
            p, t = 1.0 - p, 1 - t
        values = {
            "acc": binary_accuracy(p, t),
            "precision": binary_precision(p, t),
            "recall": binary_recall(p, t),
            "f1": binary_f1_score(p, t),
            "auroc": binary_auroc(p, t) if len(t.unique()) == 2 else math.nan,
            "loss": loss,
        }
        out.update({f"{stage}/{name}/{key}": float(v) for key, v in values.items()})
    return out


def source_rows(metrics: Mapping[str, float], names: Sequence[str]) -> list[dict]:
    """One row per source (``source``, ``acc``, ..., ``loss``) of logged per-source metrics."""
    return [
        {"source": name, **{k: float(metrics.get(f"val/{name}/{k}", math.nan)) for k in KEYS}}
        for name in names
    ]


def write_source_table(rows: Sequence[Mapping], path: Path) -> str:
    """``val_sources.md`` of a run: the last validation pass, per source; returns the table."""
    lines = ["| source | " + " | ".join(KEYS) + " |", "|---|" + "---:|" * len(KEYS)]
    for row in rows:
        lines.append(f"| {row['source']} | " + " | ".join(f"{row[k]:.4f}" for k in KEYS) + " |")
    table = "\n".join(lines)
    atomic_write_text(path, table + "\n")
    return table
