"""An optional cache of decoded images (``data.cache=true``): one memory-mapped uint8 array.

For small-image sets such as CIFAKE (32x32: 3 KB per image, 300 MB for 100,000) decoding is the
loader's whole cost. The cache decodes every image once, at ``data.decode_size`` (else
``data.image_size``), with exactly the loader's own decoding, into ``images-<key>.npy``; later
epochs and runs read batches by indexing the array. The file is mapped, not loaded: loader
workers, DDP ranks and concurrent runs on one machine share the operating system's page cache,
and a process holds only the pages it touches. The key covers every file's path, size and
modification time, the image size and the pixel limit, so a changed file means a new cache.

It lives in ``data.cache_dir``, else beside the split's folder (``data/cifake/train`` ->
``data/cifake/.detector-cache``), else (read-only data)
``~/.cache/detector/images``. Its size is logged; it is refused when the disk lacks room.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import platform
import shutil
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from detector.data.datasets import (
    Batch,
    BatchedImageDataset,
    ImageDataset,
    flip_some,
    nchw_view,
    new_batch_tensor,
)
from detector.data.decode import (
    fast_decode,
    load_image,
)
from detector.errors import ConfigError, DataError
from detector.files import atomic_write_text, display
from detector.launch_env import cpu_cores

log = logging.getLogger(__name__)

# 2: (N, H, W, 3) rows; 3: large JPEGs decoded at reduced size (draft_jpeg); 4: at most 1/8 of
# the way down to the input size (decode.DRAFT_FACTOR 8)
CACHE_VERSION = 4
FOLDER_NAME = ".detector-cache"
# Space left free on the disk after the cache is written.
DISK_MARGIN = 1 << 30


def _user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "detector" / "images"


def cache_key(samples: Sequence[tuple[str, int]], size: int, max_pixels: int) -> str:
    """Changes when any file, its order, its label, the size or the pixel limit changes."""
    digest = hashlib.sha1(f"v{CACHE_VERSION} {size} {max_pixels}\n".encode())
    for path, label in samples:
        try:
            st = os.stat(path)
            stamp = f"{st.st_size} {st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(os.fsencode(path) + f"\0{label} {stamp}\n".encode())
    return digest.hexdigest()[:20]


def _candidate_dirs(cache_dir: Path | None, folder: Path | None) -> list[Path]:
    if cache_dir is not None:
        return [cache_dir]
    # Beside the split's folder, not in it: there it would look like a class folder to other
    # tools (torchvision's ImageFolder, Keras).
    dirs = [folder.parent / FOLDER_NAME] if folder is not None else []
    return [*dirs, _user_cache_dir()]


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder per cache file across processes (DDP ranks, concurrent runs)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _decode(path: str, size: int, max_pixels: int) -> torch.Tensor:
    """Exactly what the uncached loader yields for this file (before any flip)."""
    image = fast_decode(path, size, max_pixels)
    return image if image is not None else load_image(path, size, max_pixels)


def _fill(args: tuple[str, list[str], int, int, int]) -> list[tuple[int, str]]:
    """Decode ``paths`` into rows ``start...`` of the array file; returns the failures."""
    file, paths, start, size, max_pixels = args
    array = np.load(file, mmap_mode="r+")
    failed = []
    for k, path in enumerate(paths):
        try:
            array[start + k] = _decode(path, size, max_pixels).permute(1, 2, 0).numpy()
        except Exception as e:  # any decoder failure is the file's problem
            failed.append((start + k, f"{type(e).__name__}: {str(e).strip()[:200]}"))
    array.flush()
    return failed


def _build(file: Path, paths: list[str], size: int, max_pixels: int, workers: int) -> list[int]:
    """Write the .npy through a temporary name, in parallel; returns the rows that failed."""
    start = time.perf_counter()
    tmp = file.with_name(f".{file.name}.{platform.node()}.{os.getpid()}.tmp")
    np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
    chunk = max(256, min(4096, len(paths) // (workers * 8) or 1))
    jobs = [
        (str(tmp), paths[i : i + chunk], i, size, max_pixels) for i in range(0, len(paths), chunk)
    ]
    try:
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(workers, multiprocessing.get_context("fork")) as pool:
                results = list(pool.map(_fill, jobs))
        else:
            results = [_fill(job) for job in jobs]
        os.replace(tmp, file)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    failed = [f for part in results for f in part]
    for row, reason in failed[:5]:
        log.warning(
            "image cache: cannot decode %s (%s); another image stands in", paths[row], reason
        )
    log.info(
        "image cache: decoded %d images into %s in %.1f s",
        len(paths),
        display(file),
        time.perf_counter() - start,
    )
    return [row for row, _ in failed]


def open_cache(
    samples: Sequence[tuple[str, int]],
    size: int,
    max_pixels: int,
    cache_dir: Path | None = None,
    folder: Path | None = None,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, size, size, 3) uint8, memory-mapped read-only; rows that failed to decode),
    building the cache file first if it does not exist yet."""
    if not samples:
        raise DataError("data.cache=true: no images to cache")
    key = cache_key(samples, size, max_pixels)
    nbytes = len(samples) * 3 * size * size
    for candidate in _candidate_dirs(cache_dir, folder):
        if (candidate / f"images-{key}.npy").is_file():
            directory = candidate
            break
    else:
        writable = [d for d in _candidate_dirs(cache_dir, folder) if _writable(d)]
        if not writable:
            where = cache_dir or _user_cache_dir()
            raise ConfigError(f"data.cache_dir={where} cannot be created or written to")
        directory = writable[0]
    file = directory / f"images-{key}.npy"
    meta = directory / f"images-{key}.json"
    with _locked(directory / f"images-{key}.lock"):
        if not file.is_file():
            free = shutil.disk_usage(directory).free
            if nbytes + DISK_MARGIN > free:
                raise DataError(
                    f"data.cache=true needs {nbytes / 2**30:.1f} GB in {display(directory)} but "
                    f"only {free / 2**30:.1f} GB are free: set data.cache_dir to a larger disk, "
                    "a smaller data.decode_size, or data.cache=false"
                )
            log.info(
                "image cache: building %s (%d images at %dx%d, %.0f MB); later runs reuse it",
                display(file),
                len(samples),
                size,
                size,
                nbytes / 2**20,
            )
            bad = _build(file, [p for p, _ in samples], size, max_pixels, workers or cpu_cores())
            atomic_write_text(meta, json.dumps({"version": CACHE_VERSION, "bad_rows": bad}))
    images = np.load(file, mmap_mode="r")
    if images.shape != (len(samples), size, size, 3) or images.dtype != np.uint8:
        raise DataError(
            f"image cache {display(file)} has shape {images.shape}, expected "
            f"{(len(samples), size, size, 3)}: delete it and run again"
        )
    try:
        bad_rows = json.loads(meta.read_text())["bad_rows"]
    except (OSError, ValueError, KeyError):
        bad_rows = []
    log.info("image cache: %s, %.0f MB, memory-mapped", display(file), nbytes / 2**20)
    return images, np.asarray(bad_rows, dtype=np.int64)


def substitutes(n: int, bad_rows: np.ndarray) -> np.ndarray:
    """Row to read for each index: itself, or the next good row (cyclically) when it is bad,
    as the uncached loader substitutes the next readable file."""
    rows = np.arange(n, dtype=np.int64)
    if len(bad_rows) == 0:
        return rows
    good = np.ones(n, dtype=bool)
    good[bad_rows] = False
    good_rows = np.flatnonzero(good)
    if len(good_rows) == 0:
        raise DataError("data.cache=true: none of the images could be decoded")
    nxt = np.searchsorted(good_rows, rows)
    return good_rows[nxt % len(good_rows)]


class CachedImageDataset(BatchedImageDataset):
    """Batches by indexing the memory-mapped cache; the same pixels as the uncached loader.

    Augmentation that acts on PIL images (blur, JPEG) would have to decode again: refused.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        size: int,
        hflip: bool = False,
        transform=None,
        max_pixels: int = 0,
        cache_dir: Path | None = None,
        folder: Path | None = None,
    ) -> None:
        if transform is not None:
            raise ConfigError(
                "data.cache=true stores decoded images, so blur/JPEG augmentation "
                "(data.blur_prob, data.jpeg_prob) cannot run on them: set one of them off"
            )
        super().__init__(samples, size, hflip, None, max_pixels=max_pixels)
        self.images, bad_rows = open_cache(self.samples, size, max_pixels, cache_dir, folder)
        self.rows = substitutes(len(self.samples), bad_rows)
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = int(self.rows[i])
        image = torch.from_numpy(np.array(self.images[row])).permute(2, 0, 1)
        if self.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, int(self.labels[row])

    def __getitems__(self, indices: Sequence[int]):
        rows = self.rows[np.asarray(indices, dtype=np.int64)]
        nhwc = new_batch_tensor((len(rows), *self.images.shape[1:]))
        np.take(self.images, rows, axis=0, out=nhwc.numpy())
        batch = nchw_view(nhwc)
        if self.hflip:
            flip_some(batch)
        return Batch(batch, self.labels[torch.from_numpy(rows)])

    def __getstate__(self) -> dict:
        # Spawned workers and pickled datasets re-open the map instead of copying the array.
        state = self.__dict__.copy()
        state["images"] = self.images.filename
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.images = np.load(state["images"], mmap_mode="r")


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
