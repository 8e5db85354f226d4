"""The preprocessing contract: how a checkpoint's network saw images, stored in the checkpoint.

Training records it (``data.input``, ``data.image_size``, ``data.max_tiles``,
``model.aggregate``) among the module's hyper-parameters; eval, predict, the ``Detector`` API,
export's JSON, explain and the service read it back with :meth:`Preprocessing.from_hparams`
instead of asking the user to repeat a setting. Two policies:

* ``resize``: the whole image is resized (bilinear) to ``image_size`` x ``image_size``, as the
  seed did. Right for data that is that small anyway (CIFAKE's 32 px);
* ``crop``: never resized; trained on random native-resolution crops, scored by tiles
  (:mod:`detector.data.tiles`) whose logits are aggregated into one probability.

:meth:`Preprocessing.prepare` turns one decoded image into the network's input and says what was
done to it (``n_tiles``; ``resized_from`` when a ``resize`` model squashed a much larger or
non-square image, which loses the fine traces a detector looks for).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from detector.data.decode import DEFAULT_MAX_PIXELS, open_image, pil_to_input, to_rgb
from detector.data.tiles import AGGREGATES, DEFAULT_MAX_TILES, INPUTS, cut_tiles
from detector.errors import ConfigError

# A resize model "squashes" an image whose longer side is more than this many times its training
# size, or whose sides differ by more than ASPECT_TOLERANCE (a 1024x1536 photograph at 32 px).
RESIZE_WARN_FACTOR = 2.0
ASPECT_TOLERANCE = 1.1


@dataclass(frozen=True)
class Prepared:
    """One image ready for the network: ``pixels`` is uint8 (3, S, S) for ``resize`` and
    (n_tiles, 3, S, S) for ``crop``; ``size`` is the decoded image's (width, height)."""

    pixels: torch.Tensor
    n_tiles: int
    size: tuple[int, int]
    resized_from: str | None = None


def check_input(input: str, image_size: int, max_tiles: int, aggregate: str, where: str) -> None:
    """Settings errors named as the user wrote them (``where``: ``data.`` or ``model.``)."""
    if input not in INPUTS:
        raise ConfigError(f"data.input={input!r} must be one of {', '.join(INPUTS)}")
    if isinstance(max_tiles, bool) or not isinstance(max_tiles, int) or max_tiles < 1:
        raise ConfigError(f"{where}max_tiles={max_tiles} must be a positive integer")
    if aggregate not in AGGREGATES:
        raise ConfigError(f"model.aggregate={aggregate!r} must be one of {', '.join(AGGREGATES)}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"data.image_size={image_size} must be a positive integer")


@dataclass(frozen=True)
class Preprocessing:
    input: str = "resize"
    image_size: int = 224
    max_tiles: int = DEFAULT_MAX_TILES
    aggregate: str = "mean"
    # resize models: a JPEG much larger than image_size is decoded at reduced size (libjpeg's
    # DCT scaling) before the exact resize (detector.data.decode.draft_jpeg); False: full size.
    # A scoring choice, not the training's: eval's loaders always take it (docs/speed.md).
    jpeg_draft: bool = True

    def __post_init__(self) -> None:
        check_input(self.input, self.image_size, self.max_tiles, self.aggregate, "")
        if not isinstance(self.jpeg_draft, bool):
            raise ConfigError(f"jpeg_draft={self.jpeg_draft!r} must be true or false")

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any], **overrides: Any) -> Preprocessing:
        """The contract of a module's hyper-parameters; checkpoints from before the contract
        existed resized (their default). ``overrides`` that are None keep the stored value."""
        values = {
            "input": hparams.get("input", "resize"),
            "image_size": int(hparams["image_size"]),
            "max_tiles": int(hparams.get("max_tiles", DEFAULT_MAX_TILES)),
            "aggregate": hparams.get("aggregate", "mean"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        s = self.image_size
        if self.input == "resize":
            return f"resize to {s}x{s}"
        return f"native-resolution {s}x{s} tiles (at most {self.max_tiles}, {self.aggregate} logit)"

    def resized_from(self, width: int, height: int) -> str | None:
        """ "WxH" when a resize model squashes this image a lot, else None."""
        if self.input != "resize":
            return None
        too_big = max(width, height) > RESIZE_WARN_FACTOR * self.image_size
        other_aspect = max(width, height) > ASPECT_TOLERANCE * min(width, height)
        return f"{width}x{height}" if too_big or other_aspect else None

    def prepare_pil(self, img: Image.Image) -> Prepared:
        """The one step from an opened image to the network's input (EXIF, modes: ``to_rgb``)."""
        if self.input == "resize":
            width, height = img.size
            pixels = pil_to_input(img, self.image_size, draft=self.jpeg_draft)
            return Prepared(pixels, 1, (width, height), self.resized_from(width, height))
        return self.prepare_tensor(F.pil_to_tensor(to_rgb(img)))

    def prepare_tensor(self, image: torch.Tensor) -> Prepared:
        """A uint8 (3, H, W) image, already RGB."""
        height, width = int(image.shape[-2]), int(image.shape[-1])
        if self.input == "resize":
            if (height, width) != (self.image_size, self.image_size):
                return self.prepare_pil(F.to_pil_image(image))
            return Prepared(image.contiguous(), 1, (width, height))
        tiles = cut_tiles(image, self.image_size, self.max_tiles)
        return Prepared(tiles, len(tiles), (width, height))

    def prepare_file(
        self, path: str, max_pixels: int = DEFAULT_MAX_PIXELS, setting: str = "max_pixels"
    ) -> Prepared:
        """Images over ``max_pixels`` are refused from their header (DataError naming
        ``setting``, the limit's name on the command that reads the file)."""
        with open_image(path, max_pixels, setting=setting) as img:
            return self.prepare_pil(img)


def resize_summary(sizes: list[tuple[int, int]], total: int, image_size: int) -> str | None:
    """One line for the run's summary when a resize model squashed images, else None."""
    if not sizes:
        return None
    width, height = max(sizes, key=lambda s: s[0] * s[1])
    return (
        f"{len(sizes)} of {total} images were resized from up to {width}x{height} to "
        f"{image_size}x{image_size}; this model was trained on {image_size}x{image_size} images "
        "(a model trained with data.input=crop scores them at their own resolution)"
    )
