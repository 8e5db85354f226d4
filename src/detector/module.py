"""Training, validation and test logic around :class:`~detector.model.SEClassifier`.

Only plain values are saved as hyper-parameters, so ``DetectorModule.load_from_checkpoint(path)``
rebuilds the network without any config. The optimizer and scheduler factories are left out:
they matter for training only, where the config provides them again.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
)

from detector.data.contract import check_input
from detector.data.preprocess import prepare_batch
from detector.data.tiles import DEFAULT_MAX_TILES, aggregate_logits
from detector.distributed import gather_rows
from detector.errors import ConfigError
from detector.evaluation.metrics import THRESHOLD_RULES, fit_threshold
from detector.evaluation.ood import OODModel
from detector.evaluation.per_source import source_metrics
from detector.model import NET_DEFAULTS, NET_SETTINGS, SEClassifier


def binary_metrics(prefix: str) -> MetricCollection:
    return MetricCollection(
        {
            "acc": BinaryAccuracy(),
            "precision": BinaryPrecision(),
            "recall": BinaryRecall(),
            "f1": BinaryF1Score(),
            "auroc": BinaryAUROC(),
        },
        prefix=prefix,
    )


def _check_settings(
    positive_class: int,
    threshold: float,
    threshold_rule: str,
    target_fpr: float,
    label_smoothing: float,
) -> None:
    if positive_class not in (0, 1):
        raise ConfigError(f"model.positive_class={positive_class} must be 0 or 1")
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"model.threshold={threshold} must be in [0, 1]")
    if threshold_rule not in THRESHOLD_RULES:
        raise ConfigError(
            f"model.threshold_rule={threshold_rule!r} must be one of {', '.join(THRESHOLD_RULES)}"
        )
    if not 0.0 <= target_fpr < 1.0:
        raise ConfigError(f"model.target_fpr={target_fpr} must be in [0, 1)")
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"model.label_smoothing={label_smoothing} must be in [0, 1)")


class DetectorModule(L.LightningModule):
    """The network's one logit is for class index 1 (REAL in CIFAKE); metrics are reported for
    ``positive_class`` (1 by default, as the seed reports REAL precision/recall).

    ``threshold`` on P(class 1) decides the class. Unless ``threshold_rule`` is ``fixed``, every
    validation pass during ``fit`` refits it on the validation split with that rule (maximum
    balanced accuracy, or the best TPR at FPR <= ``target_fpr``), so each checkpoint carries the
    threshold that suits its own weights; the test set never takes part.
    """

    def __init__(
        self,
        image_size: int = 224,
        class_names: Sequence[str] = ("FAKE", "REAL"),
        positive_class: int = 1,
        threshold: float = 0.5,
        threshold_rule: str = "balanced_accuracy",
        target_fpr: float = 0.05,
        label_smoothing: float = 0.0,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        scheduler_interval: str = "epoch",
        channels_last: bool = False,
        compile: bool = False,
        input: str = "resize",
        max_tiles: int = DEFAULT_MAX_TILES,
        aggregate: str = "mean",
        **net: Any,
    ) -> None:
        """One piece: ``net``: the network's own settings (:data:`NET_SETTINGS`: ``backbone``,
        ``pretrained``, ``se_reduction``, ``dropout``, ...), by keyword, handed to
        :class:`SEClassifier` as they are and saved as hyper-parameters beside the module's.

        ``input``, ``image_size``, ``max_tiles`` and ``aggregate`` are the preprocessing contract
        (:mod:`detector.data.contract`) every consumer of the checkpoint follows: a batch of
        tiles (a ``crop`` model's validation and test batches) comes with the number of tiles of
        each image, and the image's logit is ``aggregate`` of its tiles'."""
        super().__init__()
        unknown = sorted(set(net) - set(NET_SETTINGS))
        if unknown:
            raise ConfigError(
                f"model.{unknown[0]} is not a setting of the model (the network takes "
                f"{', '.join(NET_SETTINGS)})"
            )
        _check_settings(positive_class, threshold, threshold_rule, target_fpr, label_smoothing)
        check_input(input, image_size, max_tiles, aggregate, "model.")
        net = {**NET_DEFAULTS, **net}  # every setting in the checkpoint, defaults included
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.hparams["class_names"] = list(class_names)
        self.net = SEClassifier(**net)
        if channels_last:  # NHWC: the layout oneDNN / cuDNN convolutions run fastest in
            self.net.to(memory_format=torch.channels_last)
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.train_metrics = binary_metrics("train/")
        self.val_metrics = binary_metrics("val/")
        self.test_metrics = binary_metrics("test/")
        # Epoch losses weighted by images. A Metric syncs exact sums over DDP ranks, where
        # self.log(sync_dist=True) floors the mean image count when ranks saw different numbers
        # of images, as val/test shards do (Lightning issue #21859, 2.6.x).
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.test_probs: list[torch.Tensor] = []
        self.test_targets: list[torch.Tensor] = []
        self.test_ood: list[torch.Tensor] = []
        self.test_tiles: list[torch.Tensor] = []  # tiles scored per image (1: resize models)
        # What the detector knows (detector.evaluation.ood), fitted after training; saved in
        # checkpoints beside the threshold.
        self.ood: OODModel | None = None
        self.val_probs: list[torch.Tensor] = []
        self.val_targets: list[torch.Tensor] = []
        # How the current threshold was obtained (None: as configured); saved in checkpoints.
        self.threshold_fit: dict | None = None

    @property
    def threshold(self) -> float:
        return float(self.hparams.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Loaders may decode smaller than ``image_size`` (``data.decode_size``): the batch is
        resized here, on the device, in one call (see :mod:`detector.data.preprocess`)."""
        return prepare_batch(images, int(self.hparams.image_size), self.hparams.channels_last)

    def setup(self, stage: str) -> None:
        # Module.compile keeps the state-dict keys, so checkpoints load with or without it.
        if stage == "fit" and self.hparams.compile and not getattr(self, "_compiled", False):
            self.net.compile()
            self._compiled = True

    def _positive(self, probs: torch.Tensor, targets: torch.Tensor):
        """Scores and labels seen from the positive class."""
        if self.hparams.positive_class == 1:
            return probs, targets
        return 1.0 - probs, 1 - targets

    def _step(
        self, batch, metrics: MetricCollection, stage: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets, *counts = batch  # counts: tiles per image, for a batch of tiles
        x = self.prepare(images)
        if stage == "test" and self.ood is not None:  # one pass for the logit and the features
            embedding = self.net.embed(x)
            logits = embedding.logits
            self.test_ood.append(self.ood.score_batch(x, embedding, *counts))
        else:
            logits = self(x)
        logits = logits.float()
        if counts:
            logits = aggregate_logits(logits, counts[0], self.hparams.aggregate)
        soft = targets.float()
        if stage == "train" and self.hparams.label_smoothing:
            # Targets eps/2 and 1 - eps/2: a bounded logit instead of ever-growing confidence
            # on training images. Validation and test losses keep the hard labels.
            soft = soft * (1.0 - self.hparams.label_smoothing) + self.hparams.label_smoothing / 2
        loss = self.loss_fn(logits, soft)
        probs = torch.sigmoid(logits)
        scores, labels = self._positive(probs, targets)
        metrics.update(scores, labels)
        getattr(self, f"{stage}_loss").update(loss.detach(), weight=len(targets))
        return loss, probs

    def _log_epoch_metrics(self, stage: str) -> None:
        """Compute the epoch's metrics here, on every rank, and log them as plain numbers.

        Under DDP each ``compute`` is a collective (torchmetrics gathers every rank's state).
        Logged as Metric objects, they would be computed lazily by whoever reads them first:
        the progress bar does so on rank 0 only, while the other ranks have gone on to another
        collective (a callback's), and both wait for ever. Computed in this hook, the
        collectives run on every rank in the same order; the logged values are already global,
        so reading them (progress bar, checkpoint, logger) never needs another rank.
        """
        metrics: MetricCollection = getattr(self, f"{stage}_metrics")
        mean_loss: MeanMetric = getattr(self, f"{stage}_loss")
        # Every rank has batches whenever one has (the samplers give each rank at least one
        # image, or the data module refuses the split), so this test is the same on all ranks.
        if not mean_loss.update_called:
            return
        values = {k: v.float() for k, v in metrics.compute().items()}
        loss = mean_loss.compute().float()
        metrics.reset()
        mean_loss.reset()
        if self.trainer.sanity_checking:
            return
        self.log_dict(values, on_step=False, on_epoch=True)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=stage == "val")

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, _ = self._step(batch, self.train_metrics, "train")
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        _, probs = self._step(batch, self.val_metrics, "val")
        self.val_probs.append(probs.detach().cpu())
        self.val_targets.append(batch[1].detach().cpu())

    def on_validation_epoch_start(self) -> None:
        self.val_probs.clear()
        self.val_targets.clear()

    def on_validation_epoch_end(self) -> None:
        """Refit the threshold on this pass's validation predictions (before ModelCheckpoint
        saves, in ``on_validation_end``, so the checkpoint of these weights holds it)."""
        self._log_epoch_metrics("val")
        trainer = self.trainer
        # Several training sources (data.train_dirs): the source of each validation image
        sources = getattr(trainer.datamodule, "val_sources", None)
        refit = self.hparams.threshold_rule != "fixed" and trainer.state.fn == "fit"
        if trainer.sanity_checking or not self.val_probs or not (refit or sources is not None):
            return
        probs = gather_rows(trainer, torch.cat(self.val_probs))
        targets = gather_rows(trainer, torch.cat(self.val_targets))
        if sources is not None:
            self._log_source_metrics(probs, targets, sources)
        if not refit:
            return
        try:
            threshold, info = fit_threshold(
                probs,
                targets,
                self.hparams.threshold_rule,
                self.hparams.positive_class,
                self.hparams.target_fpr,
            )
        except ValueError as e:  # e.g. a validation split with one class only
            rank_zero_warn(
                f"threshold not fitted on validation ({e}): keeping {self.threshold:.4f}"
            )
            return
        self.hparams.threshold = threshold
        self.threshold_fit = {**info, "split": "val", "epoch": int(self.current_epoch)}
        # The same value on every rank (all fitted on the gathered predictions): no sync.
        self.log("val/threshold", threshold, on_epoch=True)

    def _log_source_metrics(
        self, probs: torch.Tensor, targets: torch.Tensor, sources: torch.Tensor
    ) -> None:
        """``val/<source>/auroc``, ...: from the gathered predictions, the same on every rank."""
        if len(sources) != len(probs):  # e.g. trainer.limit_val_batches: not every image seen
            rank_zero_warn("per-source validation metrics skipped: not every image was scored")
            return
        names = self.trainer.datamodule.source_names
        values = source_metrics(probs, targets, sources, names, self.hparams.positive_class)
        self.log_dict(values, on_step=False, on_epoch=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["threshold_fit"] = self.threshold_fit
        checkpoint["ood"] = self.ood.state() if self.ood is not None else None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """``trainer.test(ckpt_path=...)`` restores weights but not hyper-parameters: take the
        checkpoint's threshold too, so testing the best checkpoint uses the best one's."""
        threshold = (checkpoint.get("hyper_parameters") or {}).get("threshold")
        if threshold is not None:
            self.hparams.threshold = float(threshold)
        self.threshold_fit = checkpoint.get("threshold_fit")
        self.ood = OODModel.from_state(checkpoint.get("ood"))

    def test_step(self, batch, batch_idx: int) -> None:
        _, probs = self._step(batch, self.test_metrics, "test")
        self.test_probs.append(probs.detach().cpu())
        self.test_targets.append(batch[1].detach().cpu())
        tiles = batch[2] if len(batch) > 2 else torch.ones(len(probs), dtype=torch.long)
        self.test_tiles.append(tiles.detach().cpu())

    def on_test_epoch_start(self) -> None:
        self.test_probs.clear()
        self.test_targets.clear()
        self.test_ood.clear()
        self.test_tiles.clear()
        # The logged test metrics decide at the model's threshold, as the report does.
        positive_threshold = (
            self.threshold if self.hparams.positive_class == 1 else 1 - self.threshold
        )
        for metric in self.test_metrics.values():
            if hasattr(metric, "threshold"):
                metric.threshold = positive_threshold

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
        else:
            optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        kwargs = {}
        if "total_steps" in inspect.signature(self.scheduler_factory).parameters and not getattr(
            self.scheduler_factory, "keywords", {}
        ).get("total_steps"):
            kwargs["total_steps"] = int(self.trainer.estimated_stepping_batches)  # one-cycle
        scheduler = self.scheduler_factory(optimizer=optimizer, **kwargs)
        interval = self.hparams.scheduler_interval
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": interval},
        }
