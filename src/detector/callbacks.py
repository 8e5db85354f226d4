"""Callbacks that the stock Lightning ones do not cover."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from detector.report import plot_history, save_figure


class History(L.Callback):
    """Keeps every epoch's train/val metrics and draws the seed's history figure at the end.

    Metrics of epoch k are complete (train and val) once epoch k+1 starts, or when fit ends.
    """

    def __init__(self, filename: str = "history.png") -> None:
        self.filename = filename
        self.epochs: list[dict[str, float]] = []

    def _record(self, trainer: L.Trainer, epoch: int) -> None:
        if trainer.sanity_checking or epoch < 0 or any(h["epoch"] == epoch for h in self.epochs):
            return
        row = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith(("train/", "val/"))
        }
        if row:
            self.epochs.append({"epoch": epoch, **row})

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, trainer.current_epoch - 1)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, trainer.current_epoch - 1)
        if not trainer.is_global_zero or not self.epochs:
            return
        fig = plot_history(self.epochs)
        out = Path(trainer.default_root_dir) / self.filename
        save_figure(fig, out)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):
                experiment.add_figure("history", fig, global_step=trainer.global_step)
        self.path = out

    def state_dict(self) -> dict:
        return {"epochs": self.epochs}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epochs = list(state_dict.get("epochs", []))


class EMA(EMAWeightAveraging):
    """Lightning's exponential moving average of the weights, with checkpoints that mean one thing.

    A checkpoint's ``state_dict`` holds the averaged weights (what validation scored, what eval
    and predict load). Lightning's callback also restores the raw training weights from it when
    *testing* after ``fit`` in the same Trainer, so ``train.py``'s final test would score other
    weights than the checkpoint it names; here the raw weights come back only to resume training.

    The average is updated with one fused (``torch._foreach``) call per step instead of
    Lightning's one call per tensor: 45 ms a step less for ResNet50 on 2 CPU cores (7%).
    """

    def __init__(self, decay: float = 0.999, **kwargs) -> None:
        super().__init__(decay=decay, **kwargs)
        # The AveragedModel is built in setup() from these; it takes one of the two functions.
        self._kwargs = {**self._kwargs, "avg_fn": None, "multi_avg_fn": get_ema_multi_avg_fn(decay)}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint):
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
