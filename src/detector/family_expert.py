"""A second, small network for one family of generators, beside the detector.

Why: one network trained on CIFAKE and the whole zoo calls a GAN it never saw REAL
(docs/zoo.md): inside one output the other sources' easier cues win. A small CNN told only one
family's story (the zoo's GANs: their FAKE images against their REAL ones) finds a sibling it
never saw (AUROC 0.91-0.98 measured, where the detector of all is at 0.54-0.85).

The image's logit is then the minimum of the detector's and the expert's: an image is as FAKE as
the more suspicious of the two finds it. The expert's logit is first mapped onto the detector's
scale by matching the two on the validation split's REAL images (their medians, and the spread
from the median down to ``quantile``), then moved ``margin`` spreads towards REAL: a larger
margin lets fewer photographs be pulled down by the expert, and finds fewer unseen GANs (the
trade is measured in docs/zoo.md). An expert not yet fitted never changes a logit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# An unfitted expert's mapped logit: above any logit the detector gives (finite, so that weight
# averaging of buffers, which interpolates, never makes a NaN of it).
NEVER = 1.0e4


def small_cnn(width: int = 32) -> nn.Sequential:
    """Four 3x3 convolutions (BatchNorm, ReLU), two max-pools, global average, one logit:
    66k parameters, 35 MFLOPs at 32 px, a fifth of a ResNet50's forward pass."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(3, width), *block(width, width), nn.MaxPool2d(2),
        *block(width, 2 * width), nn.MaxPool2d(2),
        *block(2 * width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2 * width, 1),
    )  # fmt: skip


class FamilyExpert(nn.Module):
    """The small CNN and its map onto the detector's logit scale (buffers, so checkpoints,
    exports and ``load_from_checkpoint`` carry them)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        # Frozen while the detector trains (DDP refuses parameters without gradients); only
        # train_expert unfreezes it.
        self.net = small_cnn(width).requires_grad_(False)
        self.register_buffer("scale", torch.zeros(()))
        self.register_buffer("shift", torch.tensor(NEVER))

    @property
    def fitted(self) -> bool:
        return bool(self.shift < NEVER)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) the expert's own logits of normalised images."""
        return self.net(x).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) its logits on the detector's scale."""
        return self.raw(x).float() * self.scale + self.shift

    def combine(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(logits, self(x).to(logits.dtype))

    def calibrate(
        self,
        detector_real: torch.Tensor,
        expert_real: torch.Tensor,
        quantile: float = 0.1,
        margin: float = 0.5,
    ) -> dict[str, float]:
        """Set the map from both networks' logits of the same REAL validation images."""
        levels = torch.tensor([quantile, 0.5], dtype=torch.float64)
        d_low, d_mid = torch.quantile(detector_real.double(), levels).tolist()
        e_low, e_mid = torch.quantile(expert_real.double(), levels).tolist()
        d_spread, e_spread = max(d_mid - d_low, 1e-6), max(e_mid - e_low, 1e-6)
        scale = d_spread / e_spread
        shift = d_mid - scale * e_mid + margin * d_spread
        self.scale.fill_(scale)
        self.shift.fill_(shift)
        return {"scale": scale, "shift": shift, "detector_median": d_mid, "expert_median": e_mid}


@dataclass
class ExpertSettings:
    """``expert`` of train.yaml / eval.yaml: which training sources make the family, and how
    long the expert trains."""

    sources: Sequence[str]
    steps: int = 800
    batch_size: int = 128
    lr: float = 1.0e-3
    quantile: float = 0.1
    margin: float = 0.5
    seed: int = 0


def train_expert(
    expert: FamilyExpert,
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: ExpertSettings,
    normalize,
) -> float:
    """From fresh weights: Adam, random horizontal flips, batches drawn with replacement, all
    from ``settings.seed`` (the same weights on every rank that holds the same images, and
    when fitted again onto the same detector). Returns the last loss."""
    device = expert.shift.device
    with torch.random.fork_rng(devices=[]):  # fresh weights from the seed alone, every fit
        torch.manual_seed(settings.seed)
        for module in expert.net.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    gen = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.Adam(expert.net.requires_grad_(True).parameters(), lr=settings.lr)
    expert.train()
    loss = torch.zeros(())
    with torch.enable_grad():
        for _ in range(settings.steps):
            idx = torch.randint(len(images), (settings.batch_size,), generator=gen)
            x = normalize(images[idx].to(device))
            if torch.rand(1, generator=gen) < 0.5:
                x = x.flip(-1)
            loss = F.binary_cross_entropy_with_logits(
                expert.raw(x).float(), labels[idx].float().to(device)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    expert.eval().net.requires_grad_(False)
    return float(loss.detach())
