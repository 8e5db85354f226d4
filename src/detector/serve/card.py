"""``GET /info``: the model card, read from the checkpoint (and its run folder when beside it).

Everything a caller needs to judge a verdict: the classes, the preprocessing contract, the
threshold and how it was fitted, what the out-of-domain flag means, what the model was trained
on and when. Folder names only, never the server's paths.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from detector.api import Detector

log = logging.getLogger(__name__)

DATA_KEYS = ("root", "train_dir", "test_dir")


def training_folders(ckpt: Path) -> list[str] | None:
    """The data folders' names from the training run's saved config
    (``<run>/.hydra/config.yaml`` beside ``<run>/checkpoints/``); None when it is not there."""
    saved = ckpt.resolve().parent.parent / ".hydra" / "config.yaml"
    if not saved.is_file():
        return None
    try:
        data = OmegaConf.to_container(OmegaConf.load(saved).get("data") or {}, resolve=False)
    except Exception as e:  # a damaged run folder costs the card one field, not the service
        log.warning("cannot read %s for the model card: %s", saved, e)
        return None
    folders = [data.get(k) for k in DATA_KEYS]
    folders += list((data.get("test_dirs") or {}).values())
    return sorted({Path(str(f)).name for f in folders if f}) or None


def threshold_source(detector: Detector) -> dict[str, Any]:
    fit = getattr(detector.module, "threshold_fit", None)
    if detector.threshold != detector.module.threshold:
        return {"rule": "set by the service's threshold setting"}
    if not fit:
        return {"rule": str(detector.module.hparams.get("threshold_rule", "fixed"))}
    return {k: v for k, v in fit.items() if isinstance(v, str | int | float)}


def model_card(detector: Detector, ckpt: str | Path, service: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready card; ``service``: the settings a caller runs into (limits, batching)."""
    ckpt = Path(ckpt)
    hp = detector.module.hparams
    names = detector.class_names
    ood = detector.ood
    written = dt.datetime.fromtimestamp(ckpt.stat().st_mtime, dt.UTC)
    return {
        "model_id": detector.model_id,
        "classes": names,
        "probability": f"P({names[1]}); the label is {names[1]} when it is >= threshold",
        "image_size": detector.image_size,
        "preprocessing": {
            **detector.preprocessing.as_dict(),
            "description": detector.preprocessing.describe(),
        },
        "threshold": detector.threshold,
        "threshold_fit": threshold_source(detector),
        "out_of_domain": None
        if ood is None
        else {
            "method": ood.state()["method"],
            "threshold": ood.threshold,
            "quantile": ood.quantile,
            "meaning": "in_domain=false: unlike the training data, the label is unreliable",
        },
        "family_expert": None
        if getattr(detector.net, "expert", None) is None or not detector.net.expert.fitted
        else {
            "meaning": "a second network for one family of generators (docs/zoo.md); the "
            "probability is from the lower of its logit and the detector's"
        },  # fmt: skip
        "training": {
            "data_folders": training_folders(ckpt),
            "date": written.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "date_is": "when the checkpoint file was written",
            "backbone": hp.get("backbone"),
        },
        "service": service,
    }
