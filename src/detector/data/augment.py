"""Image degradations: random ones for training (CNNDetection, Wang et al. 2020) and fixed ones
for the robustness sweep of ``eval.py robustness=...``.

Both act on the decoded PIL image before it is resized to the network's input size, where a
re-shared or re-compressed picture would carry them, and both treat REAL and FAKE alike.
"""

from __future__ import annotations

import io
import zlib

import numpy as np
import torch
from PIL import Image, ImageFilter

from detector.data.settings import check_probability
from detector.errors import ConfigError

DEGRADATIONS = ("jpeg", "blur", "resize", "noise")


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    """Re-encode as JPEG at ``quality`` (1-100) with Pillow's defaults (4:2:0 chroma)."""
    buffer = io.BytesIO()
    img.convert("RGB").save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as out:
        return out.convert("RGB")


def blur(img: Image.Image, sigma: float) -> Image.Image:
    """Gaussian blur with standard deviation ``sigma`` pixels (Pillow's radius is the sigma)."""
    return img.filter(ImageFilter.GaussianBlur(radius=float(sigma))) if sigma > 0 else img


def resize(img: Image.Image, factor: float) -> Image.Image:
    """Downscale by ``factor`` (bilinear, antialiased) and back up to the original size."""
    w, h = img.size
    small = img.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.BILINEAR)
    return small.resize((w, h), Image.BILINEAR)


def noise(img: Image.Image, sigma: float, seed: int | None = None) -> Image.Image:
    """Additive Gaussian noise, ``sigma`` on the [0, 1] intensity scale, rounded back to 8 bits.

    Without ``seed`` the noise is seeded by the image's own pixels, so the same image gets the
    same noise in every run, worker and order.
    """
    pixels = np.asarray(img.convert("RGB"), dtype=np.float64)
    if seed is None:
        seed = zlib.crc32(pixels.astype(np.uint8).tobytes())
    rng = np.random.default_rng(seed)
    noisy = pixels + rng.normal(0.0, float(sigma) * 255.0, pixels.shape)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


def check_strength(kind: str, strength: float, where: str) -> None:
    """Out-of-range strengths would fail, or mean nothing, deep inside Pillow."""
    ok = {
        "jpeg": lambda s: 1 <= s <= 100,
        "blur": lambda s: s >= 0,
        "resize": lambda s: 0 < s <= 1,
        "noise": lambda s: s >= 0,
    }
    if kind not in ok:
        raise ConfigError(
            f"{where}: unknown degradation {kind!r} (known: {', '.join(DEGRADATIONS)})"
        )
    if not isinstance(strength, int | float) or not ok[kind](strength):
        ranges = {
            "jpeg": "a quality in [1, 100]",
            "blur": "a sigma >= 0",
            "resize": "a factor in (0, 1]",
            "noise": "a sigma >= 0",
        }
        raise ConfigError(f"{where}={strength!r}: {kind} takes {ranges[kind]}")


class Degradation:
    """One fixed degradation, e.g. ``Degradation("jpeg", 75)``: a picklable PIL -> PIL callable
    for :class:`~detector.data.datasets.ImageDataset`."""

    def __init__(self, kind: str, strength: float) -> None:
        check_strength(kind, strength, f"robustness.{kind}")
        self.kind = kind
        self.strength = strength

    def __call__(self, img: Image.Image) -> Image.Image:
        return {"jpeg": jpeg, "blur": blur, "resize": resize, "noise": noise}[self.kind](
            img, self.strength
        )

    def __repr__(self) -> str:
        return f"Degradation({self.kind!r}, {self.strength!r})"


class RandomBlurJPEG:
    """Training augmentation of CNNDetection: with probability ``blur_prob`` a Gaussian blur of
    sigma uniform in ``blur_sigma``, then with probability ``jpeg_prob`` a JPEG re-encoding of
    quality uniform in ``jpeg_quality`` (integers, both ends included).

    Draws come from torch's global generator, which Lightning seeds per dataloader worker.
    """

    def __init__(
        self,
        blur_prob: float = 0.0,
        jpeg_prob: float = 0.0,
        blur_sigma: tuple[float, float] = (0.0, 3.0),
        jpeg_quality: tuple[int, int] = (30, 100),
    ) -> None:
        self.blur_prob = check_probability("data.blur_prob", blur_prob)
        self.jpeg_prob = check_probability("data.jpeg_prob", jpeg_prob)
        self.blur_sigma = tuple(float(s) for s in blur_sigma)
        self.jpeg_quality = tuple(int(q) for q in jpeg_quality)

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.blur_prob and float(torch.rand(())) < self.blur_prob:
            lo, hi = self.blur_sigma
            img = blur(img, lo + (hi - lo) * float(torch.rand(())))
        if self.jpeg_prob and float(torch.rand(())) < self.jpeg_prob:
            lo, hi = self.jpeg_quality
            img = jpeg(img, int(torch.randint(lo, hi + 1, ())))
        return img

    def __repr__(self) -> str:
        return (
            f"RandomBlurJPEG(blur_prob={self.blur_prob}, jpeg_prob={self.jpeg_prob}, "
            f"blur_sigma={self.blur_sigma}, jpeg_quality={self.jpeg_quality})"
        )


def random_shift(images: torch.Tensor, pad: int) -> torch.Tensor:
    """Translate each image of an (N, C, H, W) batch by its own random offset of at most ``pad``
    pixels in each direction, filling the border by reflection (the classic CIFAR pad-and-crop).

    It moves pixels without resampling them, so a generator's pixel-level traces survive, and it
    acts on whole batches on the model's device (``data.shift``), after the loader.
    """
    if pad <= 0:
        return images
    n, _, h, w = images.shape
    if pad >= min(h, w):
        raise ConfigError(f"data.shift={pad} must be smaller than the images ({h}x{w} px)")
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=images.device)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=images.device)
    rows = dy + torch.arange(h, device=images.device).view(1, h, 1)
    cols = dx + torch.arange(w, device=images.device).view(1, 1, w)
    batch = torch.arange(n, device=images.device).view(n, 1, 1)
    shifted = padded.permute(0, 2, 3, 1)[batch, rows, cols]  # (N, H, W, C)
    return shifted.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
