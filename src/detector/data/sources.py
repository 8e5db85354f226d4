"""Where labelled images come from: class folders named by ``data.class_map`` and several
training sources (``data.train_dirs``), each split with the seed rule, weighed by
``data.source_weights``.

Why a map: public sets name their classes their own way (GenImage ``ai``/``nature``,
ForenSynths ``0_real``/``1_fake``, one level below a category folder), and copying files into
``FAKE``/``REAL`` first is what researchers should not have to do. Labels are always the
map's sorted class names, so a GenImage and a CIFAKE checkpoint share ``FAKE=0, REAL=1``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Sampler

from detector.data.decode import IMAGE_EXTENSIONS
from detector.data.folders import find_classes
from detector.data.scan import is_ignored
from detector.errors import ConfigError, DataError
from detector.files import display

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class ClassFolders:
    """The classes of one folder: ``classes`` (sorted label names; the label is the position)
    and ``folders`` (each class folder, relative to the folder, -> its label)."""

    classes: list[str]
    folders: dict[str, int]

    def samples(self, good: Mapping[str, Sequence[str]]) -> list[tuple[str, int]]:
        """(path, label) of a scan's usable files, folder by folder in ``folders`` order."""
        return [(p, label) for rel, label in self.folders.items() for p in good[rel]]


def check_class_map(class_map: Mapping | None) -> dict[str, str] | None:
    """``data.class_map``: folder name -> class name, two class names in all."""
    if class_map is None:
        return None
    if not isinstance(class_map, Mapping) or not class_map:
        raise ConfigError(
            f"data.class_map={class_map!r} must map folder names to class names, e.g. "
            "{ai: FAKE, nature: REAL}, or be null (the folder names are the classes)"
        )
    mapped = {str(k): str(v) for k, v in class_map.items()}
    if len(set(mapped.values())) != 2:
        raise ConfigError(
            f"data.class_map={mapped} must name exactly two classes (e.g. FAKE and REAL), "
            f"found {sorted(set(mapped.values()))}"
        )
    return mapped


def class_folders(folder: str | Path, class_map: Mapping[str, str] | None = None) -> ClassFolders:
    """Without a map: the two sub-folders, whose sorted names are the classes (CIFAKE's
    ``FAKE``/``REAL``). With one: every folder below ``folder`` named like a key of the map,
    at any depth (ForenSynths' ``<category>/0_real``), is a class folder of the key's class; a
    folder that holds images and is neither in the map nor inside a mapped folder is refused."""
    folder = Path(folder)
    if class_map is None:
        classes = find_classes(folder)
        return ClassFolders(classes, {name: i for i, name in enumerate(classes)})
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist or is not a folder")
    classes = sorted(set(class_map.values()))
    found: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(folder):  # symlinked folders: listed, not walked
        here = Path(dirpath)
        if here != folder and any(Path(f).suffix.lower() in IMAGE_EXTENSIONS for f in filenames):
            raise ConfigError(
                f"{display(here)} holds images but data.class_map has no key {here.name!r}: add "
                f"+data.class_map.{here.name}=<one of {', '.join(classes)}> (or move it out)"
            )
        keep = []
        for name in sorted(d for d in dirnames if not is_ignored(d)):
            if name in class_map:
                rel = (here / name).relative_to(folder).as_posix()
                found[rel] = classes.index(class_map[name])
            else:
                keep.append(name)
        dirnames[:] = keep
    missing = [c for i, c in enumerate(classes) if i not in found.values()]
    if missing:
        keys = [k for k, v in class_map.items() if v in missing]
        raise DataError(
            f"{display(folder)} has no folder of class {' or '.join(missing)}: data.class_map "
            f"looks for folders named {' or '.join(keys)} (found {sorted(found) or 'none'})"
        )
    return ClassFolders(classes, found)


def name_sources(spec, setting: str = "data.train_dirs") -> list[tuple[str, Path]]:
    """``{name: folder}`` or ``[folder, ...]`` (named after the folder, or its parent for a
    ``train`` folder) -> [(name, folder)]; names become metric tags (``val/<name>/auroc``)."""
    if isinstance(spec, Mapping):
        items = [(str(k), str(v)) for k, v in spec.items()]
    elif isinstance(spec, Sequence) and not isinstance(spec, str):
        items = []
        for folder in map(str, spec):
            path = Path(folder).expanduser()
            name = path.parent.name if path.name in ("train", "test", "val") else path.name
            base, i = name or "source", 2
            while not name or name in {n for n, _ in items}:
                name, i = f"{base}_{i}", i + 1
            items.append((name, folder))
    else:
        raise ConfigError(f"{setting}={spec!r} must be a mapping {{name: folder}} or a list")
    if not items:
        raise ConfigError(f"{setting} is empty: name at least one folder")
    for name, folder in items:
        if not _NAME.fullmatch(name) or name in (".", ".."):
            raise ConfigError(
                f"{setting}: source name {name!r} must be letters, digits, '_', '-' or '.' "
                "(it names the source's metrics, val/<name>/auroc)"
            )
        if not folder or folder == "None":
            raise ConfigError(f"{setting}.{name} has no folder")
    return [(name, Path(folder)) for name, folder in items]


def check_source_weights(weights, names: Sequence[str]) -> list[float] | None:
    """``data.source_weights``: null (sources as large as they are), ``equal`` (each source the
    same share of every epoch) or ``{name: weight}`` (shares proportional to the weights)."""
    if weights is None:
        return None
    if weights == "equal":
        return [1.0] * len(names)
    if not isinstance(weights, Mapping):
        raise ConfigError(
            f"data.source_weights={weights!r} must be null, equal or {{source: weight}}"
        )
    unknown = sorted(set(map(str, weights)) - set(names))
    if unknown:
        raise ConfigError(
            f"data.source_weights.{unknown[0]}: no such source in data.train_dirs "
            f"({', '.join(names)})"
        )
    out = []
    for name in names:
        w = weights.get(name, 1.0)
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"data.source_weights.{name}={w!r} must be a number >= 0")
        out.append(float(w))
    if not any(out):
        raise ConfigError("data.source_weights: at least one weight must be > 0")
    return out


class SourceWeightedSampler(Sampler[int]):
    """Draws ``len(sources)`` indices per epoch, with replacement, so that source ``s`` makes
    ``weights[s] / sum(weights)`` of the epoch whatever its size. Every rank draws the same
    seeded sequence (seed + epoch) and takes every ``world``-th index: DDP shards stay
    disjoint and equally long (``drop_last`` cuts the tail, else it wraps around)."""

    def __init__(
        self,
        sources: Sequence[int],
        weights: Sequence[float],
        seed: int,
        world: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        counts = torch.bincount(torch.as_tensor(sources), minlength=len(weights)).double()
        per_source = torch.tensor(weights, dtype=torch.double) / counts.clamp_min(1)
        self.weights = per_source[torch.as_tensor(sources)]
        self.seed, self.world, self.rank, self.epoch = seed, world, rank, 0
        n = len(sources)
        self.per_rank = n // world if drop_last else math.ceil(n / world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        total = self.per_rank * self.world
        order = torch.multinomial(self.weights, total, replacement=True, generator=gen)
        return iter(order[self.rank :: self.world].tolist())

    def __len__(self) -> int:
        return self.per_rank
