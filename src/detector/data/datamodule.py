"""Image folders -> batches: the Lightning data module (layout checks, the start-up scan, the
seeded train/val split, loaders sharded for DDP).

Batches hold uint8 images at ``decode_size`` (default ``image_size``); the model resizes them
to ``image_size`` on its device when they differ, then converts and normalises them, so the host
moves a quarter of the bytes of float32 and every caller shares one preprocessing path. Split
datasets come from :func:`detector.data.cache.make_dataset` (batched fetching, optional cache).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    Sampler,
)

from detector.data.augment import RandomBlurJPEG, random_shift
from detector.data.cache import make_dataset
from detector.data.contract import check_input
from detector.data.datasets import CropDataset, ShardSampler
from detector.data.decode import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIZE,
    IMAGE_EXTENSIONS,
)
from detector.data.folders import split_indices
from detector.data.layout import check_layout
from detector.data.pseudo_fakes import check_pseudo_fakes, pseudo_fake_batch
from detector.data.scan import (
    ScanResult,
    log_bad_files,
    scan_folder,
    write_report,
)
from detector.data.settings import check_loader_settings
from detector.data.sources import (
    ClassFolders,
    SourceWeightedSampler,
    check_class_map,
    check_source_weights,
    class_folders,
    name_sources,
)
from detector.data.tiles import DEFAULT_MAX_TILES
from detector.errors import ConfigError, DataError
from detector.files import display

log = logging.getLogger(__name__)


class ImageFolderDataModule(L.LightningDataModule):
    """``root/train/{A,B}`` split 80/20 into train/val, and ``root/test/{A,B}`` when present.

    ``batch_size`` is the global batch: each of N devices gets ``batch_size / N``.
    ``train_dirs`` ({name: folder} or a list) trains on several sources, each split with the
    same seed rule; ``class_map`` names the class folders (:mod:`detector.data.sources`).
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
        blur_prob: float = 0.0,
        jpeg_prob: float = 0.0,
        shift: int = 0,
        strict: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_size: int = DEFAULT_MIN_SIZE,
        scan_workers: int | None = None,
        decode_size: int | None = None,
        cache: bool = False,
        cache_dir: str | None = None,
        input: str = "resize",
        max_tiles: int = DEFAULT_MAX_TILES,
        train_dirs=None,
        class_map=None,
        source_weights=None,
        pseudo_fake_prob: float = 0.0,
        pseudo_fake_jpeg: int | None = 75,
    ) -> None:
        """One piece: ``input``: ``resize`` (images to ``image_size``) or ``crop`` (native
        random crops for training, tiles for validation and test: detector.data.contract)."""
        super().__init__()
        check_loader_settings(
            image_size, batch_size, num_workers, max_pixels, min_size, decode_size, shift
        )
        check_input(input, image_size, max_tiles, "mean", "data.")
        if input == "crop" and (cache or decode_size):
            raise ConfigError(
                "data.cache and data.decode_size resize images before the model sees them; "
                "data.input=crop never resizes: drop them (or use data.input=resize)"
            )
        self.input = input
        self.max_tiles = max_tiles
        self.train_dir = Path(train_dir) if train_dir else (Path(root) / "train" if root else None)
        self.root = Path(root) if root else None
        self.class_map = check_class_map(class_map)
        if train_dirs and train_dir:
            raise ConfigError("set data.train_dirs (several sources) or data.train_dir, not both")
        # Several sources: [(name, folder)]; validation then also logs val/<name>/... per source.
        self.sources = name_sources(train_dirs) if train_dirs else []
        self.train_dir = self.sources[0][1] if self.sources else self.train_dir
        if source_weights is not None and not self.sources:
            raise ConfigError("data.source_weights weighs the sources of data.train_dirs: set both")
        self.source_weights = check_source_weights(source_weights, [n for n, _ in self.sources])
        self.train_source_index: list[int] = []  # per training sample (several sources only)
        self.val_sources: torch.Tensor | None = None  # per validation sample, in order
        self._test_dir = Path(test_dir) if test_dir else None
        self.val_fraction = val_fraction
        self.seed = seed
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.hflip = hflip
        # CNNDetection's blur + JPEG augmentation, for training images only.
        augment = RandomBlurJPEG(blur_prob, jpeg_prob)
        self.train_transform = augment if blur_prob or jpeg_prob else None
        self.classes: list[str] | None = None
        self.train_set = self.val_set = self.test_set = None
        self.strict = strict
        self.max_pixels = max_pixels
        self.min_size = min_size
        self.scan_workers = scan_workers
        # Loaders decode at decode_size, the model's device resizes to image_size
        # (detector.data.preprocess); cache: decoded images memory-mapped (detector.data.cache)
        self.decode_size = decode_size or image_size
        self.shift = shift
        check_pseudo_fakes(pseudo_fake_prob, pseudo_fake_jpeg)
        self.pseudo_fake_prob, self.pseudo_fake_jpeg = pseudo_fake_prob, pseudo_fake_jpeg
        self.cache = bool(cache)
        self.cache_dir = cache_dir
        # Where bad_files.json goes: this, else the attached trainer's run folder.
        self.report_dir: Path | None = None
        self.scans: dict[str, ScanResult] = {}
        self._prepared: dict[Path, ScanResult] = {}  # prepare_data's scans, for this process

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

    def per_device_batch_size(self, world: int | None = None) -> int:
        """``world``: the number of processes (default: the attached trainer's)."""
        if world is None:
            world = self.trainer.world_size if self.trainer is not None else 1
        if self.batch_size % world:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is the global batch and must be divisible by "
                f"the {world} devices (trainer.devices x trainer.num_nodes)"
            )
        return self.batch_size // world

    # A subclass that makes ``root`` in prepare_data (the demo) cannot be checked before it.
    makes_root = False

    def check_layout(self, stage: str | None = None) -> list[str]:
        """Folder mistakes, each named, before any image is opened: a missing root, train/ or
        test/, a missing or third class folder, classes that differ between train and test (also
        only in case); the class names. ``stage="test"``: the test folder alone (for eval)."""
        return check_layout(self, stage)

    def _is_global_zero(self) -> bool:
        if self.trainer is not None:
            return bool(self.trainer.is_global_zero)
        return getattr(rank_zero_only, "rank", 0) == 0

    def _scan(self, split: str, folder: Path, classes: list[str]) -> ScanResult:
        """Scan ``folder``, log and report its bad files, and refuse them under data.strict."""
        result = self._prepared.pop(folder, None) or scan_folder(
            folder, classes, self.max_pixels, self.min_size, workers=self.scan_workers
        )
        self.scans[split] = result
        report = None
        out = self.report_dir or (
            Path(self.trainer.default_root_dir) if self.trainer is not None else None
        )
        if self._is_global_zero():
            log.info(
                "%s: %d files, %d bad (%d checked, %d from the scan cache, %.1f s)",
                display(folder),
                result.total,
                len(result.bad),
                result.checked,
                result.cached,
                result.seconds,
            )
            if out is not None and any(r.bad for r in self.scans.values()):
                report = write_report(list(self.scans.values()), Path(out) / "bad_files.json")
            log_bad_files(result, report)
        if result.bad and self.strict:
            first = result.bad[0]
            where = f"; all listed in {display(report)}" if report else ""
            raise DataError(
                f"data.strict=true and {len(result.bad)} bad file(s) in {display(folder)}, e.g. "
                f"{display(first.path)}: {first.reason}{where}. Remove or fix them, or set "
                "data.strict=false to skip them"
            )
        for name in classes:
            if not result.good.get(name):
                bad = sum(1 for b in result.bad if Path(b.path).is_relative_to(folder / name))
                raise DataError(
                    f"class folder {display(folder / name)} has no usable images"
                    + (f": all {bad} files are bad" if bad else "")
                    + f" (readable: {', '.join(IMAGE_EXTENSIONS)})"
                )
        return result

    def prepare_data(self) -> None:
        """Warm the scan cache once per node, so that every rank's ``setup`` only reads it
        (without a trainer, ``setup`` alone scans what it needs)."""
        if self.trainer is None:
            return
        for folder in (*(f for _, f in self.train_sources), self.test_dir):
            if folder is not None and folder.is_dir():
                classes = list(self.class_folders(folder).folders)
                self._prepared[folder] = scan_folder(
                    folder, classes, self.max_pixels, self.min_size, workers=self.scan_workers
                )

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", "validate", None) and self.train_set is None:
            self.check_layout(stage)
            train, val, val_sources = [], [], []
            for k, (name, folder) in enumerate(self.train_sources):
                found = self.class_folders(folder)
                self.classes = found.classes
                split = f"train/{name}" if self.sources else "train"
                samples = found.samples(self._scan(split, folder, list(found.folders)).good)
                train_idx, val_idx = split_indices(len(samples), self.val_fraction, self.seed)
                train += [samples[i] for i in train_idx]
                val += [samples[i] for i in val_idx]
                self.train_source_index += [k] * len(train_idx) if self.sources else []
                val_sources += [k] * len(val_idx)
            self.train_set = self._dataset(
                train, self.train_dir, self.hflip, self.train_transform, train=True
            )
            self.val_set = self._dataset(val, self.train_dir)
            if self.sources:
                self.val_sources = torch.tensor(val_sources, dtype=torch.long)
        if stage in ("test", None) and self.test_set is None and self.test_dir is not None:
            self.check_layout("test")
            found = self.class_folders(self.test_dir)
            self.classes = found.classes
            result = self._scan("test", self.test_dir, list(found.folders))
            self.test_set = self._dataset(found.samples(result.good), self.test_dir)

    @property
    def train_sources(self) -> list[tuple[str, Path]]:
        """[(name, folder)] of the training sources: ``data.train_dirs``, else the one folder."""
        return self.sources or ([("train", self.train_dir)] if self.train_dir else [])

    @property
    def source_names(self) -> list[str]:
        """Names of several training sources (empty for one): val/<name>/... metric tags."""
        return [name for name, _ in self.sources]

    def class_folders(self, folder: Path) -> ClassFolders:
        return class_folders(folder, self.class_map)

    def _dataset(
        self, samples, folder: Path, hflip: bool = False, transform=None, train: bool = False
    ) -> Dataset:
        if self.input == "crop":
            return CropDataset(
                samples,
                self.image_size,
                train=train,
                max_tiles=self.max_tiles,
                hflip=hflip,
                transform=transform,
                max_pixels=self.max_pixels,
            )
        return make_dataset(
            samples,
            self.decode_size,
            hflip=hflip,
            transform=transform,
            max_pixels=self.max_pixels,
            cache=self.cache,
            cache_dir=self.cache_dir,
            folder=folder,
        )

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # On the host, where torchvision's JPEG codec runs: 32 px batches cost milliseconds.
        if self.pseudo_fake_prob and self.trainer is not None and self.trainer.training:
            batch = pseudo_fake_batch(
                batch, self.pseudo_fake_prob, self.classes, self.pseudo_fake_jpeg
            )
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # Batch-wide, on the model's device: cheap whatever the loader path (cache, PIL, fast).
        if self.shift and self.trainer is not None and self.trainer.training:
            images, *rest = batch
            batch = [random_shift(images, self.shift), *rest]
        return batch

    def _world(self) -> tuple[int, int]:
        """(number of ranks, this rank): the loaders shard the data themselves (the trainer runs
        with ``use_distributed_sampler=False``), so that val/test are not padded."""
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def _loader(
        self,
        dataset: Dataset,
        shuffle: bool = False,
        drop_last: bool = False,
        sampler: Sampler | None = None,
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.per_device_batch_size(),
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers,
            collate_fn=getattr(dataset, "collate_fn", None),
        )

    def _eval_loader(self, dataset: Dataset, what: str) -> DataLoader:
        world, rank = self._world()
        if world == 1:
            return self._loader(dataset)
        if 0 < len(dataset) < world:
            # A rank without a batch would skip the end-of-epoch metric sync and hang the others.
            raise DataError(
                f"{what} holds {len(dataset)} images but the run has {world} processes "
                "(trainer.devices x trainer.num_nodes): each needs at least one image"
            )
        return self._loader(dataset, sampler=ShardSampler(len(dataset), world, rank))

    def train_dataloader(self) -> DataLoader:
        # The last incomplete global batch is dropped, as on one device.
        drop_last = len(self.train_set) > self.batch_size
        world, rank = self._world()
        if self.source_weights is not None:  # data.source_weights: each source its share
            sampler = SourceWeightedSampler(
                self.train_source_index, self.source_weights, self.seed, world, rank, drop_last
            )
            return self._loader(self.train_set, drop_last=drop_last, sampler=sampler)
        if world == 1:
            return self._loader(self.train_set, shuffle=True, drop_last=drop_last)
        # Equal shard sizes on every rank (padded when not dropping) keep DDP's gradient syncs
        # in step; Lightning calls set_epoch so every epoch is shuffled anew.
        sampler = DistributedSampler(
            self.train_set, world, rank, shuffle=True, seed=self.seed, drop_last=drop_last
        )
        return self._loader(self.train_set, drop_last=drop_last, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(
            self.val_set, f"the validation split of {self.train_dir} (data.val_fraction)"
        )

    def features_dataloader(self, rows: Sequence[int] | None = None) -> DataLoader:
        """The training split (or its ``rows``) once, in order, without augmentation, sharded like
        validation: what the out-of-domain model and the family expert are fitted on."""
        everything = self.train_set.samples
        samples = everything if rows is None else [everything[i] for i in rows]
        dataset = self._dataset(samples, self.train_dir)
        return self._eval_loader(dataset, f"the training split of {self.train_dir}")

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            raise DataError("no test folder: set data.root (with a test/ folder) or data.test_dir")
        return self._eval_loader(self.test_set, f"test folder {self.test_dir}")
