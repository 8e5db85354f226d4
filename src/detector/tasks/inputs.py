"""What ``input=`` names (an image, a folder, a glob, a list file) and where results go:
shared by predict.py and explain.py."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from detector.data.decode import IMAGE_EXTENSIONS
from detector.errors import ConfigError

LIST_EXTENSIONS = (".txt", ".lst", ".list")


OUTPUT_FORMATS = ("csv", "jsonl")


GLOB_CHARS = ("*", "?", "[")


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
