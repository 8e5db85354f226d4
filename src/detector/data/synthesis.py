"""The demo's images: REAL crops of the photographs that scikit-image ships, and FAKE images
from a small convolutional autoencoder trained for a few seconds on such crops.

The autoencoder's bottleneck blurs and its stride-2 transposed convolutions leave periodic
patterns: the kind of traces a real generator leaves. Fixed step counts, never wall-clock
budgets, keep the output a pure function of the seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

# Generator schedule. Fixed step counts (never wall-clock budgets) keep the output a pure
# function of the seed.
GEN_TRAIN_CROPS = 4000


TRAIN_STEPS = 400


BATCH = 64


LR = 2e-3


LATENT_NOISE = 0.25


# The demo's generators, by decoder: how each doubles the resolution
DECODERS = ("transposed", "nearest")
# Every way a decoder here can double the resolution: the demo's two and the zoo's others
# (detector.zoo, stand-ins for real generators)
UPSAMPLERS = (*DECODERS, "bilinear", "pixelshuffle")


def upsample(kind: str, cin: int, cout: int, bias: bool = True) -> list[nn.Module]:
    """Layers that double the resolution from ``cin`` to ``cout`` channels (no activation;
    ``bias=False`` where a BatchNorm follows):
    a stride-2 transposed convolution (overlapping 4x4 kernels: checkerboard patterns),
    nearest or bilinear upsampling + a 3x3 convolution (blocky or smooth 2x2 structure), or a
    3x3 convolution to 4x the channels + pixel shuffle (sub-pixel convolution: each output
    pixel of a 2x2 cell from its own filter, a periodic pattern of another kind)."""
    if kind == "transposed":
        return [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=bias)]
    if kind == "pixelshuffle":
        return [nn.Conv2d(cin, 4 * cout, 3, padding=1, bias=bias), nn.PixelShuffle(2)]
    if kind in ("nearest", "bilinear"):
        corners = {"align_corners": False} if kind == "bilinear" else {}
        up = nn.Upsample(scale_factor=2, mode=kind, **corners)
        return [up, nn.Conv2d(cin, cout, 3, padding=1, bias=bias)]
    raise ValueError(f"upsampling {kind!r} must be one of {', '.join(UPSAMPLERS)}")


def downsampling_layers(widths: tuple[int, ...]) -> tuple[list[nn.Module], int]:
    """An encoder's stride-2 4x4 convolutions (each halving the map) from RGB through
    ``widths``, and the channels they end with; shared by the demo's and the zoo's networks."""
    layers: list[nn.Module] = []
    channels = 3
    for width in widths:
        layers += [nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        channels = width
    return layers, channels


class AutoEncoder(nn.Module):
    """Tiny conv autoencoder; the decoder upsamples with stride-2 transposed convolutions
    (``decoder="transposed"``, the demo set) or nearest-neighbour upsampling + a 3x3
    convolution (``"nearest"``, ``data=demo_b``); the zoo also builds it with ``"bilinear"``
    and ``"pixelshuffle"`` decoders (:func:`upsample`).

    Those layers are the point: overlapping 4x4 kernels at stride 2 leave the periodic
    (checkerboard) patterns found in GAN and latent-diffusion decoder outputs; nearest
    upsampling leaves blocky 2x2 structure instead, smoothed by the convolution after it: a
    different trace, so the two demo sets are two generators for the cross-generator matrix.
    The 8x8x8 bottleneck (6x smaller than the image) drops some fine detail, as generators do,
    but not so much that blur alone (or JPEG file size) would give the label away.
    """

    def __init__(
        self, widths: tuple[int, ...] = (16, 32), latent: int = 8, decoder: str = "transposed"
    ) -> None:
        if decoder not in UPSAMPLERS:
            raise ValueError(f"decoder={decoder!r} must be one of {', '.join(UPSAMPLERS)}")
        super().__init__()
        enc, channels = downsampling_layers(widths)
        enc.append(nn.Conv2d(channels, latent, 1))
        dec: list[nn.Module] = []
        channels = latent
        for width in reversed(widths):
            dec += [*upsample(decoder, channels, width), nn.ReLU()]
            channels = width
        dec += [nn.Conv2d(channels, 3, 3, padding=1), nn.Sigmoid()]
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def to_tensor(crops: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float().div_(255.0)


def train_generator(
    crops: np.ndarray,
    steps: int,
    gen: torch.Generator,
    tick: Callable[[], None] | None = None,
    decoder: str = "transposed",
) -> AutoEncoder:
    """Train on REAL crops only, so FAKE content and colours come from the REAL distribution."""
    model = AutoEncoder(decoder=decoder)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    data = to_tensor(crops)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(data), (BATCH,), generator=gen)
        batch = data[idx]
        loss = nn.functional.mse_loss(model(batch), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if tick is not None:
            tick()
    model.eval()
    return model


@torch.no_grad()
def generate_fakes(model: AutoEncoder, sources: np.ndarray, gen: torch.Generator) -> np.ndarray:
    """Decode perturbed latents of held-out crops, then match each fake's colour statistics.

    The latent noise makes the outputs new samples rather than plain reconstructions; the
    per-channel mean/std match makes colour statistics uninformative, so a detector has to
    find the generator's traces instead.
    """
    out = np.empty_like(sources)
    for start in range(0, len(sources), 256):
        src = to_tensor(sources[start : start + 256])
        z = model.encoder(src)
        z_std = z.std(dim=(1, 2, 3), keepdim=True)
        z = z + LATENT_NOISE * z_std * torch.randn(z.shape, generator=gen)
        fake = model.decoder(z)
        dims = (2, 3)
        f_mean, f_std = fake.mean(dims, keepdim=True), fake.std(dims, keepdim=True)
        s_mean, s_std = src.mean(dims, keepdim=True), src.std(dims, keepdim=True)
        fake = (fake - f_mean) / f_std.clamp_min(1e-3) * s_std + s_mean
        fake = (fake.clamp(0, 1) * 255.0).round().to(torch.uint8)
        out[start : start + 256] = fake.permute(0, 2, 3, 1).numpy()
    return out


# scikit-image sample images that are inside the wheel (no pooch/network needed), with the
# provenance and licence stated in the `skimage.data` docstrings. Greyscale ones add texture
# variety (they are stacked to RGB) but get a lower sampling weight: CIFAKE is mostly colour.
# (name, sampling weight, source and licence)
SOURCES: tuple[tuple[str, float, str], ...] = (
    ("astronaut", 1.0, "Eileen Collins, NASA Great Images database; public domain"),
    ("coffee", 1.0, "Coffee cup, Rachel Michetti / Pikolo Espresso Bar; CC0"),
    ("chelsea", 1.0, "Chelsea the cat, Stefan van der Walt; CC0"),
    ("rocket", 1.0, "DSCOVR launch on Falcon 9, SpaceX Photos; public domain"),
    ("hubble_deep_field", 1.0, "Hubble eXtreme Deep Field, NASA/HubbleSite; public domain"),
    ("immunohistochemistry", 1.0, "IHC colonic glands, CMMI; no known copyright restrictions"),
    ("retina", 1.0, "Fundus photograph, Mikael Haggstrom, Wikimedia Commons; CC0 1.0"),
    ("camera", 0.3, "Camera man, Lav Varshney; CC0 (greyscale)"),
    ("coins", 0.3, "Greek coins, Brooklyn Museum; no known copyright restrictions (grey)"),
    ("brick", 0.3, "Brick wall, CC0Textures; CC0 (greyscale)"),
    ("grass", 0.3, "Grass, linolafett on DeviantArt; CC0 (greyscale)"),
    ("gravel", 0.3, "Gravel, CC0Textures; CC0 (greyscale)"),
)


# Crops flatter than this (per-pixel std, 0-255) are redrawn: black sky and retina borders
# would otherwise produce REAL/FAKE pairs that no detector could tell apart.
_MIN_CROP_STD = 6.0


def load_sources() -> list[np.ndarray]:
    """Load every source as uint8 RGB; fail loudly, because a silent fallback would change bytes."""
    import skimage.data  # deferred: scikit-image is slow to import, needed only to build

    images = []
    for name, _, _ in SOURCES:
        try:
            img = np.asarray(getattr(skimage.data, name)())
        except Exception as err:  # pragma: no cover - depends on the installed wheel
            raise RuntimeError(
                f"scikit-image sample image {name!r} could not be loaded; the demo set needs "
                "the images bundled in the scikit-image wheel (no download is attempted)"
            ) from err
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        images.append(np.ascontiguousarray(img[:, :, :3]))
    return images


def random_crops(images: list[Image.Image], n: int, rng: np.random.Generator) -> np.ndarray:
    """Square crops at log-uniform scales and random positions, antialiased down to 32x32.

    Several scales matter: tiny crops look like texture, big ones like a whole scene, which is
    roughly the spread CIFAKE's thumbnails have.
    """
    weights = np.array([w for _, w, _ in SOURCES], dtype=np.float64)
    weights /= weights.sum()
    out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    i = 0
    while i < n:
        img = images[rng.choice(len(images), p=weights)]
        w, h = img.size
        lo, hi = math.log(IMAGE_SIZE), math.log(min(w, h))
        side = int(round(math.exp(rng.uniform(lo, hi))))
        x = int(rng.integers(0, w - side + 1))
        y = int(rng.integers(0, h - side + 1))
        flip = bool(rng.random() < 0.5)
        crop = img.resize(
            (IMAGE_SIZE, IMAGE_SIZE),
            Image.Resampling.LANCZOS,
            box=(x, y, x + side, y + side),
            reducing_gap=3.0,  # box-reduce first: much faster, still antialiased
        )
        arr = np.asarray(crop)
        if arr.std() < _MIN_CROP_STD:
            continue
        out[i] = arr[:, ::-1] if flip else arr
        i += 1
    return out


IMAGE_SIZE: int = 32


def native_crops(
    images: list[Image.Image], n: int, side: int, rng: np.random.Generator
) -> np.ndarray:
    """Square ``side`` x ``side`` crops at random positions, never resized: the photographs' own
    pixels, for the high-resolution demo (sources smaller than ``side`` are not drawn)."""
    weights = np.array(
        [
            w if min(img.size) >= side else 0.0
            for (_, w, _), img in zip(SOURCES, images, strict=True)
        ]
    )
    weights /= weights.sum()
    arrays = [np.asarray(img) for img in images]
    out = np.empty((n, side, side, 3), dtype=np.uint8)
    i = 0
    while i < n:
        arr = arrays[rng.choice(len(arrays), p=weights)]
        h, w = arr.shape[:2]
        y = int(rng.integers(0, h - side + 1))
        x = int(rng.integers(0, w - side + 1))
        crop = arr[y : y + side, x : x + side]
        if crop.std() < _MIN_CROP_STD:
            continue
        out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
        i += 1
    return out
