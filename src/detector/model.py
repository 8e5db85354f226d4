"""The seed paper's network: a timm CNN trunk, a Squeeze-and-Excitation block on its last
feature map, and a small MLP head that ends in one logit (probability of class index 1)."""

from __future__ import annotations

import socket
from contextlib import contextmanager
from pathlib import Path

import timm
import torch
from torch import nn

from detector.errors import ConfigError
from detector.matmul_conv import set_matmul_convs


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


def create_backbone(
    name: str,
    pretrained: bool = False,
    weights_file: str | None = None,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """A timm trunk that returns its last feature map (no pooling, no classifier).

    With ``pretrained`` the weights come from timm's cache or hub, or from ``weights_file`` when
    given; this machine may have no network, so the failure message names both ways out.
    """
    if name not in timm.list_models() and not timm.is_model(name):
        raise ConfigError(f"model.backbone={name!r} is not a timm model (see timm.list_models())")
    kwargs: dict = {"num_classes": 0, "global_pool": ""}
    if drop_path_rate:  # stochastic depth; not every timm model takes the argument
        kwargs["drop_path_rate"] = drop_path_rate
        try:
            with torch.device("meta"):  # a dry build: no memory, no weights
                timm.create_model(name, **kwargs)
        except TypeError as e:
            raise ConfigError(
                f"model.drop_path_rate={drop_path_rate}: model.backbone={name!r} has no "
                f"stochastic depth ({_first_line(e)}); set model.drop_path_rate=0"
            ) from e
    if weights_file:
        path = Path(weights_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.weights_file={weights_file!r}: no such file")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
        pretrained = True
    if not pretrained or weights_file:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    try:
        # The cache first, with the hub switched off, so that an offline machine fails in a
        # second rather than after a minute of download retries.
        with _hub_offline(True):
            return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as cache_miss:  # timm/hub raise many kinds: missing file, network, format
        error: Exception = cache_miss
        if _hub_reachable():
            try:
                with _hub_offline(False):
                    return timm.create_model(name, pretrained=True, **kwargs)
            except Exception as e:
                error = e
        raise ConfigError(
            f"could not load pretrained weights for model.backbone={name!r} "
            f"({type(error).__name__}: {_first_line(error)}). Either put them in timm's cache "
            "(run once with network access) or pass model.weights_file=PATH "
            "(a .safetensors file or a PyTorch state dict), or train from scratch with "
            "model.pretrained=false."
        ) from error


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def _hub_offline(offline: bool):
    """Flip huggingface_hub's offline switch for one call (it is read at call time)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


class SEClassifier(nn.Module):
    """Backbone -> SE -> average pool -> Linear(C, hidden) -> ReLU -> Dropout -> Linear(hidden, 1).

    Input is an RGB batch, either uint8 in [0, 255] or float in [0, 1]; normalisation with the
    backbone's own mean/std happens here so that every caller (train, eval, predict, export)
    shares one preprocessing contract.

    ``flip_average``: outside training, the logit is the mean of the image's and its mirror
    image's (test-time augmentation). A model trained with horizontal flips treats both as the
    same image, so their mean is a less noisy score: +0.3 points of CIFAKE validation accuracy
    for twice the inference compute. Living in ``forward``, it reaches eval, predict, export
    and explain alike.
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
    ) -> None:
        super().__init__()
        self.flip_average = flip_average
        self.backbone = create_backbone(backbone, pretrained, weights_file, drop_path_rate)
        if matmul_convs:  # 2.5x faster training steps on CPU at 32 px (detector.matmul_conv)
            set_matmul_convs(self.backbone)
        channels = self.backbone.num_features
        self.se = SqueezeExcitation(channels, se_reduction) if se_reduction else nn.Identity()
        self.head = nn.Sequential(
            nn.Linear(channels, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, 1),
        )
        cfg = timm.data.resolve_data_config({}, model=self.backbone)
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return (x - self.mean) / self.std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(self.backbone(self.normalize(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (N,): sigmoid gives the probability of class index 1."""
        if self.flip_average and not self.training:
            # One pass over both (bigger kernels); view(2, -1) keeps any batch size traceable.
            return self._logits(torch.cat([x, x.flip(-1)])).view(2, -1).mean(0)
        return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x).mean(dim=(2, 3))).squeeze(1)
