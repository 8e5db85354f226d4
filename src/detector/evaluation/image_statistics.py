"""Statistics of an image's pixels, for the out-of-domain model (:mod:`detector.evaluation.ood`):
what noise, flat colours and other sources of photographs differ in before any network looks.

Computed at the model's input size on whole batches, a few milliseconds for 64 images at 32 px.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def pixel_statistics(images: torch.Tensor) -> torch.Tensor:
    """(N, 13) statistics of an RGB batch at the model's input size (uint8, or float in
    [0, 1]): log of the channel means and spreads and of the mean step between neighbouring
    pixels, and (as atanh) the correlation of neighbouring pixels and of the colour channels."""
    x = images.float() * (255.0 if images.is_floating_point() else 1.0)
    grey = x.mean(1)
    steps = [(grey[:, :, 1:] - grey[:, :, :-1]).abs(), (grey[:, 1:] - grey[:, :-1]).abs()]
    levels = [*x.mean((2, 3)).T, *x.std((2, 3)).T, *(s.mean((1, 2)) for s in steps)]
    pairs = [(x[:, 0], x[:, 1]), (x[:, 1], x[:, 2]), (x[:, 0], x[:, 2])]
    pairs += [(grey[:, :, 1:], grey[:, :, :-1]), (grey[:, 1:], grey[:, :-1])]
    corr = torch.stack([_correlation(a, b) for a, b in pairs], 1)
    return torch.cat(
        [torch.log1p(torch.stack(levels, 1)), torch.atanh(corr.clamp(-0.999, 0.999))], 1
    )


# radial frequency bands of the spectrum (cycles per pixel; the corner is at 0.71)
BANDS = ((0.0, 0.1), (0.1, 0.2), (0.2, 0.35), (0.35, 0.8))
LAPLACIAN = torch.tensor([[[[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]]])


def image_statistics(images: torch.Tensor) -> torch.Tensor:
    """(N, 24) statistics of an RGB batch at the model's input size (uint8, or float in
    [0, 1]): :func:`pixel_statistics`, the log of the Laplacian's energy at full and half
    resolution and of their ratio (how detail falls off with scale tells how a photograph was
    resized), the colourfulness (mean and spread of max - min over the channels), the share of
    clipped dark and bright pixels, and the log energy of the spectrum in four radial bands.
    (Edge-strength quantiles and the statistics of a 2x pooled copy were measured too: they
    added nothing and cost a tenth of a 32 px forward pass; docs/ood.md.)"""
    x = images.float() if images.is_floating_point() else images.float() / 255.0
    grey = x.mean(1, keepdim=True)
    laplacian = LAPLACIAN.to(x.device)
    fine = F.conv2d(grey, laplacian).abs().mean((1, 2, 3)) + 1e-4
    coarse = F.conv2d(F.avg_pool2d(grey, 2), laplacian).abs().mean((1, 2, 3)) + 1e-4
    spread = x.amax(1) - x.amin(1)
    colour = [spread.mean((1, 2)), spread.std((1, 2))]
    clipped = [(grey < 0.03).float().mean((1, 2, 3)), (grey > 0.97).float().mean((1, 2, 3))]
    return torch.cat(
        [
            pixel_statistics(x),
            torch.stack([fine.log(), coarse.log(), (fine / coarse).log()], 1),
            torch.stack([*colour, *clipped], 1),
            _band_energies(grey[:, 0]),
        ],
        1,
    )


def _band_energies(grey: torch.Tensor) -> torch.Tensor:
    """(N, len(BANDS)): log of the mean power of the (mean-free) image in each radial band."""
    power = torch.fft.fft2(grey - grey.mean((1, 2), keepdim=True)).abs().pow(2)
    fy, fx = (torch.fft.fftfreq(n, device=grey.device).abs() for n in grey.shape[1:])
    radius = (fy[:, None] ** 2 + fx[None] ** 2).sqrt()
    out = []
    for low, high in BANDS:
        inside = (radius >= low) & (radius < high)
        out.append(power[:, inside].sum(1) / max(int(inside.sum()), 1))
    return torch.log(torch.stack(out, 1) + 1e-6)


def _correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image; 0 where either is flat (no correlation to speak of)."""
    a = a - a.mean((1, 2), keepdim=True)
    b = b - b.mean((1, 2), keepdim=True)
    spread = a.pow(2).mean((1, 2)).sqrt() * b.pow(2).mean((1, 2)).sqrt()
    return (a * b).mean((1, 2)) / (spread + 1e-3)
