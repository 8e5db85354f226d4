"""Scoring one's own images: the :class:`Detector` Python API and the ``predict`` task.

Preprocessing is eval's, step for step: files go through :func:`detector.data.load_image`
(RGB, bilinear resize only when not already S x S, uint8) and the network normalises inside
its own ``forward``. In-memory images (PIL, numpy, uint8 tensors) take the same steps, so a
file and the decoded file give the same probability.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as F

from detector.data import IMAGE_EXTENSIONS, load_image, pil_to_input
from detector.errors import ConfigError, DataError

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from detector.module import DetectorModule

log = logging.getLogger(__name__)

LIST_EXTENSIONS = (".txt", ".lst", ".list")
OUTPUT_FORMATS = ("csv", "jsonl")
GLOB_CHARS = ("*", "?", "[")

ImageInput = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor


def file_hash(path: str | Path, length: int = 12) -> str:
    """The model id written next to every prediction: two runs with the same id used the same
    weights, whatever the checkpoint file was renamed to."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def _load_module(path: str | Path) -> DetectorModule:
    # The shared weights-only loader: predict, export and eval accept and refuse the same files.
    from detector.checkpoint import load_checkpoint

    return load_checkpoint(path)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(
            f"device={device!r} is not a torch device (cpu, cuda, cuda:1, auto)"
        ) from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r}: CUDA is not available here; use device=cpu")
    return resolved


@dataclass(frozen=True)
class Prediction:
    """One image's result. ``probability`` is P(``class_names[1]``), the network's own output."""

    label: str
    index: int
    probability: float
    probabilities: dict[str, float]
    threshold: float


class Detector:
    """A trained detector ready to score images.

    >>> d = Detector.from_checkpoint("best.ckpt", device="cpu")
    >>> d.predict(["cat.jpg", PIL.Image.open("dog.png"), uint8_chw_tensor])
    """

    def __init__(
        self,
        module: DetectorModule,
        device: str | torch.device | None = "cpu",
        threshold: float | None = None,
        model_id: str = "",
    ) -> None:
        self.device = resolve_device(device)
        self.module = module.to(self.device).eval()
        self.net = self.module.net
        if threshold is None:
            threshold = module.threshold
        if not 0.0 <= float(threshold) <= 1.0:
            raise ConfigError(f"threshold={threshold} must be in [0, 1]")
        self.threshold = float(threshold)
        self.class_names: list[str] = list(module.hparams.class_names)
        self.image_size = int(module.hparams.image_size)
        self.model_id = model_id

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str | torch.device | None = "cpu",
        threshold: float | None = None,
    ) -> Detector:
        """``threshold=None`` keeps the one stored in the checkpoint (fitted on validation)."""
        module = _load_module(path)
        return cls(module, device=device, threshold=threshold, model_id=file_hash(path))

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """uint8 (3, S, S) exactly as eval builds it from a file.

        Accepts a path, a PIL image, a numpy array (H, W[, C]) or a uint8 tensor (C, H, W).
        """
        if isinstance(image, str | os.PathLike):
            try:
                return load_image(str(image), self.image_size)
            except Exception as e:
                raise DataError(f"cannot read image {image}: {describe_error(e)}") from e
        if isinstance(image, Image.Image):
            return pil_to_input(image, self.image_size)
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                raise TypeError(f"numpy images must be uint8 (H, W[, C]), got {image.dtype}")
            return pil_to_input(Image.fromarray(image), self.image_size)
        if isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8:
                raise TypeError(
                    f"tensor images must be uint8 (C, H, W) in [0, 255], got {image.dtype}: "
                    "convert with (x * 255).round().to(torch.uint8)"
                )
            if image.ndim == 2:
                image = image[None]
            if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
                raise TypeError(f"tensor images must be (C, H, W) with C in 1, 3, 4: {image.shape}")
            size = (self.image_size, self.image_size)
            if image.shape[0] == 3 and tuple(image.shape[1:]) == size:
                return image.cpu().contiguous()
            return pil_to_input(F.to_pil_image(image.cpu()), self.image_size)
        raise TypeError(f"cannot score an object of type {type(image).__name__}")

    @torch.inference_mode()
    def score(self, images: torch.Tensor) -> torch.Tensor:
        """P(class 1) for a uint8 batch (N, 3, S, S), on the CPU, as eval's test step."""
        logits = self.net(images.to(self.device)).float()
        return torch.sigmoid(logits).cpu()

    def _batches(self, inputs: Any, batch_size: int) -> Iterator[torch.Tensor]:
        if isinstance(inputs, torch.Tensor) and inputs.ndim == 4:
            items: Sequence = list(inputs)
        elif isinstance(inputs, str | os.PathLike | Image.Image | np.ndarray | torch.Tensor):
            items = [inputs]
        else:
            items = list(inputs)
        for start in range(0, len(items), batch_size):
            yield torch.stack([self.preprocess(x) for x in items[start : start + batch_size]])

    def predict_proba(
        self, inputs: ImageInput | Iterable[ImageInput], batch_size: int = 32
    ) -> torch.Tensor:
        """(N, 2) probabilities, columns in ``class_names`` order (like scikit-learn)."""
        batches = [self.score(b) for b in self._batches(inputs, batch_size)]
        p1 = torch.cat(batches) if batches else torch.empty(0)
        return torch.stack([1.0 - p1, p1], dim=1)

    def predict(
        self, inputs: ImageInput | Iterable[ImageInput], batch_size: int = 32
    ) -> list[Prediction]:
        """One :class:`Prediction` per image (a single image also gives a list of one)."""
        return [self.decide(float(p[1])) for p in self.predict_proba(inputs, batch_size)]

    def decide(self, p1: float) -> Prediction:
        """Label by the threshold, as eval's report does (``p >= threshold`` is class 1)."""
        index = int(p1 >= self.threshold)
        names = self.class_names
        return Prediction(
            label=names[index],
            index=index,
            probability=p1,
            probabilities={names[0]: 1.0 - p1, names[1]: p1},
            threshold=self.threshold,
        )


def describe_error(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _is_image_name(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [
            os.path.join(dirpath, f)
            for f in filenames
            if not f.startswith(".") and _is_image_name(f)
        ]
    return sorted(found)


def _read_list(path: Path) -> list[str]:
    """Paths one per line; blank lines and ``#`` comments skipped. A relative path is taken
    from the current folder, or else from the list's own folder (lists travel with data)."""
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as e:
        raise ConfigError(f"input={path}: neither an image nor a text file of paths") from e
    out = []
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        p = Path(entry).expanduser()
        if not p.is_absolute() and not p.exists() and (path.parent / p).exists():
            p = path.parent / p
        out.append(str(p))
    return out


def resolve_inputs(spec: str | os.PathLike) -> list[str]:
    """Image paths from ``input``: an image, a folder (recursive), a glob or a list file.

    Files named in a list or matched by a glob are kept even when they may not decode: they
    get an error row rather than silently vanishing.
    """
    if spec is None or str(spec).strip() == "":
        raise ConfigError("input is not set: pass input=PATH (an image, folder, glob or list)")
    text = os.path.expanduser(str(spec))
    path = Path(text)
    if path.is_dir():
        return _walk_images(path)
    if path.is_file():
        if _is_image_name(path):
            return [text]
        if path.suffix.lower() in LIST_EXTENSIONS:
            return _read_list(path)
        # Unknown suffix: a text file is a list, anything else is tried as an image.
        try:
            with open(path, encoding="utf-8") as f:
                f.read(4096)
        except UnicodeDecodeError:
            return [text]
        return _read_list(path)
    if any(c in text for c in GLOB_CHARS):
        found: list[str] = []
        for match in sorted(glob.glob(text, recursive=True)):
            if os.path.isdir(match):
                found += _walk_images(Path(match))
            else:
                found.append(match)
        if not found:
            raise ConfigError(f"input={spec}: the pattern matches no files")
        return list(dict.fromkeys(found))
    raise ConfigError(f"input={spec}: no such file or folder (nor a glob pattern)")


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


def output_target(
    cfg_output: str | None, run_dir: str | Path, default_name: str, suffixes: Sequence[str]
) -> Path:
    """``output=`` names a file when it ends with one of ``suffixes``, else a folder."""
    if not cfg_output:
        return Path(run_dir) / default_name
    out = Path(os.path.expanduser(str(cfg_output)))
    if out.suffix.lower() in suffixes:
        return out
    return out / default_name


def _output_file(cfg: DictConfig) -> tuple[Path, str]:
    fmt = cfg.get("format")
    if fmt is not None and fmt not in OUTPUT_FORMATS:
        raise ConfigError(f"format={fmt} must be one of {', '.join(OUTPUT_FORMATS)}")
    suffixes = tuple(f".{f}" for f in OUTPUT_FORMATS)
    out = output_target(
        cfg.get("output"), cfg.paths.output_dir, f"predictions.{fmt or 'csv'}", suffixes
    )
    from_suffix = out.suffix.lower().lstrip(".")
    if fmt is not None and from_suffix != fmt:
        raise ConfigError(f"output={cfg.output} does not end in .{fmt} but format={fmt}")
    return out, from_suffix


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
    from tqdm.auto import tqdm

    if not cfg.get("ckpt"):
        raise ConfigError("ckpt is not set: pass ckpt=PATH to a .ckpt file written by train.py")
    batch_size = int(cfg.batch_size)
    if batch_size <= 0:
        raise ConfigError(f"batch_size={cfg.batch_size} must be a positive integer")
    if int(cfg.num_workers) < 0:
        raise ConfigError(f"num_workers={cfg.num_workers} must be >= 0")
    out, fmt = _output_file(cfg)
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
