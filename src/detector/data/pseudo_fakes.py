"""Pseudo-fakes: real training images passed through a random generator-like upsampler and
labelled FAKE (``data.pseudo_fake_prob``), for generators the detector has never seen.

Every image generator ends by doubling the resolution one or more times (transposed
convolutions, nearest or bilinear upsampling followed by a convolution, pixel shuffle), and
that last step leaves a pattern between neighbouring pixels (NPR, Tan et al. CVPR 2024). A
detector trained on a few generators learns their particular patterns; one trained also on
*random* upsamplers applied to real photographs has to learn the family, and it cannot use
the content, since a pseudo-fake shows the same scene as a real image of the same batch (the
pairing idea of DRCT and B-Free).

The upsampler of each pseudo-fake: the image halved (antialiased), then a stride-2 transposed
convolution with a 4x4 kernel between nearest (``[0, 1, 1, 0]``) and bilinear
(``[.25, .75, .75, .25]``) plus random taps and colour mixing (what a learned transposed
convolution or "resize + conv" computes per output phase), then a random 3x3 convolution
(identity, sharpening and random weights), and a JPEG re-encoding at ``jpeg_quality`` so that
the container does not tell the classes apart (CIFAKE and the zoo are JPEG q75 in both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg, encode_jpeg

from detector.data.settings import check_probability
from detector.errors import ConfigError

NEAREST = torch.tensor([0.0, 1.0, 1.0, 0.0])
BILINEAR = torch.tensor([0.25, 0.75, 0.75, 0.25])


def upsampler_kernels(
    n: int, channels: int, taps: float, mix: float, bilinear: float | None = None
) -> torch.Tensor:
    """(n * channels, channels, 4, 4) kernels of ``n`` random 2x upsamplers for a grouped
    transposed convolution: each a blend of nearest and bilinear (``bilinear``: its weight,
    drawn per image when None), with Gaussian taps of up to ``taps`` and cross-channel weights
    of up to ``mix`` (both drawn per image)."""
    alpha = torch.rand(n, 1) if bilinear is None else torch.full((n, 1), float(bilinear))
    base = alpha * BILINEAR + (1 - alpha) * NEAREST  # (n, 4)
    base2d = base[:, :, None] * base[:, None, :]  # (n, 4, 4)
    eye = torch.eye(channels)[None, :, :, None, None]  # (1, c_in, c_out, 1, 1)
    kernels = eye * base2d[:, None, None]  # (n, c_in, c_out, 4, 4)
    tap_scale = taps * torch.rand(n, 1, 1, 1, 1) ** 2  # mostly faint, as a trained one
    kernels = kernels + tap_scale * torch.randn(n, channels, channels, 4, 4) * eye
    mix_scale = mix * torch.rand(n, 1, 1, 1, 1) ** 2
    kernels = kernels + mix_scale * torch.randn(n, channels, channels, 4, 4) / 4
    return kernels.reshape(n * channels, channels, 4, 4)


def resize_conv_kernels(n: int, channels: int, strength: float, sharpen: float) -> torch.Tensor:
    """(n * channels, channels, 3, 3): the convolution after a generator's resize: the identity,
    an unsharp mask of weight up to ``sharpen`` and Gaussian weights of up to ``strength``.

    Why the sharpening: an upsampled image is smoother than a photograph, and a detector that
    learns "smooth = FAKE" calls a sharp generator's images REAL (the zoo's GANs are as sharp
    as photographs, its autoencoders smoother). With weights drawn in [0, 1] the pseudo-fakes'
    fine detail spans a photograph's, below and above. Measured, it does not make the zoo's
    GANs found when left out (docs/zoo.md, "Pseudo-fakes").
    """
    identity = torch.zeros(channels, channels, 3, 3)
    identity[range(channels), range(channels), 1, 1] = 1.0
    box = torch.eye(channels)[:, :, None, None].expand(-1, -1, 3, 3) / 9
    amount = sharpen * torch.rand(n, 1, 1, 1, 1)
    scale = strength * torch.rand(n, 1, 1, 1, 1) ** 2
    kernels = (
        identity + amount * (identity - box) + scale * torch.randn(n, channels, channels, 3, 3) / 3
    )
    return kernels.reshape(n * channels, channels, 3, 3)


def random_upsample(
    images: torch.Tensor,
    taps: float = 0.1,
    mix: float = 0.05,
    conv: float = 0.1,
    sharpen: float = 1.0,
    bilinear: float | None = None,
) -> torch.Tensor:
    """(N, C, H, W) floats in [0, 1] -> the same size, each image halved and brought back by
    its own random upsampler (module docstring). Borders are replicated, never zero-padded,
    so that a dark frame cannot give a pseudo-fake away. With ``taps``, ``mix``, ``conv`` and
    ``sharpen`` all 0 it is plain nearest (``bilinear=0``) or bilinear (``bilinear=1``)
    upsampling: tests check both."""
    n, c, h, w = images.shape
    size = ((h + 1) // 2, (w + 1) // 2)
    half = F.interpolate(images, size=size, mode="bilinear", antialias=True)
    half = F.pad(half, (1, 1, 1, 1), mode="replicate").reshape(1, n * c, size[0] + 2, -1)
    kernels = upsampler_kernels(n, c, taps, mix, bilinear)
    up = F.conv_transpose2d(half, kernels, stride=2, padding=1, groups=n)[..., 2 : 2 + h, 2 : 2 + w]
    up = F.pad(up, (1, 1, 1, 1), mode="replicate")
    out = F.conv2d(up, resize_conv_kernels(n, c, conv, sharpen), groups=n)
    return out.reshape(n, c, h, w).clamp(0.0, 1.0)


def check_pseudo_fakes(prob: float, jpeg_quality: int | None) -> None:
    check_probability("data.pseudo_fake_prob", prob)
    if jpeg_quality is not None and (
        isinstance(jpeg_quality, bool)
        or not isinstance(jpeg_quality, int)
        or not 1 <= jpeg_quality <= 100
    ):
        raise ConfigError(
            f"data.pseudo_fake_jpeg={jpeg_quality} must be a JPEG quality in [1, 100] or null"
        )


def fake_class(classes: list[str] | None) -> int:
    """The index of the class named FAKE (any case): pseudo-fakes need to know which it is."""
    names = [str(c).upper() for c in classes or []]
    if "FAKE" not in names:
        raise ConfigError(
            f"data.pseudo_fake_prob labels pseudo-fakes FAKE, but the classes are {classes}: "
            "name the class folders FAKE/REAL (or map them with data.class_map), or set "
            "data.pseudo_fake_prob=0"
        )
    return names.index("FAKE")


def add_pseudo_fakes(
    images: torch.Tensor,
    targets: torch.Tensor,
    prob: float,
    fake: int,
    jpeg_quality: int | None = 75,
) -> torch.Tensor:
    """Replace each FAKE image of a uint8 (N, 3, H, W) batch, with probability ``prob``, by a
    pseudo-fake of a REAL image of the same batch (labels and class balance unchanged; every
    real image kept). Returns the new images; the input is not modified."""
    slots = torch.nonzero((targets == fake) & (torch.rand(len(targets)) < prob)).flatten()
    reals = torch.nonzero(targets != fake).flatten()
    if len(slots) == 0 or len(reals) == 0:
        return images
    sources = reals[torch.randint(len(reals), (len(slots),))]
    made = random_upsample(images[sources].float() / 255.0)
    made = made.mul(255.0).round_().to(torch.uint8)
    if jpeg_quality is not None:
        made = torch.stack(decode_jpeg(encode_jpeg(list(made.contiguous()), quality=jpeg_quality)))
    out = images.clone()
    out[slots] = made
    return out


def pseudo_fake_batch(batch, prob: float, classes: list[str] | None, jpeg_quality: int | None):
    """A training batch (images, targets, ...) with pseudo-fakes in (:func:`add_pseudo_fakes`)."""
    images, targets, *rest = batch
    return [
        add_pseudo_fakes(images, targets, prob, fake_class(classes), jpeg_quality),
        targets,
        *rest,
    ]
