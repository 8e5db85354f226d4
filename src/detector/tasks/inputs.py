"""What ``input=`` names (an image, a folder, a glob, a list file), where results go, and the
run around them that predict.py and explain.py share: ckpt and inputs checked before any model
is loaded, one row per input with an error column, a failure when nothing could be read."""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from omegaconf import DictConfig
from tqdm.auto import tqdm

from detector.api import Detector
from detector.data.decode import IMAGE_EXTENSIONS
from detector.errors import ConfigError, DataError, ckpt_not_set

log = logging.getLogger(__name__)

LIST_EXTENSIONS = (".txt", ".lst", ".list")


OUTPUT_FORMATS = ("csv", "jsonl")


GLOB_CHARS = ("*", "?", "[")


# Unreadable files named in the log; the table's error column holds every one.
UNREADABLE_SHOWN = 5


def _is_image_name(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


# Image types that cameras and phones write but this tool cannot decode: named as such when a
# folder holds them, so a user knows to convert them rather than wonder where they went.
UNDECODABLE_IMAGES = (".heic", ".heif", ".avif", ".svg", ".psd", ".raw", ".cr2", ".nef", ".dng")
SKIPPED_SHOWN = 20


def _skip_reason(name: str) -> str:
    suffix = Path(name).suffix.lower()
    if suffix in UNDECODABLE_IMAGES:
        return f"{suffix} images are not supported: convert to JPEG or PNG"
    return "not an image file name (" + ", ".join(IMAGE_EXTENSIONS) + ")"


def _walk_images(folder: Path, skipped: list[tuple[str, str]] | None = None) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if f.startswith("."):
                continue
            if _is_image_name(f):
                found.append(os.path.join(dirpath, f))
            elif skipped is not None:
                skipped.append((os.path.join(dirpath, f), _skip_reason(f)))
    return sorted(found)


def _looks_like_path(entry: str) -> bool:
    return _is_image_name(entry) or os.sep in entry or Path(entry).expanduser().exists()


def _read_list(path: Path) -> list[str]:
    """Paths one per line; blank lines and ``#`` comments skipped. A relative path is taken
    from the current folder, or else from the list's own folder (lists travel with data). A
    text none of whose lines looks like a path (prose) is refused rather than read as paths."""
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as e:
        raise ConfigError(f"input={path}: neither an image nor a text file of paths") from e
    entries = [e.strip() for e in lines if e.strip() and not e.strip().startswith("#")]
    if entries and not any(_looks_like_path(e) or (path.parent / e).exists() for e in entries):
        raise ConfigError(
            f"input={path}: not an image and not a list of paths (no line names an image or "
            f"an existing file; line 1: {entries[0][:60]!r})"
        )
    out = []
    for entry in entries:
        p = Path(entry).expanduser()
        if not p.is_absolute() and not p.exists() and (path.parent / p).exists():
            p = path.parent / p
        out.append(str(p))
    return out


def resolve_inputs(
    spec: str | os.PathLike, skipped: list[tuple[str, str]] | None = None
) -> list[str]:
    """Image paths from ``input``: an image, a folder (recursive), a glob or a list file.

    Files named in a list or matched by a glob are kept even when they may not decode: they
    get an error row rather than silently vanishing. Files of a folder that are not images
    go into ``skipped`` (path, why).
    """
    if spec is None or str(spec).strip() == "":
        raise ConfigError("input is not set: pass input=PATH (an image, folder, glob or list)")
    text = os.path.expanduser(str(spec))
    path = Path(text)
    if path.is_dir():
        return _walk_images(path, skipped)
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
                found += _walk_images(Path(match), skipped)
            else:
                found.append(match)
        if not found:
            raise ConfigError(f"input={spec}: the pattern matches no files")
        return list(dict.fromkeys(found))
    raise ConfigError(f"input={spec}: no such file or folder (nor a glob pattern)")


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


def output_file(cfg: DictConfig) -> tuple[Path, str]:
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


def require_ckpt(ckpt: str | None) -> None:
    """Refuses a missing ``ckpt=`` before the inputs are walked (a large folder or glob is not
    scanned for a run that cannot start)."""
    if not ckpt:
        raise ConfigError(ckpt_not_set())


def image_paths(
    cfg: DictConfig, hint: str = "", skipped: list[tuple[str, str]] | None = None
) -> list[str]:
    """An ``input=`` that names no image at all is an error: an empty table would read as a run
    that found nothing. ``hint`` ends the task's own message. Files of a folder that are not
    images are counted and named in the log (and collected in ``skipped``)."""
    skipped = [] if skipped is None else skipped
    if cfg.get("input") and Path(os.path.expanduser(str(cfg.input))).is_dir():
        print(f"scanning {cfg.input} ...", flush=True)  # a large folder takes a while
    paths = resolve_inputs(cfg.get("input"), skipped)
    if skipped:
        shown = "; ".join(f"{p} ({why})" for p, why in skipped[:SKIPPED_SHOWN])
        extra = len(skipped) - SKIPPED_SHOWN
        more = f"; and {extra} more" if extra > 0 else ""
        log.warning("skipped %d files of input=%s: %s%s", len(skipped), cfg.input, shown, more)
    if not paths:
        raise DataError(f"input={cfg.input}: no images found{hint}")
    return paths


def load_detector(cfg: DictConfig) -> Detector:
    """Both tasks read the model alike, so ``threshold=null`` keeps the checkpoint's own (and
    ``max_tiles`` / ``aggregate``, where a task has them, the checkpoint's contract)."""
    print(f"loading the model from {cfg.ckpt} ...", flush=True)
    return Detector.from_checkpoint(
        cfg.ckpt,
        device=cfg.device,
        threshold=cfg.threshold,
        max_tiles=cfg.get("max_tiles"),
        aggregate=cfg.get("aggregate"),
        max_pixels=cfg.get("max_pixels"),
        jpeg_draft=cfg.get("jpeg_draft"),
    )


class RowWriter:
    """CSV or JSON Lines, one row per input, written as batches finish (long runs leave a
    usable partial file if stopped). A column a row lacks is empty (CSV) or null (JSON)."""

    def __init__(self, file, fmt: str, columns: Sequence[str]) -> None:
        self.file = file
        self.fmt = fmt
        self.columns = list(columns)
        if fmt == "csv":
            self.csv = csv.writer(self.file)
            self.csv.writerow(self.columns)

    def write(self, row: dict) -> None:
        if self.fmt == "csv":
            self.csv.writerow(["" if row.get(c) is None else row[c] for c in self.columns])
        else:
            self.file.write(json.dumps({c: row.get(c) for c in self.columns}) + "\n")


def write_rows(
    out: Path,
    fmt: str,
    columns: Sequence[str],
    batches: Iterable[dict[int, dict]],
    desc: str,
    progress: bool,
    total: int,
) -> None:
    """Each batch's rows (keyed by input index) in input order as soon as it is done, so a run
    stopped midway leaves the rows so far; the bar counts inputs, readable or not."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(out, "w", newline="") as f,
        tqdm(total=total, unit="img", desc=desc, disable=not progress) as bar,
    ):
        writer = RowWriter(f, fmt, columns)
        for rows in batches:
            for i in sorted(rows):
                writer.write(rows[i])
            bar.update(len(rows))


def warn_unreadable(log: logging.Logger, errors: Sequence[tuple[str, str]]) -> None:
    """The first few in the task's own log, where a user looks first; all are in the table."""
    for path, err in errors[:UNREADABLE_SHOWN]:
        log.warning("could not read %s: %s", path, err)


def require_some_read(
    n_read: int, errors: Sequence[tuple[str, str]], n_inputs: int, spec: str, where: str
) -> None:
    """Nothing read is a failed run (exit status 2), not an empty result; the table of error
    rows stays, and ``where`` ends the message by pointing at it."""
    if n_read == 0:
        raise DataError(
            f"none of the {n_inputs} files from input={spec} could be read "
            f"(first: {errors[0][0]}: {errors[0][1]}); {where}"
        )
