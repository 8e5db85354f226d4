"""The zoo's members: what each one is, and the networks that are not the demo's autoencoder.

Four members are :class:`detector.data.synthesis.AutoEncoder` with another decoder (how it
doubles the resolution, :func:`detector.data.synthesis.upsample`); the VAE and the three GANs
(one generator class, three ways of upsampling) are here. All are tiny (tens to hundreds of
thousands of parameters): a 2-core CPU trains each in minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from detector.data.synthesis import AutoEncoder, downsampling_layers, upsample

# Autoencoder members: twice the demo's widths, the demo's 8 x 8 x 8 latent (6x fewer numbers
# than the image: content is kept, fine detail partly lost, as in a latent-diffusion VAE)
AE_WIDTHS = (32, 64)
AE_LATENT = 8
VAE_WIDTHS = (32, 64, 128)
VAE_LATENT = 64
GAN_WIDTH = 32
GAN_LATENT = 64
GAN_DECODERS = ("transposed", "nearest", "bilinear")


@dataclass(frozen=True)
class Member:
    """One generator of the zoo."""

    name: str
    kind: str  # how it is trained and sampled: "ae", "vae" or "gan"
    decoder: str  # how its decoder doubles the resolution (synthesis.UPSAMPLERS)
    steps: int  # training steps at the default settings
    about: str

    @property
    def reconstructs(self) -> bool:
        """Whether it has an encoder, so that it can reconstruct real images."""
        return self.kind != "gan"


# The order is part of the output: a member's real images are the slice at its position
# (build.py), so a new member goes at the end.
MEMBERS: tuple[Member, ...] = (
    Member("tconv", "ae", "transposed", 1200, "autoencoder, stride-2 transposed convolutions"),
    Member("nearest", "ae", "nearest", 1200, "autoencoder, nearest upsampling + 3x3 conv"),
    Member("bilinear", "ae", "bilinear", 1200, "autoencoder, bilinear upsampling + 3x3 conv"),
    Member("pixelshuffle", "ae", "pixelshuffle", 1200, "autoencoder, sub-pixel conv (shuffle)"),
    Member("vae", "vae", "nearest", 1500, "VAE, 64-d latent, nearest upsampling + 3x3 conv"),
    Member("dcgan", "gan", "transposed", 2000, "DCGAN, transposed convs + BatchNorm, GAN loss"),
    Member("nngan", "gan", "nearest", 2000, "DCGAN, nearest upsampling + 3x3 conv, GAN loss"),
    Member("blgan", "gan", "bilinear", 2000, "DCGAN, bilinear upsampling + 3x3 conv, GAN loss"),
)
BY_NAME: dict[str, Member] = {m.name: m for m in MEMBERS}


class VAE(nn.Module):
    """A small VAE: strided convolutions to 4 x 4, a flat latent, and a decoder that upsamples
    back to 32 x 32 (nearest + conv, as Stable Diffusion's VAE decoder does)."""

    def __init__(
        self,
        widths: tuple[int, ...] = VAE_WIDTHS,
        latent: int = VAE_LATENT,
        decoder: str = "nearest",
    ) -> None:
        super().__init__()
        enc, channels = downsampling_layers(widths)
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        self.to_stats = nn.Linear(channels * 16, 2 * latent)
        self.from_latent = nn.Linear(latent, channels * 16)
        self.latent, self.channels = latent, channels
        dec: list[nn.Module] = []
        for width in (*reversed(widths[:-1]), widths[0]):
            dec += [*upsample(decoder, channels, width), nn.ReLU()]
            channels = width
        dec += [nn.Conv2d(channels, 3, 3, padding=1), nn.Sigmoid()]
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean and log-variance."""
        mu, logvar = self.to_stats(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar.clamp(-10.0, 10.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.from_latent(z)).view(-1, self.channels, 4, 4)
        return self.decoder(h)


class Generator(nn.Module):
    """DCGAN's generator at 32 px: a latent vector to 4 x 4, then three 2x upsamplings with
    BatchNorm to 32 x 32 (Radford et al. 2016, narrower): stride-2 transposed convolutions
    (``decoder="transposed"``, DCGAN's own), or nearest or bilinear upsampling + a 3x3
    convolution (``"nearest"``, ``"bilinear"``: the resize-convolution of Odena et al. 2016,
    without checkerboards; StyleGAN's filtered upsampling is of the bilinear kind). Three GANs
    that upsample differently: the GAN family is still seen when one is left out."""

    def __init__(
        self, latent: int = GAN_LATENT, width: int = GAN_WIDTH, decoder: str = "transposed"
    ) -> None:
        super().__init__()
        if decoder not in GAN_DECODERS:
            raise ValueError(
                f"a GAN's decoder {decoder!r} must be one of {', '.join(GAN_DECODERS)}"
            )
        self.latent = latent
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent, 4 * width, 4, 1, 0, bias=False),
            nn.BatchNorm2d(4 * width),
            nn.ReLU(),
        ]
        for cin, cout in ((4 * width, 2 * width), (2 * width, width)):
            layers += [*upsample(decoder, cin, cout, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        layers += [*upsample(decoder, width, 3), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z[:, :, None, None]) * 0.5 + 0.5  # [0, 1], as the other members


class Discriminator(nn.Module):
    """DCGAN's discriminator at 32 px: one logit per image."""

    def __init__(self, width: int = GAN_WIDTH) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1, bias=False),
            nn.BatchNorm2d(4 * width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(4 * width, 1, 4, 1, 0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2.0 - 1.0).flatten()


def build_network(member: Member) -> nn.Module:
    """The member's (untrained) network: for the GAN, its generator."""
    if member.kind == "ae":
        return AutoEncoder(AE_WIDTHS, AE_LATENT, member.decoder)
    if member.kind == "vae":
        return VAE(decoder=member.decoder)
    return Generator(decoder=member.decoder)
