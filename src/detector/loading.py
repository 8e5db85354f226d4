"""Batched loading: one call per batch instead of one per image, and a faster JPEG decoder.

For small images the per-image overhead dominates: on CIFAKE (32x32 JPEGs) the PIL path spends
about 250 us per image, of which decoding is a third. Here a loader worker fetches a whole batch
in one ``__getitems__`` call, decodes plain JPEGs with torchvision's libjpeg-turbo decoder
straight from the file's bytes, writes them into one batch tensor (in shared memory inside a
worker) and flips the batch at once.

Same pixels as the PIL path, always: the fast decoder takes only baseline/progressive RGB or
greyscale JPEGs without EXIF (no orientation to apply) that need no resize; everything else
(PNG, CMYK, EXIF, other sizes, augmentation, any error) goes through
:meth:`detector.data.ImageDataset.__getitem__`. The first fast decode in every process is also
decoded by PIL and compared; on any difference the process falls back to PIL for good.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate, get_worker_info

from detector.data import ImageDataset, pil_to_input

log = logging.getLogger(__name__)

# Start-of-frame markers (every JPEG coding process except the DHT/JPG/DAC markers in the range).
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# None: not checked yet in this process; then True/False for the rest of the process.
_FAST_DECODE_OK: bool | None = None

try:  # libjpeg-turbo through torchvision (deprecated there in favour of torchcodec, still there)
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as _decode_jpeg

    _RGB = ImageReadMode.RGB
    warnings.filterwarnings(
        "ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning
    )
except ImportError:  # a torchvision without it: PIL decodes everything
    _decode_jpeg = None


def jpeg_header(data: bytes | bytearray) -> tuple[int, int, int, bool] | None:
    """(height, width, components, has_exif) from a JPEG's markers, or None when ``data`` is not
    a JPEG this parser understands. Reads only the segment headers before the frame."""
    buf = data
    n = len(buf)
    if n < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        return None
    i, exif = 2, False
    while i + 4 <= n:
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        length = (buf[i + 2] << 8) | buf[i + 3]
        if marker == 0xE1 and bytes(buf[i + 4 : i + 10]) == b"Exif\x00\x00":
            exif = True
        if marker in _SOF:
            if i + 9 >= n:
                return None
            height = (buf[i + 5] << 8) | buf[i + 6]
            width = (buf[i + 7] << 8) | buf[i + 8]
            return height, width, buf[i + 9], exif
        if marker in (0xDA, 0xD9) or length < 2:  # scan or end before any frame: malformed
            return None
        i += 2 + length
    return None


def fast_decode(path: str, size: int, max_pixels: int) -> torch.Tensor | None:
    """uint8 (3, size, size) for a plain JPEG already ``size`` x ``size``; None when the file
    needs the PIL path (other format, EXIF, CMYK, other size, too many pixels, or an error)."""
    global _FAST_DECODE_OK
    if _FAST_DECODE_OK is False:
        return None
    if _decode_jpeg is None:
        return None
    try:
        with open(path, "rb", buffering=0) as f:
            data = bytearray(os.fstat(f.fileno()).st_size)
            if f.readinto(data) != len(data):
                return None  # changed while reading: the PIL path reports it
    except OSError:
        return None
    header = jpeg_header(data)
    if header is None:
        return None
    height, width, components, exif = header
    if exif or components not in (1, 3) or (height, width) != (size, size):
        return None
    if max_pixels and height * width > max_pixels:
        return None
    try:
        image = _decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=_RGB)
    except RuntimeError:
        return None
    if _FAST_DECODE_OK is None:
        _FAST_DECODE_OK = _same_as_pil(data, image, size, path)
        if not _FAST_DECODE_OK:
            return None
    return image


def _same_as_pil(data: bytearray, image: torch.Tensor, size: int, path: str) -> bool:
    try:
        with Image.open(io.BytesIO(bytes(data))) as img:
            reference = pil_to_input(img, size)
    except Exception:  # PIL cannot read what libjpeg-turbo could: trust PIL, as the scan does
        return False
    same = reference.shape == image.shape and torch.equal(reference, image)
    if not same:
        log.warning(
            "torchvision's JPEG decoder and PIL disagree on %s: decoding with PIL only (slower)",
            path,
        )
    return same


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
    """:class:`~detector.data.ImageDataset` that also fetches a whole batch in one call.

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
            image = fast_decode(path, self.image_size, self.max_pixels)
            fast = image is not None
            if not fast:
                image, label = self[i]  # flips, substitutes and warns on its own
            images.append(image)
            labels.append(label)
            flippable.append(fast)
        # Every image is image_size x image_size here (the PIL path resizes the others).
        c, h, w = images[0].shape
        nhwc = new_batch_tensor((len(images), h, w, c))
        torch.stack([x.permute(1, 2, 0) for x in images], out=nhwc)
        batch = nchw_view(nhwc)
        if self.hflip:
            flip_some(batch, torch.tensor(flippable))
        return Batch(batch, torch.tensor(labels, dtype=torch.long))


def make_dataset(
    samples: Sequence[tuple[str, int]],
    size: int,
    *,
    hflip: bool = False,
    transform=None,
    max_pixels: int,
    cache: bool = False,
    cache_dir: str | os.PathLike | None = None,
    folder: str | os.PathLike | None = None,
) -> ImageDataset:
    """The dataset a data module uses for one split: batched, and with ``cache`` read from a
    memory-mapped uint8 array of the decoded images (built on first use)."""
    if cache and transform is not None:
        log.info(
            "data.cache: not for the training split, whose blur/JPEG augmentation "
            "(data.blur_prob, data.jpeg_prob) decodes every image anew"
        )
    elif cache:
        from detector.cache import CachedImageDataset

        return CachedImageDataset(
            samples,
            size,
            hflip=hflip,
            transform=transform,
            max_pixels=max_pixels,
            cache_dir=Path(cache_dir) if cache_dir else None,
            folder=Path(folder) if folder else None,
        )
    return BatchedImageDataset(samples, size, hflip, transform, max_pixels=max_pixels)
