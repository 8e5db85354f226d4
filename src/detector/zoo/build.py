"""Building the zoo: which real images each member trains on and holds out, its folder of JPEGs
and member.json, the cache, and the checks that name the folder or setting at fault.

The real folder's image files, sorted by name, are cut once for all members: the first
``train_images`` train every member; after them, each member (in the order of ``MEMBERS``,
whichever are built) has its own slice of ``2 * (per_class + test_per_class)`` files, the first
half its REAL images, the second half the real images it reconstructs. So no member's REAL or
reconstructed image was seen in training, and no file appears in two members' folders.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from detector.data.cache import FOLDER_NAME as CACHE_FOLDER
from detector.data.demo import JPEG_QUALITY, pinned_torch, remove_stale_builds, save_jpeg
from detector.data.synthesis import IMAGE_SIZE, to_tensor
from detector.errors import ConfigError, DataError
from detector.files import atomic_write_text, display
from detector.zoo.fit import Trained, parameter_count, train_member
from detector.zoo.nets import BY_NAME, MEMBERS, Member

# Bump whenever anything that changes a member's bytes changes: cached members are rebuilt.
ZOO_VERSION = 1
MARKER = "detector.zoo"
MEMBER_FILE = "member.json"
MODES = ("mixed", "samples", "reconstructions")
SPLITS = ("train", "test")
SUFFIXES = (".jpg", ".jpeg", ".png")
REAL_DIR = "data/cifake/train/REAL"


@dataclass(frozen=True)
class ZooSettings:
    """What the zoo is built from; every field is part of each member's cache key."""

    real_dir: str = REAL_DIR
    seed: int = 0
    train_images: int = 5000  # real images every member trains on
    steps: int | None = None  # training steps; None: each member's own (nets.MEMBERS)
    per_class: int = 2000  # train/ images per class and member
    test_per_class: int = 500  # test/ images per class and member
    mode: str = "mixed"  # FAKE: half samples, half reconstructions; or all of one kind

    def check(self, members: list[Member]) -> None:
        for key, low in (("train_images", 2), ("per_class", 1), ("test_per_class", 1)):
            if getattr(self, key) < low:
                raise ConfigError(f"--{key.replace('_', '-')} must be at least {low}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError("--steps must be at least 1")
        if self.mode not in MODES:
            raise ConfigError(f"--mode {self.mode!r}: one of {', '.join(MODES)}")
        cannot = [m.name for m in members if not m.reconstructs]
        if self.mode == "reconstructions" and cannot:
            able = ",".join(m.name for m in members if m.reconstructs) or "tconv"
            raise ConfigError(
                f"--mode reconstructions: {', '.join(cannot)} has no encoder, so it makes "
                f"samples only; leave it out (--members {able})"
            )

    @property
    def block(self) -> int:
        """Held-out real files per member: its REAL images, then those it reconstructs."""
        return 2 * (self.per_class + self.test_per_class)


def select_members(names: str | list[str] | None) -> list[Member]:
    """The members asked for, in the zoo's order; all when ``names`` is None or empty."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        return list(MEMBERS)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ConfigError(
            f"--members: unknown member {', '.join(map(repr, unknown))}; known: "
            + ", ".join(BY_NAME)
        )
    return [m for m in MEMBERS if m.name in names]


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    return sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file()),
        key=lambda p: p.name,
    )


def list_real(real_dir: str | Path) -> list[Path]:
    """The image files directly in ``real_dir``, sorted by name."""
    folder = Path(real_dir)
    if not folder.is_dir():
        raise DataError(
            f"--real-dir {display(folder)} is not a folder: pass the folder of real training "
            f"images (CIFAKE's: {REAL_DIR}, README 'Train on CIFAKE')"
        )
    files = image_files(folder)
    if not files:
        raise DataError(f"--real-dir {display(folder)} holds no images ({', '.join(SUFFIXES)})")
    return files


def load_images(paths: list[Path]) -> np.ndarray:
    """uint8 (n, 32, 32, 3); other sizes are centre-cropped square and resized to 32."""
    out = np.empty((len(paths), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (OSError, ValueError) as e:
            raise DataError(f"--real-dir: {display(path)} is not a readable image ({e})") from e
        if img.size != (IMAGE_SIZE, IMAGE_SIZE):
            w, h = img.size
            side = min(w, h)
            box = ((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)
            img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS, box=box)
        out[i] = np.asarray(img)
    return out


def _slices(files: list[Path], settings: ZooSettings, member: Member) -> dict[str, list[Path]]:
    """The member's training, REAL and reconstructed files (module docstring)."""
    start = settings.train_images + MEMBERS.index(member) * settings.block
    held = files[start : start + settings.block]
    n_real = settings.per_class + settings.test_per_class
    return {
        "train": files[: settings.train_images],
        "real": held[:n_real],
        "reconstructed": held[n_real:],
    }


def check_enough(files: list[Path], settings: ZooSettings, members: list[Member]) -> None:
    last = max(MEMBERS.index(m) for m in members)
    need = settings.train_images + (last + 1) * settings.block
    if len(files) < need:
        raise DataError(
            f"--real-dir {display(files[0].parent)} holds {len(files)} images; {need} are "
            f"needed: --train-images {settings.train_images}, then {settings.block} per member "
            f"(2 x (--per-class + --test-per-class)) up to {members[-1].name}, member "
            f"{last + 1} of the zoo's {len(MEMBERS)}: lower those settings"
        )


def _fake_counts(member: Member, mode: str, n: int) -> tuple[int, int]:
    """(samples, reconstructions) among ``n`` FAKE images."""
    if not member.reconstructs or mode == "samples":
        return n, 0
    recon = n if mode == "reconstructions" else n // 2
    return n - recon, recon


def _names_hash(paths: list[Path]) -> str:
    return hashlib.sha256("\n".join(p.name for p in paths).encode()).hexdigest()[:16]


def wanted_settings(member: Member, settings: ZooSettings, files: list[Path]) -> dict[str, Any]:
    """The member's cache key: everything its bytes depend on."""
    used = [p for part in _slices(files, settings, member).values() for p in part]
    return {
        **asdict(settings),
        "real_dir": str(Path(settings.real_dir).absolute()),
        "steps": settings.steps or member.steps,
        "member": member.name,
        "version": ZOO_VERSION,
        "real_files": _names_hash(used),
        "image_size": IMAGE_SIZE,
        "jpeg_quality": JPEG_QUALITY,
    }


def read_member(folder: Path) -> dict[str, Any] | None:
    """member.json of a finished member, or None."""
    try:
        info = json.loads((folder / MEMBER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("zoo") == MARKER else None


def _check_replaceable(folder: Path) -> None:
    """Only a finished member (member.json, its split folders and the image cache a training
    run leaves beside them, nothing else) is replaced."""
    if not folder.exists() and not folder.is_symlink():
        return
    extra = set()
    if folder.is_dir() and not folder.is_symlink():
        extra = {p.name for p in folder.iterdir()} - {MEMBER_FILE, CACHE_FOLDER, *SPLITS}
    if read_member(folder) is None or extra:
        raise DataError(
            f"{display(folder)} exists and is not a zoo member built here (no {MEMBER_FILE}, "
            "or other files in it); refusing to replace it: move it or choose another OUT"
        )


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _write(folder: Path, prefix: str, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, arr in enumerate(images):
        save_jpeg(arr, folder / f"{prefix}_{i:05d}.jpg")


def _write_splits(
    tmp: Path, trained: Trained, parts: dict[str, list[Path]], settings: ZooSettings, gen
) -> dict[str, Any]:
    """Both splits' FAKE (samples, then reconstructions) and REAL (re-encoded) files."""
    counts: dict[str, Any] = {}
    n_real = settings.per_class
    for split, n in zip(SPLITS, (settings.per_class, settings.test_per_class), strict=True):
        offset = 0 if split == "train" else n_real
        n_samples, n_recon = _fake_counts(trained.member, settings.mode, n)
        real = load_images(parts["real"][offset : offset + n])
        _write(tmp / split / "REAL", "real", real)
        _write(tmp / split / "FAKE", "sample", _to_uint8(trained.sample(n_samples, gen)))
        sources = load_images(parts["reconstructed"][offset : offset + n_recon])
        recon = trained.reconstruct(to_tensor(sources))
        _write(tmp / split / "FAKE", "recon", _to_uint8(recon))
        fake = {"samples": n_samples, "reconstructions": n_recon}
        counts[split] = {"FAKE": fake, "REAL": len(real)}
    return counts


def _progress(name: str, steps: int, start: float, log: Callable[[str], None]):
    """A tick for each training step that logs a line at each quarter of the steps."""
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if done % max(steps // 4, 1) == 0 and done < steps:
            log(f"zoo: {name}: step {done}/{steps}, {time.perf_counter() - start:.0f} s")

    return tick


def swap_in(tmp: Path, folder: Path) -> None:
    """Move the finished ``tmp`` to ``folder``, replacing a stale member there."""
    old = None
    if folder.exists():
        _check_replaceable(folder)
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        os.replace(folder, old / folder.name)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def member_folder(folder: Path, info: dict[str, Any]) -> Iterator[Path]:
    """A hidden temp folder beside ``folder`` to write a member into; on success ``info`` (as
    filled in by then) is written as member.json, last, and the folder renamed into place, so a
    folder at ``folder`` is always a finished one; on failure the temp folder is removed."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        yield tmp
        atomic_write_text(tmp / MEMBER_FILE, json.dumps(info, indent=2) + "\n")
        swap_in(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def build_member(
    member: Member,
    folder: Path,
    settings: ZooSettings,
    files: list[Path],
    train_data: torch.Tensor,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train one member and write its folder atomically; returns its member.json."""
    wanted = wanted_settings(member, settings, files)
    parts = _slices(files, settings, member)
    member_seed = settings.seed * 1000 + MEMBERS.index(member)
    info: dict[str, Any] = {}
    with member_folder(folder, info) as tmp:
        start = time.perf_counter()
        log(f"zoo: {member.name}: training {wanted['steps']} steps on {len(train_data)} images")
        # the demo's: one thread (5x faster than two here, docs/zoo.md), seeded, restored
        with pinned_torch(member_seed) as gen:
            threads = torch.get_num_threads()
            tick = _progress(member.name, wanted["steps"], start, log)
            trained = train_member(member, train_data, wanted["steps"], gen, tick)
            train_seconds = time.perf_counter() - start
            counts = _write_splits(tmp, trained, parts, settings, gen)
        info |= {
            "zoo": MARKER,
            "member": member.name,
            "about": member.about,
            "kind": member.kind,
            "decoder": member.decoder,
            "settings": wanted,
            "seed": settings.seed,
            "member_seed": member_seed,
            "counts": counts,
            "real_files": {k: [v[0].name, v[-1].name] if v else [] for k, v in parts.items()},
            "parameters": parameter_count(trained.model),
            "final_loss": trained.final_loss,
            "train_seconds": round(train_seconds, 1),
            "build_seconds": round(time.perf_counter() - start, 1),
            "torch": torch.__version__,
            "threads": threads,
        }
    return info


def build_zoo(
    out: str | Path,
    members: str | list[str] | None = None,
    settings: ZooSettings | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """Build the chosen members into ``out/<member>``, skipping those already built with the
    same settings; returns each member's member.json."""
    settings = settings or ZooSettings()
    chosen = select_members(members)
    settings.check(chosen)
    files = list_real(settings.real_dir)
    check_enough(files, settings, chosen)
    out = Path(out)
    result, train_data = {}, None
    for member in chosen:
        folder = out / member.name
        info = read_member(folder)
        if info is not None and info.get("settings") == wanted_settings(member, settings, files):
            log(f"zoo: {member.name}: up to date ({display(folder / MEMBER_FILE)}), skipped")
            result[member.name] = info
            continue
        _check_replaceable(folder)
        if train_data is None:  # decoded once, and only when a member is to be trained
            train_data = to_tensor(load_images(files[: settings.train_images]))
        info = build_member(member, folder, settings, files, train_data, log)
        log(
            f"zoo: {member.name}: done in {info['build_seconds']:.0f} s (training "
            f"{info['train_seconds']:.0f} s), final loss {info['final_loss']}"
        )
        result[member.name] = info
    return result
