"""Image folders -> batches: class discovery, the seeded train/val split, decoding and loaders.

Batches hold uint8 images at ``image_size``; the model converts and normalises them, so the
host moves a quarter of the bytes of float32 and every caller shares one preprocessing path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as F

from detector.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def find_classes(folder: str | Path) -> list[str]:
    """Class names are the sorted sub-folder names, so CIFAKE gives FAKE=0, REAL=1 as the seed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist or is not a folder")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) != 2:
        raise DataError(
            f"{folder} must hold exactly two class folders (e.g. FAKE and REAL), found "
            f"{len(classes)}: {classes}"
        )
    return classes


def list_images(folder: str | Path, classes: Sequence[str]) -> list[tuple[str, int]]:
    """(path, class index) for every image below each class folder, in a stable sorted order."""
    samples: list[tuple[str, int]] = []
    for index, name in enumerate(classes):
        class_dir = Path(folder) / name
        found = []
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for f in filenames:
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(os.path.join(dirpath, f))
        if not found:
            raise DataError(
                f"class folder {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        samples.extend((p, index) for p in sorted(found))
    return samples


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded permutation: the same files land in validation on every run and every rank."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = round(n * val_fraction)
    return sorted(order[n_val:]), sorted(order[:n_val])


def load_image(path: str, image_size: int) -> torch.Tensor:
    """RGB uint8 tensor (3, S, S); bilinear resize only when the file is not already S x S."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.BILINEAR)
        return F.pil_to_tensor(img)


class ImageDataset(Dataset):
    def __init__(self, samples: Sequence[tuple[str, int]], image_size: int, hflip: bool = False):
        self.samples = list(samples)
        self.image_size = image_size
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        image = load_image(path, self.image_size)
        if self.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, label


class ImageFolderDataModule(L.LightningDataModule):
    """``root/train/{A,B}`` split 80/20 into train/val, and ``root/test/{A,B}`` when present.

    ``batch_size`` is the global batch: each of N devices gets ``batch_size / N``.
    """

    def __init__(
        self,
        root: str | None = None,
        train_dir: str | None = None,
        test_dir: str | None = None,
        val_fraction: float = 0.2,
        seed: int = 123,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 2,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        hflip: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("image_size", image_size), ("batch_size", batch_size)):
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"data.{name}={value} must be a positive integer")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers} must be >= 0")
        self.train_dir = Path(train_dir) if train_dir else (Path(root) / "train" if root else None)
        self.root = Path(root) if root else None
        self._test_dir = Path(test_dir) if test_dir else None
        self.val_fraction = val_fraction
        self.seed = seed
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.hflip = hflip
        self.classes: list[str] | None = None
        self.train_set = self.val_set = self.test_set = None

    @property
    def test_dir(self) -> Path | None:
        """``data.test_dir`` if set, else ``root/test`` if it exists (looked up late, because
        ``prepare_data`` may create it)."""
        if self._test_dir is not None:
            return self._test_dir
        if self.root is not None and (self.root / "test").is_dir():
            return self.root / "test"
        return None

    @property
    def has_test(self) -> bool:
        return self.test_dir is not None

    def per_device_batch_size(self) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.batch_size % world:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is the global batch and must be divisible by "
                f"the {world} devices (trainer.devices x trainer.num_nodes)"
            )
        return self.batch_size // world

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", "validate", None) and self.train_set is None:
            if self.train_dir is None:
                raise ConfigError("set data.root (holding train/ and test/) or data.train_dir")
            self.classes = find_classes(self.train_dir)
            samples = list_images(self.train_dir, self.classes)
            train_idx, val_idx = split_indices(len(samples), self.val_fraction, self.seed)
            self.train_set = ImageDataset(
                [samples[i] for i in train_idx], self.image_size, self.hflip
            )
            self.val_set = ImageDataset([samples[i] for i in val_idx], self.image_size)
        if stage in ("test", None) and self.test_set is None and self.test_dir is not None:
            classes = find_classes(self.test_dir)
            if self.classes is not None and classes != self.classes:
                raise DataError(
                    f"test folder {self.test_dir} has classes {classes} but train folder "
                    f"{self.train_dir} has {self.classes}: they must be the same"
                )
            self.classes = classes
            self.test_set = ImageDataset(list_images(self.test_dir, classes), self.image_size)

    def _loader(
        self, dataset: Dataset, shuffle: bool = False, drop_last: bool = False
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.per_device_batch_size(),
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(
            self.train_set, shuffle=True, drop_last=len(self.train_set) > self.batch_size
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            raise DataError("no test folder: set data.root (with a test/ folder) or data.test_dir")
        return self._loader(self.test_set)


class DemoDataModule(ImageFolderDataModule):
    """The embedded demo set: made into ``root`` on first use (once per node, by local rank 0)."""

    def __init__(self, root: str, demo_seed: int = 0, **kwargs) -> None:
        super().__init__(root=root, **kwargs)
        self.demo_seed = demo_seed

    def prepare_data(self) -> None:
        from detector.demo import ensure_demo

        ensure_demo(self.root, seed=self.demo_seed)
