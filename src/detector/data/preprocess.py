"""Resize on the device, in batches: loaders decode images at their own size (``data.decode_size``)
and the model's device brings the whole batch to ``image_size`` in one call.

CIFAKE is 32x32 and the seed trained at 224x224: resizing image by image on the host makes the
loader, the shared-memory queue and (on a GPU) the PCIe copy carry 49x the bytes, and costs a
PIL call per image. One ``interpolate`` per batch on the device costs next to nothing.

The kernel is bilinear with half-pixel centres, antialiased when shrinking: PIL's
``Image.BILINEAR``, which the host path (:func:`detector.data.decode.pil_to_input`) uses.
The two agree within ``PIL_TOLERANCE`` grey levels out of 255 (different rounding); tests check it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Largest difference, in grey levels out of 255, allowed between this path and PIL's per-image
# resize (checked by tests/test_speed_paths.py).
PIL_TOLERANCE = 1.0


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) uint8 in [0, 255] or float in [0, 1] -> the same at ``size`` x ``size``.

    uint8 on the CPU stays uint8 (PyTorch's vectorised uint8 kernel, rounded like PIL; about 12x
    faster than float); on other devices uint8 becomes float in [0, 1] (no uint8 kernel there).
    Either way the model's own conversion and normalisation follow, as on the host path. Returns
    the input untouched when it already has that size.
    """
    if tuple(images.shape[-2:]) == (size, size):
        return images
    shrink = size < images.shape[-2] or size < images.shape[-1]
    if images.dtype == torch.uint8 and images.device.type == "cpu":
        nchw = not images.is_contiguous(memory_format=torch.channels_last)
        x = images.contiguous(memory_format=torch.channels_last)  # the fast kernel's layout
        out = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        return out.contiguous() if nchw else out
    x = images.float()
    if images.dtype == torch.uint8:
        x = x.mul_(1.0 / 255.0)
    return F.interpolate(
        x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink
    )


def prepare_batch(batch, size: int, channels_last: bool = False):
    """``batch`` (images or (images, targets, ...)) with its images at ``size`` and, for
    ``channels_last``, in NHWC memory order (the layout oneDNN and cuDNN convolutions prefer;
    converting the small decoded batch is cheaper than letting the first convolution do it)."""
    if isinstance(batch, torch.Tensor):
        return _prepare(batch, size, channels_last)
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], torch.Tensor):
        images = _prepare(batch[0], size, channels_last)
        rest = list(batch[1:])
        return [images, *rest] if isinstance(batch, list) else (images, *rest)
    return batch


def _prepare(images: torch.Tensor, size: int, channels_last: bool) -> torch.Tensor:
    if images.ndim != 4:
        return images
    # Batched loaders already deliver channels_last (a no-op then).
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return resize_batch(images.contiguous(memory_format=layout), size)
