"""``predict(cfg)``: score images, folders, globs or lists with a checkpoint; CSV or JSON Lines."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from detector.api import Detector
from detector.data.contract import Prepared, Preprocessing, resize_summary
from detector.data.decode import IMAGE_EXTENSIONS
from detector.errors import ConfigError
from detector.evaluation.ood import NO_OOD_MODEL
from detector.files import describe_error
from detector.hardware import threads_beside_workers
from detector.tasks.inputs import (
    UNREADABLE_SHOWN,
    image_paths,
    load_detector,
    output_file,
    require_ckpt,
    require_some_read,
    warn_unreadable,
    write_rows,
)

log = logging.getLogger(__name__)

# Per-image result columns after the probabilities (the service's JSON carries the same names).
RESULT_COLUMNS = ("label", "ood_score", "in_domain", "n_tiles", "resized_from")


class _Files(Dataset):
    """Decodes in loader workers by the checkpoint's preprocessing contract; a file that fails
    becomes an error string, not an exception."""

    def __init__(self, paths: Sequence[str], contract: Preprocessing, max_pixels: int) -> None:
        self.paths = paths
        self.contract = contract
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Prepared | None, str]:
        try:
            return i, self.contract.prepare_file(self.paths[i], self.max_pixels), ""
        except Exception as e:  # any decoder failure is the file's problem, reported per row
            return i, None, describe_error(e)


def _collate(items):
    ok = [(i, x) for i, x, _ in items if x is not None]
    return [i for i, _ in ok], [x for _, x in ok], [(i, err) for i, x, err in items if x is None]


def _scored_rows(
    detector: Detector,
    loader: DataLoader,
    paths: Sequence[str],
    counts: dict[str, int],
    errors: list[tuple[str, str]],
    resized: list[tuple[int, int]],
) -> Iterator[dict[int, dict]]:
    """One batch's rows at a time, so the table grows while the model runs; ``counts``,
    ``errors`` and ``resized`` (sizes of the images a resize model squashed) fill up on the way
    for the summary."""
    prob_cols = [f"prob_{n}" for n in detector.class_names]
    for indices, items, failed in loader:
        rows: dict[int, dict] = {}
        if items:
            probs, ood = detector.score_prepared(items)
            ood_list = ood.tolist() if ood is not None else [None] * len(probs)
            for i, p1, s, item in zip(indices, probs.tolist(), ood_list, items, strict=True):
                pred = detector.decide(p1, s, item.n_tiles, item.resized_from)
                counts[pred.label] += 1
                counts["flagged"] += pred.in_domain is False
                if item.resized_from:
                    resized.append(item.size)
                rows[i] = {
                    prob_cols[0]: round(1.0 - p1, 7),
                    prob_cols[1]: round(p1, 7),
                    "label": pred.label,
                    "ood_score": None if s is None else float(f"{s:.7g}"),
                    "in_domain": pred.in_domain,
                    "n_tiles": item.n_tiles,
                    "resized_from": item.resized_from,
                    "error": None,
                }
        for i, err in failed:
            errors.append((paths[i], err))
            empty = dict.fromkeys([*prob_cols, *RESULT_COLUMNS])
            rows[i] = {**empty, "error": err}
        common = {"threshold": detector.threshold, "model_id": detector.model_id}
        yield {i: {"path": paths[i], **common, **row} for i, row in rows.items()}


def _loader_batch_size(cfg: DictConfig) -> int:
    """Checked before the inputs are walked, so a typo fails at once."""
    batch_size = int(cfg.batch_size)
    if batch_size <= 0:
        raise ConfigError(f"batch_size={cfg.batch_size} must be a positive integer")
    if int(cfg.num_workers) < 0:
        raise ConfigError(f"num_workers={cfg.num_workers} must be >= 0")
    return batch_size


# Up to this many images, each one's verdict is printed too (beyond: the summary only).
ROWS_SHOWN = 20


def _keep(batches: Iterator[dict[int, dict]], shown: list[dict]) -> Iterator[dict[int, dict]]:
    """Pass the rows on, keeping the first ROWS_SHOWN + 1 for the screen."""
    for rows in batches:
        shown += [rows[i] for i in sorted(rows)][: ROWS_SHOWN + 1 - len(shown)]
        yield rows


def _row_line(row: dict, names: list[str]) -> str:
    if row.get("error"):
        return f"{row['path']}: unreadable ({row['error']})"
    line = (
        f"{row['path']}: {row['label']} (P({names[1]})={row[f'prob_{names[1]}']:.4f}, "
        f"threshold {row['threshold']:.4f}"
    )
    if (row.get("n_tiles") or 1) > 1:
        line += f", {row['n_tiles']} tiles"
    if row.get("resized_from"):
        line += f", resized from {row['resized_from']}"
    if row.get("in_domain") is False:
        line += "; unlike the training data: unreliable"
    return line + ")"


def _print_notes(
    detector: Detector, scored: int, skipped: int, resized: list, flagged: int
) -> None:
    """What the summary must not leave out: files skipped, images squashed, labels unreliable."""
    if skipped:
        print(f"{skipped} other files skipped, not images this model reads (named in the log)")
    squashed = resize_summary(resized, scored, detector.image_size)
    if squashed:
        print(squashed)
    if detector.ood is None:
        print(f"Out of domain: {NO_OOD_MODEL}")
    else:
        print(
            f"{flagged} of {scored} images are unlike the training data (in_domain=false): "
            "their labels are unreliable"
        )


def predict(cfg: DictConfig) -> dict:
    """Score every image of ``cfg.input`` and write one row per image (errors included)."""
    require_ckpt(cfg.get("ckpt"))
    batch_size = _loader_batch_size(cfg)
    out, fmt = output_file(cfg)
    skipped: list[tuple[str, str]] = []
    paths = image_paths(cfg, f" ({', '.join(IMAGE_EXTENSIONS)})", skipped)
    detector = load_detector(cfg)
    names = detector.class_names
    columns = ["path", *(f"prob_{n}" for n in names), *RESULT_COLUMNS]
    columns += ["threshold", "model_id", "error"]
    # loader processes pay off from the second batch on; one image is decoded right here
    workers = int(cfg.num_workers) if len(paths) > batch_size else 0
    loader = DataLoader(
        _Files(paths, detector.preprocessing, detector.max_pixels),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
    )
    counts = dict.fromkeys([*names, "flagged"], 0)
    errors: list[tuple[str, str]] = []
    resized: list[tuple[int, int]] = []
    rows = _scored_rows(detector, loader, paths, counts, errors, resized)
    shown: list[dict] = []
    with threads_beside_workers(workers, detector.device):
        progress = cfg.get("progress")
        write_rows(out, fmt, columns, _keep(rows, shown), "predict", progress, len(paths))
    if len(paths) <= ROWS_SHOWN:
        for row in shown:
            print(_row_line(row, names))

    scored = len(paths) - len(errors)
    warn_unreadable(log, errors)
    if len(errors) > UNREADABLE_SHOWN:
        log.warning(
            "... and %d more unreadable files (see the error column)",
            len(errors) - UNREADABLE_SHOWN,
        )
    require_some_read(scored, errors, len(paths), cfg.input, f"rows with the errors are in {out}")
    flagged = counts.pop("flagged")
    summary = ", ".join(f"{n} {c}" for n, c in counts.items())
    print(
        f"Scored {scored} of {len(paths)} images ({summary}; {len(errors)} unreadable) with "
        f"model {detector.model_id}, threshold {detector.threshold:.4f}\nPredictions: {out}"
    )
    _print_notes(detector, scored, len(skipped), resized, flagged)
    return {
        "output": str(out),
        "n": len(paths),
        "scored": scored,
        "errors": len(errors),
        "counts": counts,
        "model_id": detector.model_id,
        "threshold": detector.threshold,
        "flagged": flagged if detector.ood is not None else None,
        "resized": len(resized),
    }
