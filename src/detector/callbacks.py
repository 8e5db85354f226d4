"""Callbacks that the stock Lightning ones do not cover."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from detector.errors import NonFiniteLossError
from detector.evaluation.plots import plot_history, save_figure


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
    Lightning's one call per tensor (measured in docs/speed.md).
    """

    def __init__(self, decay: float = 0.999, **kwargs) -> None:
        super().__init__(decay=decay, **kwargs)
        # The AveragedModel is built in setup() from these; it takes one of the two functions.
        self._kwargs = {**self._kwargs, "avg_fn": None, "multi_avg_fn": get_ema_multi_avg_fn(decay)}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint):
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


class ResumeRandomState(L.Callback):
    """Saves the torch, numpy and Python random generators with each checkpoint and restores
    them on resume, so shuffling, flips and dropout continue as if the run never stopped.

    Lightning restores callbacks just before the first training dataloader is iterated, which is
    where an uninterrupted run is when it writes the end-of-epoch checkpoint.
    """

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        version, internal, gauss = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": [np_state[0], np_state[1].tolist(), *[float(x) for x in np_state[2:]]],
            "python": [version, list(internal), gauss],
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        torch.set_rng_state(state_dict["torch"])
        name, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state(
            (name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), cached)
        )
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in state_dict and torch.cuda.is_available():
            with contextlib.suppress(RuntimeError):
                torch.cuda.set_rng_state_all(state_dict["cuda"])


class FiniteLossGuard(L.Callback):
    """Stops training at the first NaN/inf loss, before backward, so no weight is touched, and
    refuses to let a checkpoint be written from weights that are no longer finite."""

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        # Every rank stops together (one rank raising alone would leave the others waiting).
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            value = loss.detach().float().mean().item()
            raise NonFiniteLossError(
                f"training stopped: the training loss is {value} at epoch "
                f"{trainer.current_epoch}, step {trainer.global_step}; no weight was updated "
                f"with it. {_last_good(trainer)} Lower model.optimizer.lr or look for broken "
                "images or labels, then resume with ckpt_path=last or start again"
            )

    def _check_weights(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bad = [n for n, p in pl_module.named_parameters() if not bool(torch.isfinite(p).all())]
        if trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            raise NonFiniteLossError(
                f"training stopped: weights became NaN/inf at epoch {trainer.current_epoch} "
                f"({', '.join(bad[:3]) or 'on another rank'}); this epoch was not saved. "
                f"{_last_good(trainer)} Lower model.optimizer.lr or set trainer.gradient_clip_val"
            )

    # Before validation (whose metrics and threshold fit would choke on NaN outputs) and at the
    # end of a training epoch; both run before ModelCheckpoint's hooks, which Lightning calls last.
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._check_weights(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_weights(trainer, pl_module)


def _last_good(trainer: L.Trainer) -> str:
    for callback in trainer.checkpoint_callbacks:
        dirpath = getattr(callback, "dirpath", None)
        if dirpath and (Path(dirpath) / "last.ckpt").is_file():
            return f"The last good checkpoint is {Path(dirpath) / 'last.ckpt'}."
    return "No checkpoint had been saved yet."


def training_callbacks() -> list[L.Callback]:
    """Callbacks every training run gets, whatever conf/callbacks says."""
    return [FiniteLossGuard(), ResumeRandomState()]
