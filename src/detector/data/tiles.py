"""Native-resolution crops and tiles for ``crop`` models (``data.input=crop``).

A generated image gives itself away in fine pixel statistics, which resizing destroys; a
``crop`` model therefore never resizes. Training takes one random ``size`` x ``size`` crop of each
image; scoring cuts an image into tiles of that size and aggregates their logits into one
probability. Everything here is geometry on uint8 (C, H, W) tensors: tiles are views into the one
decoded image until they are stacked into a batch.

Rules, the same everywhere (training, eval, predict, the API, the service, the export contract):

* an image with a side shorter than ``size`` is first padded to ``size`` on that side by
  mirroring (numpy's ``symmetric`` mode, repeated as often as needed, so even a 1x1 image works);
* the tiles form a grid: every part of the image is covered when ``ceil(H/S) * ceil(W/S)`` tiles
  fit in ``max_tiles`` (the last row and column overlap their neighbours instead of padding);
  otherwise a grid of at most ``max_tiles`` tiles, rows and columns in the image's aspect ratio,
  spread evenly from edge to edge;
* one probability per image from the tiles' logits: their mean (``mean``, the default: every
  tile votes) or their maximum (``max``: one tile that looks like class 1 decides).
"""

from __future__ import annotations

import math

import numpy as np
import torch

INPUTS = ("resize", "crop")
AGGREGATES = ("mean", "max")
# Tiles per image when scoring a crop model; bounds the cost of very large images
# (docs/speed.md: a 1024x1536 JPEG with a 64 px model).
DEFAULT_MAX_TILES = 64


def pad_to(image: torch.Tensor, size: int) -> torch.Tensor:
    """(C, H, W) with both sides >= ``size``, mirrored at the bottom and right edges."""
    _, h, w = image.shape
    if h >= size and w >= size:
        return image
    array = np.pad(
        image.numpy(), ((0, 0), (0, max(0, size - h)), (0, max(0, size - w))), mode="symmetric"
    )
    return torch.from_numpy(array)


def _positions(length: int, size: int, count: int) -> list[int]:
    if count == 1:
        return [(length - size) // 2]
    return [round(i * (length - size) / (count - 1)) for i in range(count)]


def grid_shape(height: int, width: int, size: int, max_tiles: int) -> tuple[int, int]:
    """(rows, columns) of the tile grid for an image of at least ``size`` on both sides."""
    rows, cols = math.ceil(height / size), math.ceil(width / size)
    if rows * cols <= max_tiles:
        return rows, cols

    # Too many to cover: of the grids of at most max_tiles, the one whose largest step between
    # neighbouring tiles is smallest (tiles spread evenly in both directions), then the fuller.
    def key(shape: tuple[int, int]) -> tuple[float, int]:
        r, c = shape
        steps = ((height - size) / max(r - 1, 1), (width - size) / max(c - 1, 1))
        return -max(steps), r * c

    shapes = [(r, min(cols, max_tiles // r)) for r in range(1, min(rows, max_tiles) + 1)]
    return max(shapes, key=key)


def tile_origins(height: int, width: int, size: int, max_tiles: int) -> list[tuple[int, int]]:
    """(top, left) of every tile, row by row, for an image already padded to ``size``."""
    rows, cols = grid_shape(height, width, size, max_tiles)
    return [
        (t, left) for t in _positions(height, size, rows) for left in _positions(width, size, cols)
    ]


def cut_tiles(image: torch.Tensor, size: int, max_tiles: int) -> torch.Tensor:
    """uint8 (T, C, S, S): the tiles of one (C, H, W) image, at its own resolution."""
    image = pad_to(image, size)
    _, h, w = image.shape
    views = [image[:, t : t + size, x : x + size] for t, x in tile_origins(h, w, size, max_tiles)]
    return torch.stack(views)


def random_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """One ``size`` x ``size`` crop at a uniformly random position (``torch``'s generator, so
    loader workers are seeded as Lightning seeds them)."""
    image = pad_to(image, size)
    _, h, w = image.shape
    top = int(torch.randint(0, h - size + 1, ()))
    left = int(torch.randint(0, w - size + 1, ()))
    return image[:, top : top + size, left : left + size]


def segment_index(counts: torch.Tensor) -> torch.Tensor:
    """For each tile, the index of the image it belongs to."""
    return torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)


def segment_mean(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(T, ...) per tile -> (N, ...) per image: the mean over each image's tiles."""
    counts = counts.to(values.device)
    index = segment_index(counts)
    out = torch.zeros((len(counts), *values.shape[1:]), dtype=values.dtype, device=values.device)
    out.index_add_(0, index, values)
    return out / counts.view(-1, *([1] * (values.ndim - 1))).to(values.dtype)


def aggregate_logits(logits: torch.Tensor, counts: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """(T,) tile logits -> (N,) image logits, by ``how`` (``mean`` or ``max``)."""
    if how == "mean":
        return segment_mean(logits, counts)
    if how == "max":
        counts = counts.to(logits.device)
        out = torch.full((len(counts),), -torch.inf, dtype=logits.dtype, device=logits.device)
        return out.scatter_reduce(0, segment_index(counts), logits, reduce="amax")
    raise ValueError(f"aggregate={how!r} must be one of {', '.join(AGGREGATES)}")
