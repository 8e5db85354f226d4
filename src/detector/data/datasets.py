"""Datasets and samplers: one image per item, or a whole batch per call.

:class:`ImageDataset` decodes one image at a time (the reference path, and the one for
augmentation, PNGs and everything the fast path declines). :class:`BatchedImageDataset` lets a
loader worker fetch a whole batch in one ``__getitems__`` call: for small images the per-image
overhead dominates, so plain JPEGs are decoded straight from their bytes
(:func:`detector.data.decode.fast_decode`), written into one batch tensor (in shared memory
inside a worker) and flipped at once, with the same pixels as :class:`ImageDataset`.
:class:`ShardSampler` cuts validation and test sets into contiguous shards for DDP without
padding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import (
    Dataset,
    Sampler,
    default_collate,
    get_worker_info,
)
from torchvision.transforms.v2.functional import pil_to_tensor

from detector.data.decode import (
    DEFAULT_MAX_PIXELS,
    fast_decode,
    load_image,
    open_image,
    pil_to_input,
    to_rgb,
)
from detector.data.tiles import cut_tiles, random_crop
from detector.errors import DataError
from detector.files import describe_error, display

log = logging.getLogger(__name__)


# A loader tries this many following samples before it gives up on a run of unreadable files.
MAX_SUBSTITUTES = 16


class ShardSampler(Sampler[int]):
    """Rank ``rank`` of ``num_replicas`` reads one contiguous slice; slice sizes differ by at
    most one. Unlike ``DistributedSampler`` nothing is padded or repeated, so validation and test
    metrics count every image exactly once, and the ranks' outputs concatenated in rank order are
    the dataset's order."""

    def __init__(self, length: int, num_replicas: int, rank: int) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        base, extra = divmod(length, num_replicas)
        self.start = rank * base + min(rank, extra)
        self.stop = self.start + base + (1 if rank < extra else 0)

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class ImageDataset(Dataset):
    """Images as uint8 (3, ``size``, ``size``): ``size`` is what the loader decodes at
    (``data.decode_size``, default ``data.image_size``). ``transform`` (PIL -> PIL, e.g.
    :mod:`detector.data.augment`) acts on the decoded image before the resize to ``size``,
    where real-world blur and re-compression happen."""

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        size: int,
        hflip: bool = False,
        transform: Callable[[Image.Image], Image.Image] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        jpeg_draft: bool = True,
    ):
        self.samples = list(samples)
        self.size = size
        self.hflip = hflip
        self.transform = transform
        self.max_pixels = max_pixels
        # predict's rule (Preprocessing.jpeg_draft): large JPEGs decoded at reduced size before
        # the resize, so eval's numbers equal predict's. Augmented training (transform) decodes
        # at full size: blur and re-compression act at the file's own resolution.
        self.jpeg_draft = jpeg_draft
        self._failed: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, path: str) -> torch.Tensor:
        if self.transform is None:
            return load_image(path, self.size, self.max_pixels, self.jpeg_draft)
        with open_image(path, self.max_pixels) as img:
            return pil_to_input(self.transform(to_rgb(img)), self.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        # A file that went bad after the scan (deleted, replaced, truncated by a copy) is
        # skipped with a warning and the next sample takes its place: the run goes on.
        last_error = None
        for k in range(min(MAX_SUBSTITUTES, len(self.samples))):
            path, label = self.samples[(i + k) % len(self.samples)]
            try:
                image = self._read(path)
            except Exception as e:  # any decoder failure is the file's problem
                last_error = e
                if path not in self._failed:
                    self._failed.add(path)
                    log.warning(
                        "skipping %s: it changed after the scan and cannot be read now (%s)",
                        display(path),
                        describe_error(e),
                    )
                continue
            if self.hflip and torch.rand(()) < 0.5:
                image = image.flip(-1)
            return image, label
        raise DataError(
            f"{min(MAX_SUBSTITUTES, len(self.samples))} files in a row from "
            f"{display(self.samples[i][0])} on cannot be read (last: {last_error}); "
            "did the data folder move or get deleted?"
        )


class Batch(list):
    """A batch fetched in one call: a list of (image, label) samples as any collate function
    expects, and the stacked tensors that :func:`collate` hands on without copying."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        super().__init__(zip(images.unbind(0), labels.tolist(), strict=True))
        self.images = images
        self.labels = labels


def collate(batch):
    """``collate_fn`` for batched datasets; falls back to ``default_collate`` for lists."""
    if isinstance(batch, Batch):
        return [batch.images, batch.labels]
    return default_collate(batch)


def new_batch_tensor(shape: Sequence[int]) -> torch.Tensor:
    """uint8 tensor; in a loader worker it lives in shared memory, so sending the batch to the
    main process copies nothing (what ``default_collate`` does for its own stacks)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    numel = int(np.prod(shape))
    storage = torch.UntypedStorage._new_shared(numel)
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(*shape)


def nchw_view(nhwc: torch.Tensor) -> torch.Tensor:
    """An (N, H, W, C) batch seen as (N, C, H, W) in channels_last memory order: the layout the
    model's convolutions want, made here in the worker rather than by a copy in the main
    process (where it would compete with the model for the cores)."""
    return nhwc.permute(0, 3, 1, 2)


def flip_some(images: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Mirror each image with probability 1/2 (``allowed``: a mask of those that may be)."""
    flip = (torch.rand(images.shape[0]) < 0.5).numpy()
    if allowed is not None:
        flip &= allowed.numpy()
    if flip.any():
        # numpy, single-threaded: a torch index_put here would wake the intra-op thread pool,
        # which on a busy few-core machine costs more than the copy itself.
        array = images.numpy()
        array[flip] = array[flip][..., ::-1]
    return images


class BatchedImageDataset(ImageDataset):
    """:class:`~detector.data.datasets.ImageDataset` that also fetches a whole batch in one call.

    ``__getitem__`` is unchanged (PIL), so single images, augmentation and bad-file substitution
    behave as before; ``__getitems__`` only adds the fast path for plain JPEGs.
    """

    collate_fn = staticmethod(collate)

    def __getitems__(self, indices: Sequence[int]):
        if self.transform is not None or not indices:  # augmentation acts on PIL images
            return [self[i] for i in indices]
        images, labels, flippable = [], [], []
        for i in indices:
            path, label = self.samples[i]
            image = fast_decode(path, self.size, self.max_pixels)
            fast = image is not None
            if not fast:
                image, label = self[i]  # flips, substitutes and warns on its own
            images.append(image)
            labels.append(label)
            flippable.append(fast)
        # Every image is size x size here (the PIL path resizes the others).
        c, h, w = images[0].shape
        nhwc = new_batch_tensor((len(images), h, w, c))
        torch.stack([x.permute(1, 2, 0) for x in images], out=nhwc)
        batch = nchw_view(nhwc)
        if self.hflip:
            flip_some(batch, torch.tensor(flippable))
        return Batch(batch, torch.tensor(labels, dtype=torch.long))


def collate_tiles(items: Sequence[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
    """Images as their tiles, one after another: [tiles (T, 3, S, S), labels (N,), counts (N,)]."""
    tiles = [x for x, _ in items]
    labels = torch.tensor([y for _, y in items], dtype=torch.long)
    return [torch.cat(tiles), labels, torch.tensor([len(x) for x in tiles], dtype=torch.long)]


class CropDataset(ImageDataset):
    """A ``crop`` model's images (``data.input=crop``), never resized.

    Training (``train=True``): one random ``size`` x ``size`` crop of each image, mirrored
    with ``hflip``; augmentation (``transform``) acts on the whole image first. Otherwise each
    item is all of the image's tiles (:func:`detector.data.tiles.cut_tiles`), batched by
    :func:`collate_tiles`: what eval, predict and the API score.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        size: int,
        *,
        train: bool,
        max_tiles: int,
        hflip: bool = False,
        transform: Callable[[Image.Image], Image.Image] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(samples, size, hflip, transform, max_pixels)
        self.train = train
        self.max_tiles = max_tiles
        self.collate_fn = default_collate if train else collate_tiles

    def _read(self, path: str) -> torch.Tensor:
        with open_image(path, self.max_pixels) as img:
            img = to_rgb(img)
            image = pil_to_tensor(self.transform(img) if self.transform else img)
        if self.train:
            return random_crop(image, self.size).contiguous()
        return cut_tiles(image, self.size, self.max_tiles)
