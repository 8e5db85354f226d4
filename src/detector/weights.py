"""The timm backbone and its weights: ImageNet weights through timm, a local file, or none.

Without network and without a file, asking for pretrained weights stops at once with what to
do, instead of timm's long retry and a traceback."""

from __future__ import annotations

import difflib
import socket
from contextlib import contextmanager
from pathlib import Path

import timm
import torch
from torch import nn

from detector.errors import ConfigError
from detector.files import first_line


def check_backbone(name: str) -> None:
    """Refuse a name timm does not know, with the closest names it does."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(str(name), timm.list_models(), n=5)
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(
            f"model.backbone={name!r} is not a timm model{hint}; see timm.list_models()"
        )


def create_backbone(
    name: str,
    pretrained: bool = False,
    weights_file: str | None = None,
    drop_path_rate: float = 0.0,
    in_chans: int = 3,
) -> nn.Module:
    """A timm trunk that returns its last feature map (no pooling, no classifier).

    With ``pretrained`` the weights come from timm's cache or hub, or from ``weights_file`` when
    given; this machine may have no network, so the failure message names both ways out.
    """
    check_backbone(name)
    kwargs: dict = {"num_classes": 0, "global_pool": ""}
    if in_chans != 3:  # pretrained stems are adapted by timm (the RGB filters repeated, scaled)
        kwargs["in_chans"] = in_chans
    if drop_path_rate:  # stochastic depth; not every timm model takes the argument
        kwargs["drop_path_rate"] = drop_path_rate
        try:
            with torch.device("meta"):  # a dry build: no memory, no weights
                timm.create_model(name, **kwargs)
        except TypeError as e:
            raise ConfigError(
                f"model.drop_path_rate={drop_path_rate}: model.backbone={name!r} has no "
                f"stochastic depth ({first_line(e)}); set model.drop_path_rate=0"
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
            f"({type(error).__name__}: {first_line(error)}). Either put them in timm's cache "
            "(run once with network access) or pass model.weights_file=PATH "
            "(a .safetensors file or a PyTorch state dict), or train from scratch with "
            "model.pretrained=false."
        ) from error


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def _hub_offline(offline: bool):
    """Flip huggingface_hub's offline switch for one call (it is read at call time)."""
    from huggingface_hub import constants  # deferred: only when timm goes to its hub

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
