"""A trained detector rebuilt for scoring from its checkpoint, with torch and timm alone.

Scoring (predict, the ``Detector`` API, export, explain, the service) needs the network, the
threshold, the class names, the preprocessing contract and the out-of-domain model: all in the
checkpoint. Building the LightningModule for that imports Lightning (seconds on every command)
and its training machinery; :func:`load_for_scoring` reads the same file, refuses the same bad
files with the same one-line errors, and gives the same probabilities (the same network, the
same weights, loaded strictly).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from detector.checkpoint_file import (
    build_for,
    check_is_detector,
    compare_state,
    read_checkpoint,
)
from detector.evaluation.ood import OODModel
from detector.model import NET_SETTINGS, SEClassifier


class HParams(dict):
    """The checkpoint's hyper-parameters, also by attribute (``hparams.class_names``), as a
    LightningModule's ``hparams`` reads."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


class ScoringModel(nn.Module):
    """What scoring reads of a :class:`~detector.module.DetectorModule`: ``net``, ``hparams``,
    ``threshold``, ``threshold_fit`` and ``ood``, under the same names (and ``model_id`` when
    it comes from an export)."""

    def __init__(
        self,
        hparams: dict,
        net: SEClassifier,
        threshold_fit: dict | None = None,
        ood: OODModel | None = None,
    ) -> None:
        super().__init__()
        self.hparams = HParams(hparams)
        self.hparams.setdefault("class_names", ["FAKE", "REAL"])
        self.net = net
        self.threshold_fit = threshold_fit
        self.ood = ood
        self.model_id: str | None = None

    @property
    def threshold(self) -> float:
        return float(self.hparams.get("threshold", 0.5))


def load_for_scoring(path: str | Path, map_location: str = "cpu") -> ScoringModel:
    """The checkpoint's network in eval mode, its weights loaded strictly; errors as
    :func:`detector.checkpoint.load_checkpoint` words them."""
    checkpoint, extra = read_checkpoint(path, map_location)  # .ckpt, or export's .safetensors
    path = Path(path).expanduser()
    check_is_detector(checkpoint, path, "ckpt")
    hparams = dict(checkpoint["hyper_parameters"])
    # The weights come from the checkpoint: never fetch or read pretrained ones to rebuild it.
    settings = {k: hparams[k] for k in NET_SETTINGS if k in hparams}
    settings.update(pretrained=False, weights_file=None)
    net = build_for(path, lambda: SEClassifier(**settings))
    if hparams.get("channels_last"):  # as the module trained and evaluated it
        net.to(memory_format=torch.channels_last)
    state = checkpoint["state_dict"]
    model = ScoringModel(hparams, net, checkpoint.get("threshold_fit"))
    compare_state(model, state, path, "ckpt")
    model.load_state_dict(state, strict=True)
    model.ood = OODModel.from_state(checkpoint.get("ood"))
    model.model_id = extra.get("model_id")  # an export carries its checkpoint's id
    return model.to(map_location).eval()
