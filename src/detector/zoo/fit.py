"""Training a member on real images, then its two kinds of output: samples (new images from
random latents) and reconstructions (a real image through the encoder and decoder: its
content kept, the decoder's traces added, as DRCT and B-Free make their fakes).

Fixed step counts, never wall-clock budgets, keep the output a function of the seed. A plain
autoencoder has no prior to sample from: its samples decode latents drawn from a Gaussian
fitted (mean and full covariance) to the latents of its training images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from detector.zoo.nets import Discriminator, Member, build_network

BATCH = 64
LR = {"ae": 2e-3, "vae": 1e-3, "gan": 2e-4}
CHUNK = 256  # images per forward pass when encoding, sampling or reconstructing
_LAST = 50  # the final loss is the mean over this many last steps


@dataclass
class Trained:
    """A trained member, ready to sample and reconstruct."""

    member: Member
    model: nn.Module
    final_loss: dict[str, float]
    # autoencoders: mean and Cholesky factor of the training images' latents
    latent: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @torch.no_grad()
    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """``n`` new images, (n, 3, 32, 32) in [0, 1]."""
        out = []
        for start in range(0, n, CHUNK):
            k = min(CHUNK, n - start)
            if self.member.kind == "ae":
                mean, chol = self.latent
                z = mean + torch.randn(k, mean.numel(), generator=gen, dtype=mean.dtype) @ chol.T
                out.append(self.model.decoder(z.float().view(k, -1, 8, 8)))
            elif self.member.kind == "vae":
                out.append(self.model.decode(torch.randn(k, self.model.latent, generator=gen)))
            else:
                out.append(self.model(torch.randn(k, self.model.latent, generator=gen)))
        return torch.cat(out) if out else torch.empty(0, 3, 32, 32)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """The images through the encoder and decoder (the VAE: its posterior mean)."""
        out = []
        for start in range(0, len(images), CHUNK):
            x = images[start : start + CHUNK]
            if self.member.kind == "ae":
                out.append(self.model(x))
            elif self.member.kind == "vae":
                out.append(self.model.decode(self.model.encode(x)[0]))
            else:
                raise ValueError(f"{self.member.name} has no encoder: it cannot reconstruct")
        return torch.cat(out) if out else torch.empty(0, 3, 32, 32)


def _batches(data: torch.Tensor, steps: int, gen: torch.Generator):
    for _ in range(steps):
        yield data[torch.randint(0, len(data), (BATCH,), generator=gen)]


def _mean_of_last(history: dict[str, list[float]]) -> dict[str, float]:
    return {k: round(sum(v[-_LAST:]) / len(v[-_LAST:]), 6) for k, v in history.items()}


def _train_ae(model, data, steps, gen, tick) -> dict[str, list[float]]:
    opt = torch.optim.Adam(model.parameters(), lr=LR["ae"])
    history: dict[str, list[float]] = {"mse": []}
    for batch in _batches(data, steps, gen):
        loss = F.mse_loss(model(batch), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history["mse"].append(loss.item())
        tick()
    return history


def _train_vae(model, data, steps, gen, tick) -> dict[str, list[float]]:
    """The ELBO with a Gaussian decoder: squared error summed over pixels, plus the KL term."""
    opt = torch.optim.Adam(model.parameters(), lr=LR["vae"])
    history: dict[str, list[float]] = {"mse": [], "kl": []}
    for batch in _batches(data, steps, gen):
        mu, logvar = model.encode(batch)
        z = mu + torch.randn(mu.shape, generator=gen) * (0.5 * logvar).exp()
        recon = model.decode(z)
        sq = (recon - batch).square().sum(dim=(1, 2, 3)).mean()
        kl = -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(dim=1).mean()
        opt.zero_grad(set_to_none=True)
        (sq + kl).backward()
        opt.step()
        history["mse"].append(sq.item() / batch[0].numel())
        history["kl"].append(kl.item())
        tick()
    return history


def _train_gan(model, data, steps, gen, tick) -> dict[str, list[float]]:
    """DCGAN's non-saturating loss; one discriminator and one generator step per batch."""
    disc = Discriminator()
    opt_g = torch.optim.Adam(model.parameters(), lr=LR["gan"], betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=LR["gan"], betas=(0.5, 0.999))
    ones, zeros = torch.ones(BATCH), torch.zeros(BATCH)
    history: dict[str, list[float]] = {"generator": [], "discriminator": []}
    for real in _batches(data, steps, gen):
        fake = model(torch.randn(BATCH, model.latent, generator=gen))
        d_loss = F.binary_cross_entropy_with_logits(
            disc(real), ones
        ) + F.binary_cross_entropy_with_logits(disc(fake.detach()), zeros)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        g_loss = F.binary_cross_entropy_with_logits(disc(fake), ones)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        history["discriminator"].append(d_loss.item())
        history["generator"].append(g_loss.item())
        tick()
    return history


@torch.no_grad()
def _latent_gaussian(model: nn.Module, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and Cholesky factor of the covariance of the encoded images (float64; a small ridge
    keeps the factor defined when there are fewer images than latent numbers)."""
    z = torch.cat([model.encoder(data[i : i + CHUNK]) for i in range(0, len(data), CHUNK)])
    z = z.flatten(1).double()
    cov = torch.cov(z.T) if len(z) > 1 else torch.zeros(z.shape[1], z.shape[1]).double()
    ridge = 1e-4 * max(float(cov.diagonal().mean()), 1e-6)
    cov = cov + ridge * torch.eye(len(cov), dtype=cov.dtype)
    return z.mean(0), torch.linalg.cholesky(cov)


_TRAINERS = {"ae": _train_ae, "vae": _train_vae, "gan": _train_gan}


def train_member(
    member: Member,
    data: torch.Tensor,
    steps: int,
    gen: torch.Generator,
    tick: Callable[[], None] = lambda: None,
) -> Trained:
    """Train ``member`` on ``data`` (real images, (n, 3, 32, 32) in [0, 1]) for ``steps``
    batches; the network's initial weights come from torch's global seed."""
    model = build_network(member)
    model.train()
    history = _TRAINERS[member.kind](model, data, steps, gen, tick)
    model.eval()
    latent = _latent_gaussian(model, data) if member.kind == "ae" else None
    return Trained(member, model, _mean_of_last(history), latent)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
