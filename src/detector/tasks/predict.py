"""``predict(cfg)``: score images, folders, globs or lists with a checkpoint; CSV or JSON Lines."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from detector.api import Detector
from detector.data.decode import IMAGE_EXTENSIONS, load_image
from detector.errors import ConfigError, DataError
from detector.files import describe_error
from detector.tasks.inputs import output_file, resolve_inputs

log = logging.getLogger(__name__)


class _Files(Dataset):
    """Decodes in loader workers; a file that fails becomes an error string, not an exception."""

    def __init__(self, paths: Sequence[str], image_size: int) -> None:
        self.paths = paths
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, load_image(self.paths[i], self.image_size), ""
        except Exception as e:  # any decoder failure is the file's problem, reported per row
            return i, None, describe_error(e)


def _collate(items):
    ok = [(i, x) for i, x, _ in items if x is not None]
    images = torch.stack([x for _, x in ok]) if ok else None
    return [i for i, _ in ok], images, [(i, err) for i, x, err in items if x is None]


class _RowWriter:
    """CSV or JSON Lines, one row per input, written as batches finish (long runs leave a
    usable partial file if stopped)."""

    def __init__(self, file, fmt: str, columns: Sequence[str]) -> None:
        self.file = file
        self.fmt = fmt
        self.columns = list(columns)
        if fmt == "csv":
            self.csv = csv.writer(self.file)
            self.csv.writerow(self.columns)

    def write(self, row: dict) -> None:
        if self.fmt == "csv":
            self.csv.writerow(["" if row[c] is None else row[c] for c in self.columns])
        else:
            self.file.write(json.dumps({c: row[c] for c in self.columns}) + "\n")


def predict(cfg: DictConfig) -> dict:
    """Score every image of ``cfg.input`` and write one row per image (errors included)."""
    if not cfg.get("ckpt"):
        raise ConfigError("ckpt is not set: pass ckpt=PATH to a .ckpt file written by train.py")
    batch_size = int(cfg.batch_size)
    if batch_size <= 0:
        raise ConfigError(f"batch_size={cfg.batch_size} must be a positive integer")
    if int(cfg.num_workers) < 0:
        raise ConfigError(f"num_workers={cfg.num_workers} must be >= 0")
    out, fmt = output_file(cfg)
    paths = resolve_inputs(cfg.get("input"))
    if not paths:
        raise DataError(f"input={cfg.input}: no images found ({', '.join(IMAGE_EXTENSIONS)})")
    detector = Detector.from_checkpoint(cfg.ckpt, device=cfg.device, threshold=cfg.threshold)
    names = detector.class_names
    prob_cols = [f"prob_{n}" for n in names]
    columns = ["path", *prob_cols, "label", "threshold", "model_id", "error"]
    loader = DataLoader(
        _Files(paths, detector.image_size),
        batch_size=batch_size,
        num_workers=int(cfg.num_workers),
        collate_fn=_collate,
    )
    counts = dict.fromkeys(names, 0)
    errors: list[tuple[str, str]] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(out, "w", newline="") as f,
        tqdm(total=len(paths), unit="img", desc="predict", disable=not cfg.get("progress")) as bar,
    ):
        writer = _RowWriter(f, fmt, columns)
        for indices, images, failed in loader:
            rows: dict[int, dict] = {}
            if images is not None:
                for i, p1 in zip(indices, detector.score(images).tolist(), strict=True):
                    pred = detector.decide(p1)
                    counts[pred.label] += 1
                    rows[i] = {
                        prob_cols[0]: round(1.0 - p1, 7),
                        prob_cols[1]: round(p1, 7),
                        "label": pred.label,
                        "error": None,
                    }
            for i, err in failed:
                errors.append((paths[i], err))
                rows[i] = {prob_cols[0]: None, prob_cols[1]: None, "label": None, "error": err}
            for i in sorted(rows):
                common = {"path": paths[i], "threshold": detector.threshold}
                writer.write({**common, "model_id": detector.model_id, **rows[i]})
            bar.update(len(rows))

    scored = len(paths) - len(errors)
    for path, err in errors[:5]:
        log.warning("could not read %s: %s", path, err)
    if len(errors) > 5:
        log.warning("... and %d more unreadable files (see the error column)", len(errors) - 5)
    if scored == 0:
        raise DataError(
            f"none of the {len(paths)} files from input={cfg.input} could be read "
            f"(first: {errors[0][0]}: {errors[0][1]}); rows with the errors are in {out}"
        )
    summary = ", ".join(f"{n} {c}" for n, c in counts.items())
    print(
        f"Scored {scored} of {len(paths)} images ({summary}; {len(errors)} unreadable) with "
        f"model {detector.model_id}, threshold {detector.threshold:.4f}\nPredictions: {out}"
    )
    return {
        "output": str(out),
        "n": len(paths),
        "scored": scored,
        "errors": len(errors),
        "counts": counts,
        "model_id": detector.model_id,
        "threshold": detector.threshold,
    }
