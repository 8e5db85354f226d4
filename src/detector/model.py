"""The seed paper's network: a timm CNN trunk, a Squeeze-and-Excitation block on its last
feature map, and a small MLP head that ends in one logit (probability of class index 1)."""

from __future__ import annotations

import inspect
from typing import NamedTuple

import timm
import torch
from torch import nn
from torch.nn import functional as F

from detector.errors import ConfigError
from detector.family_expert import FamilyExpert
from detector.matmul_conv import set_matmul_convs
from detector.weights import create_backbone


class SqueezeExcitation(nn.Module):
    """Channel gating as in Hu et al. 2018, with Linear layers like the seed's Keras Dense ones."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        if reduction < 1 or channels // reduction < 1:
            raise ConfigError(
                f"model.se_reduction={reduction} must be between 1 and the channel count {channels}"
            )
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel weights in (0, 1), shape (N, C, 1, 1)."""
        s = x.mean(dim=(2, 3))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
        return s[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


def channel_mean_std(maps: torch.Tensor) -> torch.Tensor:
    """(N, 2C): each channel's mean and standard deviation over the map, as two batched matrix
    products (reductions over H and W of a channels_last map are many times slower)."""
    n, c, h, w = maps.shape
    v = maps.float().permute(0, 2, 3, 1).reshape(n, h * w, c)
    weights = torch.full((n, 1, h * w), 1.0 / (h * w), dtype=v.dtype, device=v.device)
    mean = torch.bmm(weights, v).squeeze(1)
    var = (torch.bmm(weights, v * v).squeeze(1) - mean * mean).clamp_min(0)
    return torch.cat([mean, (var * (h * w / max(h * w - 1, 1))).sqrt()], 1)


# What the backbone is fed: the image, its upsampling residual, or both as six channels.
INPUT_FILTERS = ("none", "npr", "image_and_npr")


def upsampling_residual(x: torch.Tensor) -> torch.Tensor:
    """The image minus its nearest-neighbour 2x down- and up-sampled copy (NPR, Tan et al.,
    CVPR 2024): what is left are the correlations between neighbouring pixels that a
    generator's upsampling layers leave behind, and little of the scene, which is what lets
    a detector carry over to generators it never saw."""
    up = F.interpolate(x[..., ::2, ::2], scale_factor=2.0, mode="nearest")
    return x - up[..., : x.shape[-2], : x.shape[-1]]  # odd sizes: the last row/column cut


class Embedding(NamedTuple):
    """What :meth:`SEClassifier.embed` returns, one row per image."""

    logits: torch.Tensor  # (N,)
    pooled: torch.Tensor  # (N, C): the pooled backbone features
    hidden: torch.Tensor  # (N, hidden_dim): the head's ReLU activations
    stages: torch.Tensor  # (N, 2 * channels of the early stages): their channel means and spreads


class SEClassifier(nn.Module):
    """Backbone -> SE -> average pool -> Linear(C, hidden) -> ReLU -> Dropout -> Linear(hidden, 1).

    Input is an RGB batch, either uint8 in [0, 255] or float in [0, 1]; normalisation with the
    backbone's own mean/std happens here so that every caller (train, eval, predict, export)
    shares one preprocessing contract.

    ``input_filter``: ``npr`` feeds the backbone :func:`upsampling_residual` of the image
    instead of the image (docs/zoo.md, the ablation); ``image_and_npr`` feeds both, stacked as
    six channels (the stem's only new weights), so that the network keeps the content that
    the residual throws away.

    ``flip_average``: outside training, the logit is the mean of the image's and its mirror
    image's (test-time augmentation). A model trained with horizontal flips treats both as the
    same image, so their mean is a less noisy score, for twice the inference compute
    (measured in docs/results.md). Living in ``forward``, it reaches eval, predict, export
    and explain alike.

    ``family_expert``: a small second network for one family of generators
    (:mod:`detector.family_expert`); outside training the logit is the minimum of both.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        pretrained: bool = False,
        weights_file: str | None = None,
        se_reduction: int = 16,
        hidden_dim: int = 128,
        dropout: float = 0.5,
        flip_average: bool = False,
        matmul_convs: bool = True,
        drop_path_rate: float = 0.0,
        input_filter: str = "none",
        family_expert: bool = False,
    ) -> None:
        super().__init__()
        if input_filter not in INPUT_FILTERS:
            raise ConfigError(
                f"model.input_filter={input_filter!r}: one of {', '.join(INPUT_FILTERS)}"
            )
        self.input_filter = input_filter
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"model.dropout={dropout} must be in [0, 1)")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ConfigError(f"model.drop_path_rate={drop_path_rate} must be in [0, 1)")
        self.flip_average = flip_average
        in_chans = 6 if input_filter == "image_and_npr" else 3
        self.backbone = create_backbone(
            backbone, pretrained, weights_file, drop_path_rate, in_chans
        )
        if matmul_convs:  # faster CPU training on small maps (detector.matmul_conv)
            set_matmul_convs(self.backbone)
        channels = self.backbone.num_features
        # The stages at 1/4 and 1/8 of the input (timm's feature_info): the statistics of their
        # activations describe textures and edges, what out-of-domain images differ in first.
        self.early_stages = [
            f["module"] for f in self.backbone.feature_info if f["reduction"] in (4, 8)
        ]
        self.se = SqueezeExcitation(channels, se_reduction) if se_reduction else nn.Identity()
        # fitted after training (detector.tasks.expert); until then it changes no logit
        self.expert = FamilyExpert() if family_expert else None
        self.head = nn.Sequential(
            nn.Linear(channels, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, 1),
        )
        cfg = timm.data.resolve_data_config({}, model=self.backbone)
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)

    def probability(self, x: torch.Tensor) -> torch.Tensor:
        """P(class 1) in float32: the one definition of a score that the API, explain and the
        robustness sweep share (and eval's test step computes the same way)."""
        return torch.sigmoid(self(x).float())

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return (x - self.mean) / self.std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        if self.input_filter == "npr":
            x = upsampling_residual(x)
        elif self.input_filter == "image_and_npr":
            x = torch.cat([x, upsampling_residual(x)], 1)
        return self.se(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (N,): sigmoid gives the probability of class index 1."""
        if self.flip_average and not self.training:
            # One pass over both (bigger kernels); view(2, -1) keeps any batch size traceable.
            logits = self._logits(torch.cat([x, x.flip(-1)])).view(2, -1).mean(0)
        else:
            logits = self._logits(x)
        return self._with_expert(logits, x)

    def _with_expert(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Outside training, the minimum with the family expert's logit, when there is one."""
        if self.expert is None or self.training:
            return logits
        return self.expert.combine(logits, self.normalize(x))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x).mean(dim=(2, 3))).squeeze(1)

    def embed(self, x: torch.Tensor) -> Embedding:
        """The logits and the features the out-of-domain model reads
        (:mod:`detector.evaluation.ood`), in one pass. With ``flip_average`` outside training,
        each is the mean over the image and its mirror, and the logits equal :meth:`forward`'s.
        """
        both = self.flip_average and not self.training
        views = torch.cat([x, x.flip(-1)]) if both else x
        # Each stage's statistics are taken as its map is made, so that the map is freed at
        # once instead of held to the end (150 MB for a batch of 32 at 224 px).
        statistics: list[torch.Tensor] = []
        hooks = [
            self.backbone.get_submodule(name).register_forward_hook(
                lambda _module, _input, out: statistics.append(channel_mean_std(out))
            )
            for name in self.early_stages
        ]
        try:
            pooled = self.forward_features(views).mean(dim=(2, 3))
        finally:
            for hook in hooks:
                hook.remove()
        stages = torch.cat(statistics, 1)
        hidden = self.head[1](self.head[0](pooled))
        logits = self.head[3](self.head[2](hidden)).squeeze(1)
        parts = (logits, pooled, hidden, stages)
        if both:
            parts = tuple(t.view(2, len(x), *t.shape[1:]).mean(0) for t in parts)
        return Embedding(self._with_expert(parts[0], x), *parts[1:])


# The network's own settings, as checkpoints store them among the module's hyper-parameters.
_NET_SIGNATURE = inspect.signature(SEClassifier).parameters
NET_SETTINGS = tuple(_NET_SIGNATURE)
NET_DEFAULTS = {k: p.default for k, p in _NET_SIGNATURE.items()}
