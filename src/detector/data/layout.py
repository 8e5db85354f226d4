"""Folder mistakes, each named, before any image is opened: what the data module checks first,
so a wrong path stops the run in a second with one line rather than after a scan."""

from __future__ import annotations

from typing import TYPE_CHECKING

from detector.errors import ConfigError, DataError

if TYPE_CHECKING:
    from detector.data.datamodule import ImageFolderDataModule


def check_layout(dm: ImageFolderDataModule, stage: str | None = None) -> list[str]:
    """A missing root, train/ (or a source of ``data.train_dirs``) or test/, a missing or third
    class folder, sources or train and test with different classes (also only in case).
    ``stage="test"`` checks the test folder alone (eval needs no train/). Returns the classes."""
    if dm.makes_root and dm.root is not None and not dm.root.exists():
        return []
    if dm.root is not None and not dm.root.is_dir():
        raise DataError(f"data.root={dm.root} does not exist or is not a folder")
    classes = None
    if stage != "test":
        if dm.train_dir is None:
            raise ConfigError(
                "set data.root (holding train/ and test/), data.train_dir or data.train_dirs"
            )
        for name, folder in dm.train_sources:
            if not folder.is_dir():
                what = "data.train_dir=" if dm.root is None else "no train folder "
                what = f"data.train_dirs.{name}=" if dm.sources else what
                raise DataError(
                    f"{what}{folder} does not exist: the data must be laid out as "
                    "train/<CLASS>/*.jpg (and optionally test/<CLASS>/*.jpg) under data.root"
                )
            found = dm.class_folders(folder).classes
            if classes is not None and found != classes:
                raise DataError(
                    f"training source {folder} has classes {found} but {dm.train_dir} has "
                    f"{classes}: every source must have the same (see data.class_map)"
                )
            classes = found
    if dm._test_dir is not None and not dm._test_dir.is_dir():
        raise DataError(f"data.test_dir={dm._test_dir} does not exist or is not a folder")
    if stage in ("test", None) and dm.test_dir is not None:
        test_classes = dm.class_folders(dm.test_dir).classes
        reference = classes or dm.classes
        if reference and test_classes != reference:
            lower = sorted(c.lower() for c in reference)
            if sorted(c.lower() for c in test_classes) == lower:
                raise DataError(
                    f"class folders differ only in case: test folder {dm.test_dir} has "
                    f"{test_classes} but train folder {dm.train_dir} has {reference}; "
                    "rename them to match exactly (folder names are the labels)"
                )
            raise DataError(
                f"test folder {dm.test_dir} has classes {test_classes} but train folder "
                f"{dm.train_dir} has {reference}: they must be the same"
            )
        classes = classes or test_classes
    return classes or []
