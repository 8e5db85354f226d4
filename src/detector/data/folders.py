"""Class folders: which classes a folder holds, its images, and the seeded train/val split."""

from __future__ import annotations

from pathlib import Path

import torch

from detector.data.scan import (
    is_ignored,
)
from detector.errors import ConfigError, DataError


def find_classes(folder: str | Path) -> list[str]:
    """Class names are the sorted sub-folder names, so CIFAKE gives FAKE=0, REAL=1 as the seed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist or is not a folder")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not is_ignored(p.name))
    if len(classes) != 2:
        lower = [c.lower() for c in classes]
        twins = [c for c in classes if lower.count(c.lower()) > 1]
        if twins:
            hint = f" ({' and '.join(twins)} differ only in case: merge them into one folder)"
        elif len(classes) > 2:
            hint = " (move the extra folders out)"
        else:
            hint = " (a class folder is missing)"
        raise DataError(
            f"{folder} must hold exactly two class folders (e.g. FAKE and REAL), found "
            f"{len(classes)}: {classes}{hint}"
        )
    return classes


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded permutation: the same files land in validation on every run and every rank."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = round(n * val_fraction)
    return sorted(order[n_val:]), sorted(order[:n_val])
