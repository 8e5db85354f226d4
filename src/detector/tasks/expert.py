"""Fitting the family expert (:mod:`detector.family_expert`) after training, or onto an older
checkpoint from eval.py: its images, its training, its calibration and the threshold refit."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from torchmetrics.functional.classification import binary_auroc

from detector.checkpoint import AtomicCheckpointIO, fit_into_best_checkpoint, load_checkpoint_file
from detector.distributed import gather_rows
from detector.errors import ConfigError
from detector.evaluation.metrics import fit_threshold
from detector.family_expert import NEVER, ExpertSettings, FamilyExpert, train_expert
from detector.module import DetectorModule

log = logging.getLogger(__name__)


def expert_settings(spec: DictConfig | dict | None) -> ExpertSettings | None:
    """``expert`` of the config as checked settings (None: no expert)."""
    if not spec:
        return None
    values = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else spec
    unknown = sorted(set(values) - set(ExpertSettings.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"expert.{unknown[0]} is not a setting of the family expert")
    sources = values.get("sources")
    if not sources or isinstance(sources, str):
        raise ConfigError("expert.sources: a list of source names of data.train_dirs, e.g. [dcgan]")
    settings = ExpertSettings(**{**values, "sources": [str(s) for s in sources]})
    if settings.steps < 1 or settings.batch_size < 1 or settings.lr <= 0:
        raise ConfigError("expert.steps, expert.batch_size and expert.lr must be positive")
    if not 0.0 < settings.quantile < 0.5:
        raise ConfigError(f"expert.quantile={settings.quantile} must be in (0, 0.5)")
    return settings


def _family_rows(datamodule, sources: list[str]) -> tuple[list[str], list[int]]:
    names = list(getattr(datamodule, "source_names", []) or [])
    family = [n for n in sources if n in names]
    if not family:
        given = ", ".join(names) or "one folder, no names"
        raise ValueError(
            f"none of expert.sources ({', '.join(sources)}) is a training source "
            f"(data.train_dirs: {given})"
        )
    wanted = torch.tensor([names.index(n) for n in family])
    index = torch.tensor(datamodule.train_source_index)
    return family, torch.nonzero(torch.isin(index, wanted)).flatten().tolist()


def fit_expert_on_data(
    model: DetectorModule, datamodule, trainer: L.Trainer, settings: ExpertSettings
) -> dict:
    """Train ``model.net.expert`` on the family's training images, map it onto the detector's
    scale on the validation split's class-1 (REAL) images and refit the threshold on the
    combined validation logits. Under DDP the images and validation logits of every rank are
    gathered and rank 0's weights are kept, so every rank holds the same expert."""
    if model.hparams.input != "resize":
        raise ConfigError("the family expert scores whole images: data.input=resize only")
    expert: FamilyExpert = model.net.expert
    family, rows = _family_rows(datamodule, list(settings.sources))
    device = trainer.strategy.root_device
    model.to(device).eval()
    expert.shift.fill_(NEVER)  # the detector's logits alone while calibrating
    images, labels = [], []
    with torch.inference_mode():
        for batch, targets, *_ in datamodule.features_dataloader(rows):
            images.append(model.prepare(batch.to(device)).cpu())
            labels.append(targets)
    images = gather_rows(trainer, torch.cat(images)).clone()
    labels = gather_rows(trainer, torch.cat(labels)).clone()
    if labels.unique().numel() < 2:
        raise ValueError(f"the family's training images ({', '.join(family)}) hold one class")
    loss = train_expert(expert, images, labels, settings, model.net.normalize)
    if trainer.world_size > 1:
        expert.load_state_dict(trainer.strategy.broadcast(expert.state_dict(), src=0))
    detector, raw, targets = [], [], []
    with torch.inference_mode():
        for batch, target, *_ in datamodule.val_dataloader():
            x = model.prepare(batch.to(device))
            detector.append(model.net(x).float().cpu())
            raw.append(expert.raw(model.net.normalize(x)).float().cpu())
            targets.append(target)
    detector, raw = gather_rows(trainer, torch.cat(detector)), gather_rows(trainer, torch.cat(raw))
    targets = gather_rows(trainer, torch.cat(targets))
    real = targets == 1
    info = expert.calibrate(detector[real], raw[real], settings.quantile, settings.margin)
    combined = torch.minimum(detector, raw * info["scale"] + info["shift"])
    positive = model.hparams.positive_class
    # the same number whichever class is positive: AUROC(-s, 1 - y) = AUROC(s, y)
    auroc = [float(binary_auroc(s, targets.long())) for s in (detector, combined)]
    if model.hparams.threshold_rule != "fixed":
        threshold, fit = fit_threshold(
            torch.sigmoid(combined), targets, model.hparams.threshold_rule, positive,
            model.hparams.target_fpr,
        )  # fmt: skip
        model.hparams.threshold = threshold
        model.threshold_fit = {**fit, "split": "val", "with": "family expert"}
    logit = torch.logit(torch.tensor(model.threshold).clamp(1e-7, 1 - 1e-7))
    info.update(
        sources=family,
        train_images=len(labels),
        last_loss=loss,
        val_auroc_before=auroc[0],
        val_auroc_after=auroc[1],
        real_pulled_under=float((combined[real] < logit).float().mean()
                                - (detector[real] < logit).float().mean()),
    )  # fmt: skip
    return info


def describe(info: dict) -> str:
    return (
        f"family expert on {', '.join(info['sources'])} ({info['train_images']:,} images): "
        f"validation AUROC {info['val_auroc_before']:.4f} -> {info['val_auroc_after']:.4f}, "
        f"{100 * info['real_pulled_under']:.1f}% of its REAL images pulled under the threshold"
    )


def store_expert(checkpoint: dict, model: DetectorModule, info: dict) -> dict:
    """``checkpoint`` with the fitted expert's weights, the flag that rebuilds it, the refitted
    threshold and what the fit measured."""
    checkpoint["state_dict"] = {k: v.cpu() for k, v in model.state_dict().items()}
    hparams = checkpoint.setdefault("hyper_parameters", {})
    hparams["family_expert"] = True
    hparams["threshold"] = model.threshold
    checkpoint["threshold_fit"] = model.threshold_fit
    checkpoint["family_expert"] = info
    return checkpoint


def fit_expert_after_training(
    trainer: L.Trainer, model: DetectorModule, datamodule, best: Path, settings: ExpertSettings
) -> None:
    """Fit with the best checkpoint's weights and store the expert in that checkpoint."""
    info = fit_into_best_checkpoint(
        trainer,
        model,
        best,
        "family expert",
        fit=lambda: fit_expert_on_data(model, datamodule, trainer, settings),
        store=lambda checkpoint, info: store_expert(checkpoint, model, info),
    )
    if info is not None:
        rank_zero_only(log.info)("%s; stored in %s", describe(info), best)


def refit_expert(
    cfg: DictConfig, data_cfg: dict, model: DetectorModule, trainer: L.Trainer, out: Path
) -> None:
    """eval.py with ``expert=...``: fit an expert onto the checkpoint (its data.train_dirs as
    it was trained) and write ``<run>/checkpoint-expert.ckpt``; the original file stays."""
    settings = expert_settings(cfg.get("expert"))
    if settings is None:
        return
    if not data_cfg.get("train_dirs"):
        raise ConfigError(
            "expert=...: set data.train_dirs as the checkpoint was trained, so that the family's "
            "images and the validation split can be found"
        )
    if getattr(model.net, "expert", None) is None:
        model.net.expert = FamilyExpert().to(next(model.parameters()).device)
    datamodule = hydra.utils.instantiate({**data_cfg, "test_dir": None})
    datamodule.prepare_data()
    datamodule.setup("fit")
    try:
        info = fit_expert_on_data(model, datamodule, trainer, settings)
    except ValueError as e:
        raise ConfigError(f"expert: {e}") from None
    path = out / "checkpoint-expert.ckpt"
    checkpoint = store_expert(load_checkpoint_file(cfg.ckpt), model, info)
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)
    print(f"{describe(info)}; saved with the weights in {path}; {cfg.ckpt} is unchanged")
    with open_dict(cfg):  # what is evaluated from here on (and what ood.refit adds to)
        cfg.ckpt = str(path)
