"""Statistics of an image's pixels, for the out-of-domain model (:mod:`detector.evaluation.ood`):
what noise, flat colours and other sources of photographs differ in before any network looks.

Computed at the model's input size on whole batches, a few milliseconds for 64 images at 32 px.
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F


def pixel_statistics(images: torch.Tensor) -> torch.Tensor:
    """(N, 13) statistics of an RGB batch at the model's input size (uint8, or float in
    [0, 1]): log of the channel means and spreads and of the mean step between neighbouring
    pixels, and (as atanh) the correlation of neighbouring pixels and of the colour channels."""
    return _pixel_statistics(images.float() * (255.0 if images.is_floating_point() else 1.0))


def _pixel_statistics(x: torch.Tensor) -> torch.Tensor:
    """:func:`pixel_statistics` of a float batch on the 0-255 scale. At 32 px the cost is the
    number of operations, so the spreads and correlations come from three batched covariance
    matrices: of the colour channels, and of each pixel with its right and its lower
    neighbour."""
    channels = x.flatten(2)  # (N, 3, H * W)
    grey = x.mean(1)
    neighbours = [(grey[:, :, 1:], grey[:, :, :-1]), (grey[:, 1:], grey[:, :-1])]
    steps = torch.stack([(a - b).abs().mean((1, 2)) for a, b in neighbours], 1)
    colour = _covariance(channels)
    n = channels.shape[-1]
    spreads = (colour.diagonal(dim1=1, dim2=2) * (n / max(n - 1, 1))).sqrt()  # unbiased
    pairs = [_covariance(torch.stack([a.flatten(1), b.flatten(1)], 1)) for a, b in neighbours]
    corr = torch.stack(
        [_correlation(colour, i, j) for i, j in ((0, 1), (1, 2), (0, 2))]
        + [_correlation(c, 0, 1) for c in pairs],
        1,
    )
    levels = torch.cat([channels.mean(2), spreads, steps], 1)
    return torch.cat([torch.log1p(levels), torch.atanh(corr.clamp(-0.999, 0.999))], 1)


# radial frequency bands of the spectrum (cycles per pixel; the corner is at 0.71)
BANDS = ((0.0, 0.1), (0.1, 0.2), (0.2, 0.35), (0.35, 0.8))


def image_statistics(images: torch.Tensor) -> torch.Tensor:
    """(N, 24) statistics of an RGB batch at the model's input size (uint8, or float in
    [0, 1]): :func:`pixel_statistics`, the log of the Laplacian's energy at full and half
    resolution and of their ratio (how detail falls off with scale tells how a photograph was
    resized), the colourfulness (mean and spread of max - min over the channels), the share of
    clipped dark and bright pixels, and the log energy of the spectrum in four radial bands.
    (Edge-strength quantiles and the statistics of a 2x pooled copy were measured too: they
    added nothing and cost a tenth of a 32 px forward pass; docs/ood.md.)"""
    x = images.float() if images.is_floating_point() else images.float() / 255.0
    grey = x.mean(1)
    fine = _laplacian_energy(grey) + 1e-4
    coarse = _laplacian_energy(F.avg_pool2d(grey[:, None], 2)[:, 0]) + 1e-4
    spread = (x.amax(1) - x.amin(1)).flatten(1)
    mean_spread = spread.mean(1)
    # the standard deviation spelled out: aten::std took 0.2 ms here, more than all the rest
    spread_std = (
        (spread - mean_spread[:, None]).pow(2).sum(1) / max(spread.shape[1] - 1, 1)
    ).sqrt()
    colour = [mean_spread, spread_std]
    clipped = [(grey < 0.03).flatten(1).float().mean(1), (grey > 0.97).flatten(1).float().mean(1)]
    return torch.cat(
        [
            _pixel_statistics(x * 255.0),
            torch.stack([fine.log(), coarse.log(), (fine / coarse).log()], 1),
            torch.stack([*colour, *clipped], 1),
            _band_energies(grey),
        ],
        1,
    )


def _laplacian_energy(grey: torch.Tensor) -> torch.Tensor:
    """(N,) mean absolute response of the 3x3 Laplacian inside (N, H, W) images, written out
    as shifted sums: a one-channel convolution cost ~20x as much at 32 px."""
    centre = grey[:, 1:-1, 1:-1]
    around = grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1] + grey[:, 1:-1, :-2] + grey[:, 1:-1, 2:]
    return (around - 4.0 * centre).abs().mean((1, 2))


def _band_energies(grey: torch.Tensor) -> torch.Tensor:
    """(N, len(BANDS)): log of the mean power of the (mean-free) image in each radial band."""
    power = torch.fft.fft2(grey - grey.mean((1, 2), keepdim=True)).abs().pow(2)
    return torch.log(power.flatten(1) @ _band_weights(*grey.shape[1:], grey.device) + 1e-6)


@functools.lru_cache(maxsize=16)
def _band_weights(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(H * W, len(BANDS)): averages over each band's frequencies, as one matrix product."""
    fy, fx = (torch.fft.fftfreq(n, device=device).abs() for n in (height, width))
    radius = (fy[:, None] ** 2 + fx[None] ** 2).sqrt().flatten()
    inside = torch.stack([(radius >= low) & (radius < high) for low, high in BANDS], 1).float()
    return inside / inside.sum(0).clamp_min(1.0)


def _covariance(rows: torch.Tensor) -> torch.Tensor:
    """(N, K, K) covariances (1/L) of the K rows of length L of each image."""
    centred = rows - rows.mean(-1, keepdim=True)
    return centred @ centred.transpose(1, 2) / rows.shape[-1]


def _correlation(cov: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """(N,) correlation of rows ``i`` and ``j``; 0 where either is flat (no correlation to
    speak of)."""
    return cov[:, i, j] / ((cov[:, i, i] * cov[:, j, j]).sqrt() + 1e-3)
