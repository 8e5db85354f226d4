"""``OUT/rest``: the real folder's own images that no zoo member used, beside as many files of
its FAKE sibling, as a source of their own (docs/zoo.md, "Which real images").

Why: the zoo's REAL images and the images it reconstructs are real training files (CIFAKE's).
A leave-one-out model that trains on the whole CIFAKE folder beside the zoo has seen the
held-out member's REAL images, and the originals of its reconstructions, labelled REAL; its
score on that member measures memory, not generalisation. This folder holds only the files
after every member's slice (all of the zoo's members, built or not, so building more or fewer
of them never changes it; a new member in ``MEMBERS`` moves it on by one slice), linked rather
than copied, split into train/ and test/ so that CIFAKE gets a column of its own in the matrix
(never CIFAKE's held-out test split).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from detector.files import display
from detector.zoo.build import (
    MARKER,
    MEMBER_FILE,
    ZooSettings,
    image_files,
    member_folder,
    read_member,
)
from detector.zoo.nets import MEMBERS

REST = "rest"
REST_VERSION = 1


def unused_real(files: list[Path], settings: ZooSettings) -> list[Path]:
    """The sorted real files after the slices of all of the zoo's members."""
    return files[settings.train_images + len(MEMBERS) * settings.block :]


def _link_all(files: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        os.symlink(path.resolve(), folder / path.name)


def _link_rest(
    folder: Path, real: list[Path], fake: list[Path], test_per_class: int, wanted: dict
) -> dict[str, Any]:
    """Link both classes into a temp folder, then rename it to ``folder`` (as a member)."""
    info: dict[str, Any] = {}
    with member_folder(folder, info) as tmp:
        for cls, chosen in (("REAL", real), ("FAKE", fake)):
            _link_all(chosen[:test_per_class], tmp / "test" / cls)
            _link_all(chosen[test_per_class:], tmp / "train" / cls)
        info |= {
            "zoo": MARKER,
            "member": REST,
            "about": "the real folder's images no member used, and as many FAKE ones (links)",
            "settings": wanted,
            "counts": {"train": len(real) - test_per_class, "test": test_per_class},
            "real_files": [real[0].name, real[-1].name],
        }
    return info


def write_rest(
    out: str | Path,
    files: list[Path],
    settings: ZooSettings,
    test_per_class: int = 1000,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Link the unused REAL files and as many FAKE ones into ``out/rest/{train,test}/{FAKE,REAL}``
    (the first ``test_per_class`` of each class to test/); None, with a line said, when the real
    folder has no FAKE sibling or too few files are left. Up to date when its settings match."""
    real_dir = Path(settings.real_dir)
    fake_dir = real_dir.parent / "FAKE"
    real, fake = unused_real(files, settings), image_files(fake_dir) if fake_dir.is_dir() else []
    folder = Path(out) / REST
    if not fake:
        log(f"zoo: {REST}: no {display(fake_dir)} beside the real folder, skipped")
        return None
    n = min(len(real), len(fake))
    if n <= test_per_class:
        log(
            f"zoo: {REST}: skipped: {display(real_dir)} leaves {len(real)} real images unused by "
            f"the zoo and {display(fake_dir)} holds {len(fake)}; more than "
            f"--rest-test-per-class {test_per_class} of each are needed"
        )
        return None
    wanted = {
        "real_dir": str(real_dir.absolute()),
        "first_real": real[0].name,
        "per_class": n,
        "test_per_class": test_per_class,
        "version": REST_VERSION,
    }
    info = read_member(folder)
    if info is not None and info.get("settings") == wanted:
        log(f"zoo: {REST}: up to date ({display(folder / MEMBER_FILE)}), skipped")
        return info
    info = _link_rest(folder, real[:n], fake[:n], test_per_class, wanted)
    log(
        f"zoo: {REST}: {n - test_per_class} + {test_per_class} images per class linked in "
        f"{display(folder)} (real files from {real[0].name})"
    )
    return info
