"""Where a crop model's verdict on a large image comes from: the score of every tile.

A crop model scores an image by tiles of its training size at native resolution
(:mod:`detector.data.tiles`) and aggregates their logits. The tiles' own probabilities are the
model's evidence at the scale it was trained on; a Grad-CAM of the whole image squashed to one
tile would show a picture the model never sees. The image's probability is the one predict
writes (same tiles, same aggregation), so the figure and the table never disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from torchvision.transforms.v2 import functional as F  # noqa: E402

from detector.data.decode import open_image, to_rgb  # noqa: E402
from detector.data.tiles import pad_to, tile_origins  # noqa: E402

if TYPE_CHECKING:
    from detector.api import Detector


@dataclass(frozen=True)
class TileMap:
    """Per-tile P(class 1) of one image, ``origins`` as (top, left) in the padded image."""

    image: torch.Tensor  # uint8 (3, H, W), padded to at least one tile
    size: int
    origins: list[tuple[int, int]]
    tile_probability: torch.Tensor  # (T,)
    probability: float  # the image's, as predict gives it


def tile_map(detector: Detector, image: torch.Tensor) -> TileMap:
    """The tile scores of one uint8 (3, H, W) RGB image by a crop model's contract."""
    contract = detector.preprocessing
    if contract.input != "crop":
        raise ValueError("a tile map needs a crop model (data.input=crop)")
    size = contract.image_size
    padded = pad_to(image, size)
    origins = tile_origins(padded.shape[-2], padded.shape[-1], size, contract.max_tiles)
    prepared = contract.prepare_tensor(image)
    tiles = detector.score(prepared.pixels)  # each tile on its own
    whole = detector.score_prepared([prepared])[0]
    return TileMap(padded, size, origins, tiles, float(whole[0]))


def draw_tile_map(result: TileMap, class_names: Sequence[str], title: str) -> plt.Figure:
    """The image with each tile outlined and filled by its P(class 1) (red: class 1)."""
    _, height, width = result.image.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 7 * width / max(height, width)) + 1.2, 7.4))
    ax.imshow(result.image.permute(1, 2, 0).numpy(), extent=(0, width, height, 0))
    cmap = plt.get_cmap("coolwarm")
    for (top, left), p in zip(result.origins, result.tile_probability.tolist(), strict=True):
        ax.add_patch(
            Rectangle((left, top), result.size, result.size, facecolor=cmap(p), alpha=0.45)
        )
        ax.add_patch(
            Rectangle((left, top), result.size, result.size, fill=False, lw=0.6, ec="black")
        )
        if len(result.origins) <= 64:
            ax.text(left + 2, top + 2, f"{p:.2f}", fontsize=6, va="top", color="black")
    mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    bar = fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.02)
    bar.set_label(f"tile P({class_names[1]})")
    ax.set_title(
        f"{title}\n{len(result.origins)} tiles of {result.size} px at native resolution "
        f"(image {width}x{height})",
        fontsize=9,
    )
    ax.axis("off")
    fig.tight_layout()
    return fig


def explain_file(detector: Detector, path: str, png: Path, dpi: int) -> dict:
    """Draw one file's tile map to ``png``; its table row (the lowest and highest tile
    probability say how much the tiles disagree)."""
    with open_image(path, detector.max_pixels, setting="max_pixels") as img:
        image = F.pil_to_tensor(to_rgb(img))
    result = tile_map(detector, image)
    names = detector.class_names
    pred = detector.decide(result.probability, n_tiles=len(result.origins))
    title = f"{png.name}: {pred.label} (P({names[1]})={pred.probability:.3f})"
    fig = draw_tile_map(result, names, title)
    fig.savefig(png, dpi=dpi)
    plt.close(fig)
    tiles = np.asarray(result.tile_probability, dtype=float)
    return {
        "path": path,
        "figure": png.name,
        f"prob_{names[0]}": round(1.0 - pred.probability, 7),
        f"prob_{names[1]}": round(pred.probability, 7),
        "label": pred.label,
        "explained": "tiles",
        "n_tiles": pred.n_tiles,
        "tile_min": round(float(tiles.min()), 7),
        "tile_max": round(float(tiles.max()), 7),
    }
