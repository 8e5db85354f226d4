"""Reading one image file into pixels, the one place that decides what a readable image is.

The start-up scan (:mod:`detector.data.scan`), the loaders, eval, predict and the API all decode
through here. PIL opens and checks the file (format allow-list, pixel limit, EXIF orientation,
16-bit and palette modes to RGB); plain JPEGs may take torchvision's libjpeg-turbo path, which
gives the same pixels (checked once per process against PIL)."""

from __future__ import annotations

import errno
import io
import logging
import os
import warnings
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as F

from detector.errors import DataError
from detector.files import display, first_line

try:  # libjpeg-turbo through torchvision (deprecated there in favour of torchcodec, still there)
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as _decode_jpeg

    _RGB = ImageReadMode.RGB
    warnings.filterwarnings(
        "ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning
    )
except ImportError:  # a torchvision without it: PIL decodes everything
    _decode_jpeg = None

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")

log = logging.getLogger(__name__)


# What PIL may detect inside a file with one of those extensions. Anything else (EPS would call
# Ghostscript, ICO, PSD, ...) is refused even if PIL has a plugin for it.
IMAGE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "DIB", "WEBP", "TIFF", "GIF"})


DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS)


DEFAULT_MIN_SIZE = 8


EXIF_ORIENTATION = 0x0112


def pixel_limit_reason(
    width: int, height: int, max_pixels: int, setting: str = "data.max_pixels"
) -> str | None:
    """Why an image of this size is refused, judged from its header alone; ``setting`` is the
    name of the limit on the command that reads the image."""
    if max_pixels and width * height > max_pixels:
        return (
            f"{width}x{height} = {width * height:,} pixels is over {setting}={max_pixels:,}; "
            "refused without decoding (a decompression bomb?)"
        )
    return None


def open_image(
    path: str | os.PathLike,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fp: IO[bytes] | None = None,
    setting: str = "data.max_pixels",
) -> Image.Image:
    """``Image.open`` that refuses decompression bombs from the header alone, before any decoding.

    PIL only errors above twice its own limit and merely warns between once and twice; here
    anything over ``max_pixels`` is refused. ``fp``: an already open file of ``path``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp if fp is not None else path)
        except Image.DecompressionBombError as e:
            raise DataError(f"{display(path)}: refused without decoding ({e})") from None
    reason = pixel_limit_reason(*img.size, max_pixels, setting)
    if reason:
        img.close()
        raise DataError(f"{display(path)}: {reason}")
    return img


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """PIL's own convert clips 16/32-bit grey at 255 (an almost white picture); scale instead."""
    arr = np.asarray(img)
    if img.mode == "F":
        hi = float(arr.max()) if arr.size else 1.0
        scale = 255.0 if hi <= 1.0 else 1.0
        arr8 = np.clip(arr * scale, 0, 255)
    else:
        arr8 = np.clip(arr.astype(np.int64) >> 8 if arr.max(initial=0) > 255 else arr, 0, 255)
    return Image.fromarray(arr8.astype(np.uint8), "L")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """8-bit RGB as a viewer shows it: EXIF orientation applied, 16-bit scaled rather than clipped,
    transparency composited over white, CMYK/palette/greyscale converted."""
    if img.getexif().get(EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies even when upright
        img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = _sixteen_bit_to_l(img)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode in ("P", "L", "RGB") and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(
    path: str, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS, draft: bool = True
) -> torch.Tensor:
    """RGB uint8 tensor (3, S, S); bilinear resize only when the file is not already S x S.

    Images over ``max_pixels`` are refused from their header (DataError), before decoding.
    ``draft``: see :func:`draft_jpeg`.
    """
    with open_image(path, max_pixels) as img:
        return pil_to_input(img, image_size, draft)


# A JPEG is decoded at reduced size only when at least this many times the target size is left
# on each side, so that the exact bilinear resize after it still averages DRAFT_FACTOR^2 decoded
# pixels per output pixel. Measured with a ResNet50 trained on CIFAKE (docs/speed.md): 4 moved
# probabilities by up to 0.029, over the 0.02 tolerance; 8 by at most 0.009.
DRAFT_FACTOR = 8


def draft_jpeg(img: Image.Image, image_size: int) -> int:
    """Let libjpeg decode an opened, not yet loaded JPEG at 1/2, 1/4 or 1/8 scale (its DCT
    scaling, ``Image.draft``) when it is much larger than ``image_size``; returns the scale.

    A 1024x1536 photograph resized to 32 px is then decoded at 256x384: most of the decoding
    cost of pixels the resize would throw away is not paid. Only for images that are resized
    anyway (``resize`` models); a ``crop`` model's tiles are native pixels and never take this.
    The target is square, so the scale is the same before and after EXIF orientation, which
    :func:`to_rgb` applies to the reduced image."""
    if img.format not in ("JPEG", "MPO") or not getattr(img, "tile", None):
        return 1  # not a JPEG, or already decoded (a PIL image the caller loaded)
    target = DRAFT_FACTOR * image_size
    if min(img.size) < 2 * target:
        return 1
    done = img.draft(None, (target, target))
    return round(img.decoderconfig[0]) if done else 1


def pil_to_input(img: Image.Image, image_size: int, draft: bool = True) -> torch.Tensor:
    """The one decoding step after opening a file, shared by training, eval and predict.

    EXIF orientation is applied and every mode (16-bit, CMYK, palette, alpha) becomes 8-bit RGB
    as a viewer shows it: see :func:`to_rgb`. ``draft``: a much larger JPEG is decoded at
    reduced size first (:func:`draft_jpeg`).
    """
    if draft:
        draft_jpeg(img, image_size)
    img = to_rgb(img)
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
    return F.pil_to_tensor(img)


# Start-of-frame markers (every JPEG coding process except the DHT/JPG/DAC markers in the range).
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


# None: not checked yet in this process; then True/False for the rest of the process.
_FAST_DECODE_OK: bool | None = None


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


def reason_from_exception(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno == errno.ELOOP:
        return "symlink loop (Too many levels of symbolic links)"
    if isinstance(e, PermissionError):
        return f"cannot read it ({e.strerror or 'permission denied'})"
    if isinstance(e, FileNotFoundError):
        return "missing (deleted, or a broken symlink)"
    text = first_line(e)
    if "truncated" in text.lower():
        return f"truncated file ({text})"
    return f"cannot decode it ({type(e).__name__}: {text})"
