"""eval.py's out-of-domain parts: refitting the model for a checkpoint that has none, and how
well ``ood_score`` tells a named in-domain test set from the others."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig
from torchmetrics.functional.classification import binary_auroc

from detector.checkpoint import AtomicCheckpointIO, load_checkpoint_file
from detector.errors import ConfigError
from detector.evaluation.ood import NO_OOD_MODEL, fit_on_data
from detector.module import DetectorModule


def ood_reference(cfg: DictConfig, names: list[str]) -> str | None:
    """``ood.reference``: the test set that is in domain, checked before any image is read."""
    reference = (cfg.get("ood") or {}).get("reference")
    if reference is None:
        return None
    if str(reference) not in names:
        raise ConfigError(
            f"ood.reference={reference!r} is not one of the test sets ({', '.join(names)}); "
            "name the sets with 'data.test_dirs={name: folder, ...}'"
        )
    if len(names) < 2:
        raise ConfigError("ood.reference needs a second test set to compare with (data.test_dirs)")
    return str(reference)


def refit_ood(
    cfg: DictConfig, data_cfg: dict, model: DetectorModule, trainer: L.Trainer, out: Path
) -> None:
    """``ood.refit=true`` on a checkpoint without an out-of-domain model: fit one on the
    training folder of ``data_cfg`` and write the checkpoint with it to
    ``<run>/checkpoint-ood.ckpt`` (the original file is never changed)."""
    spec = cfg.get("ood") or {}
    if model.ood is not None or not spec.get("refit"):
        return
    datamodule = hydra.utils.instantiate({**data_cfg, "test_dir": None})
    datamodule.prepare_data()
    datamodule.setup("fit")
    feature, quantile = str(spec.get("feature", "none")), float(spec.get("quantile", 0.95))
    print(
        f"fitting the out-of-domain model on {datamodule.train_dir} ({len(datamodule.train_set)} "
        f"training, {len(datamodule.val_set)} validation images) ...",
        flush=True,
    )
    model.ood = fit_on_data(model, datamodule, trainer, feature, quantile)
    checkpoint = load_checkpoint_file(cfg.ckpt)
    checkpoint["ood"] = model.ood.state()
    path = out / "checkpoint-ood.ckpt"
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)
    print(
        f"Out-of-domain model fitted on {datamodule.train_dir} ({model.ood.info['train_images']} "
        f"images) and saved with the weights in {path}; {cfg.ckpt} is unchanged"
    )


def ood_separation(reference: str, scores: dict[str, torch.Tensor], writers: list) -> dict:
    """AUROC of ``ood_score`` for "another set's image" against the reference set's images:
    1.0 when every unfamiliar image scores above every familiar one."""
    if reference not in scores:
        print(f"Out-of-domain AUROC: {NO_OOD_MODEL}")
        return {"reference": reference, "auroc": {}}
    ref = scores[reference]
    auroc = {}
    for name, other in scores.items():
        if name == reference:
            continue
        values = torch.cat([ref, other]).double()
        ranks = values.argsort().argsort().float() / max(
            len(values) - 1, 1
        )  # order kept, in [0, 1]
        labels = torch.cat([torch.zeros(len(ref)), torch.ones(len(other))]).long()
        auroc[name] = float(binary_auroc(ranks, labels))
        for writer in writers:
            writer.add_scalar(f"ood/auroc_vs_{reference}/{name}", auroc[name], global_step=0)
    shown = ", ".join(f"{n} {a:.4f}" for n, a in auroc.items())
    print(f"\nOut-of-domain AUROC against the in-domain set {reference}: {shown}")
    return {"reference": reference, "auroc": auroc}
