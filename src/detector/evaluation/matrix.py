"""The cross-generator matrix: one row per trained model, one column per test set, for AUROC,
accuracy and average precision; as Markdown, CSV and a heatmap figure.

Why this table: the field's first question is how a detector does on generators it never
saw (GenImage, CNNDetection, UnivFD, NPR all report a train x test table); the diagonal is
the seen case, the mean of the rest of a row the unseen one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from detector.evaluation.plots import save_figure
from detector.evaluation.report import write_csv
from detector.files import atomic_write_text

# (column in the cells, title)
METRICS = (("auroc", "AUROC"), ("accuracy", "accuracy"), ("average_precision", "AP"))
Cells = Mapping[tuple[str, str], Mapping[str, float]]
# a left-out source's numbers in the leave-one-out summary, and a cell's in matrix.csv
CELL_SUMMARY = CSV_KEYS = ("auroc", "accuracy", "average_precision", "ood_flagged")


def _value(cells: Cells, row: str, col: str, key: str) -> float:
    cell = cells.get((row, col))
    return float(cell[key]) if cell and cell.get(key) is not None else math.nan


def unseen_mean(cells: Cells, row: str, cols: Sequence[str], key: str, seen: Sequence[str]):
    """Mean of ``key`` over the test sets of generators the row's model was not trained on."""
    values = [_value(cells, row, c, key) for c in cols if c not in seen]
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def held_out_summary(
    cells: Cells, rows: Sequence[str], cols: Sequence[str], seen: Mapping[str, Sequence[str]]
) -> dict | None:
    """Leave-one-out: each row's one unseen test set, its AUROC, accuracy and out-of-domain
    share, and the mean and worst AUROC over them (the number a recipe is tuned on); None
    unless every row left out exactly one test set."""
    held = {r: [c for c in cols if c not in seen[r]] for r in rows}
    if not rows or any(len(h) != 1 for h in held.values()):
        return None
    members = {
        held[r][0]: {"row": r} | {k: _value(cells, r, held[r][0], k) for k in CELL_SUMMARY}
        for r in rows
    }
    scored = {name: m["auroc"] for name, m in members.items() if not math.isnan(m["auroc"])}
    worst = min(scored, key=scored.__getitem__) if scored else None
    return {
        "members": members,
        "mean_auroc": sum(scored.values()) / len(scored) if scored else math.nan,
        "worst_auroc": scored[worst] if worst else math.nan,
        "worst": worst,
    }


def _held_out_markdown(summary: dict) -> list[str]:
    parts = ["", "## Left out (each model on the one source it never saw)", ""]
    parts += [
        "| left out | AUROC | accuracy | AP | flagged out of domain |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in summary["members"].items():
        values = [m[k] for k in CELL_SUMMARY]
        text = ["-" if math.isnan(v) else f"{v:.4f}" for v in values[:-1]]
        text.append("-" if math.isnan(values[-1]) else f"{values[-1]:.1%}")
        parts.append(f"| {name} | " + " | ".join(text) + " |")
    parts += [
        "",
        f"Mean AUROC **{summary['mean_auroc']:.4f}**, worst **{summary['worst_auroc']:.4f}** "
        f"({summary['worst']}).",
    ]
    return parts


def _nan_to_none(value):
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def matrix_markdown(
    cells: Cells,
    rows: Sequence[str],
    cols: Sequence[str],
    seen: Mapping[str, Sequence[str]],
    command: str,
    held_out: dict | None = None,
) -> str:
    """One table per metric; cells of a test set the model trained on are in bold; and the
    left-out sources' table with the mean and worst AUROC (``held_out``: the summary of
    :func:`held_out_summary`)."""
    parts = ["# Cross-generator matrix", "", f"`{command}`", ""]
    parts.append("Rows: the training source(s); columns: the test set; **bold**: seen in training.")
    for key, title in METRICS:
        parts += ["", f"## {title}", ""]
        parts.append("| train \\ test | " + " | ".join(cols) + " | unseen mean |")
        parts.append("|---|" + "---:|" * (len(cols) + 1))
        for row in rows:
            cells_md = []
            for col in cols:
                v = _value(cells, row, col, key)
                text = "-" if math.isnan(v) else f"{v:.4f}"
                cells_md.append(f"**{text}**" if col in seen[row] else text)
            mean = unseen_mean(cells, row, cols, key, seen[row])
            cells_md.append("-" if math.isnan(mean) else f"{mean:.4f}")
            parts.append(f"| {row} | " + " | ".join(cells_md) + " |")
    if held_out is not None:
        parts += _held_out_markdown(held_out)
    return "\n".join(parts) + "\n"


def matrix_figure(cells: Cells, rows: Sequence[str], cols: Sequence[str]) -> plt.Figure:
    """A heatmap per metric, the value written in each cell; colours from 0.5 (chance for
    AUROC and balanced classes) to 1."""
    width = 1.2 + 0.8 * len(cols)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(width * len(METRICS), 1.2 + 0.7 * len(rows)))
    for ax, (key, title) in zip(np.atleast_1d(axes), METRICS, strict=True):
        data = np.array([[_value(cells, r, c, key) for c in cols] for r in rows])
        ax.imshow(data, vmin=0.5, vmax=1.0, cmap="viridis")
        for i in range(len(rows)):
            for j in range(len(cols)):
                v = data[i, j]
                text = "-" if math.isnan(v) else f"{v:.3f}"
                ax.text(j, i, text, ha="center", va="center", color="w" if v < 0.8 else "k")
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("test")
        ax.set_ylabel("train")
        ax.set_title(title)
    fig.tight_layout()
    return fig


def write_matrix(
    cells: Cells,
    rows: Sequence[str],
    cols: Sequence[str],
    seen: Mapping[str, Sequence[str]],
    out: Path,
    command: str,
    leave_one_out: bool = False,
) -> dict[str, Path]:
    """matrix.md, matrix.csv (one line per cell), matrix.png and, leave-one-out,
    held_out.json (``leave_one_out``: :func:`held_out_summary`) in ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "matrix.md", "csv": out / "matrix.csv", "png": out / "matrix.png"}
    summary = held_out_summary(cells, rows, cols, seen) if leave_one_out else None
    if summary is not None:
        paths["held_out"] = out / "held_out.json"
        atomic_write_text(paths["held_out"], json.dumps(_nan_to_none(summary), indent=2) + "\n")
    atomic_write_text(paths["md"], matrix_markdown(cells, rows, cols, seen, command, summary))
    lines = [
        {"train": r, "test": c, "seen": c in seen[r], "n": (cells.get((r, c)) or {}).get("n")}
        | {key: _value(cells, r, c, key) for key in CSV_KEYS}
        for r in rows
        for c in cols
    ]
    write_csv(lines, paths["csv"])
    fig = matrix_figure(cells, rows, cols)
    save_figure(fig, paths["png"])
    plt.close(fig)
    return paths
