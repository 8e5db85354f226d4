"""Callbacks that the stock Lightning ones do not cover."""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.optim.swa_utils import get_ema_multi_avg_fn

from detector.checkpoint import lean_checkpoint
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
        scored = [h for h in self.epochs if "val/auroc" in h]
        best = max(scored, key=lambda h: h["val/auroc"])["epoch"] if scored else None
        fig = plot_history(self.epochs, best_epoch=best)
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


class ProgressLog(L.Callback):
    """A progress line every ``every_s`` seconds and at each epoch's end when stdout is not a
    terminal (nohup, SLURM, CI), where the progress bar draws nothing at all:

        [train] epoch 1/10  step 120/625 (19%)  212 img/s  loss 0.4123  elapsed 0:01:02  ETA 0:48:11
    """

    def __init__(self, every_s: float = 30.0, force: bool = False) -> None:
        self.every_s = float(every_s)
        self.force = force

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.active = trainer.is_global_zero and (self.force or not sys.stdout.isatty())
        self.start = self.last = time.monotonic()
        self.steps = self.images = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not getattr(self, "active", False):
            return
        self.steps += 1
        self.images += len(batch[1]) * trainer.world_size
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.loss = float(loss) if loss is not None else None
        self.printed = False
        self.step_in_epoch = batch_idx + 1
        if time.monotonic() - self.last >= self.every_s:
            self._line(trainer, batch_idx + 1)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(self, "active", False) and not getattr(self, "printed", True):
            self._line(trainer, self.step_in_epoch)  # max_steps may end an epoch early

    def _line(self, trainer: L.Trainer, step: int) -> None:
        now = time.monotonic()
        elapsed = now - self.start
        total = trainer.num_training_batches
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        left = (epochs - trainer.current_epoch - 1) * total + total - step if epochs else None
        eta = f"  ETA {timedelta(seconds=round(left * elapsed / self.steps))}" if left else ""
        loss_text = f"  loss {self.loss:.4f}" if self.loss is not None else ""
        print(
            f"[train] epoch {trainer.current_epoch + 1}/{epochs or '?'}  step {step}/{total} "
            f"({100 * step / max(total, 1):.0f}%)  {self.images / max(elapsed, 1e-9):.0f} img/s"
            f"{loss_text}  elapsed {timedelta(seconds=round(elapsed))}{eta}",
            flush=True,
        )
        self.last = now
        self.printed = True


class LearningRate(L.Callback):
    """The learning rate as ``lr`` at each epoch's start, against the epoch. Lightning's
    LearningRateMonitor names it after the optimizer (``lr-Adam``, ``lr-AdamW``), so runs
    with different optimizers never share a chart, and plots it against the global step."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.optimizers:
            return
        groups = trainer.optimizers[0].param_groups
        values = {"lr": float(groups[0]["lr"])}
        values |= {f"lr/pg{i}": float(g["lr"]) for i, g in enumerate(groups[1:], 1)}
        for logger in trainer.loggers:
            logger.log_metrics({**values, "epoch": trainer.current_epoch}, trainer.global_step)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _exit_when_orphaned(parent: int) -> None:
    """A rank started by another rank's process: gone with it, not waiting in a collective
    for a peer that no longer exists (until ddp_timeout)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


class SaveOnInterrupt(L.Callback):
    """Ctrl-C, or SIGTERM (what SLURM sends before preemption): write ``last.ckpt`` of the
    state reached and print the command that resumes the run, every rank gone within seconds.

    SIGTERM is turned into the KeyboardInterrupt that Ctrl-C raises: Lightning's own SIGTERM
    handler broadcasts from inside the signal handler, at whatever point each rank is, and was
    seen to hang a 2-rank run until the collective timeout. On KeyboardInterrupt, Lightning
    kills the ranks it started; a rank whose parent dies anyway (kill -9) exits by itself.
    Rank 0 writes alone and waits for no other rank (one may already be gone); other errors
    (a NaN loss, a full disk) keep the last good checkpoint instead (:class:`FiniteLossGuard`).
    ``resume_command``: what to print instead of this command with ``ckpt_path=last``, for a
    script that trains through ``train(cfg)`` and resumes its own runs (the cross-generator
    protocol: rerun it as it was).
    """

    def __init__(self, resume_command: str | None = None) -> None:
        self.resume_command = resume_command

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_interrupt)
        # Ranks > 0 of a node are started by rank 0 or by torchrun's agent; rank 0 itself
        # may outlive its shell (nohup), so it never watches its parent.
        if int(os.environ.get("LOCAL_RANK", "0")) > 0:
            watchdog = threading.Thread(
                target=_exit_when_orphaned, args=(os.getppid(),), daemon=True
            )
            watchdog.start()

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt | SIGTERMException):
            return
        if not trainer.is_global_zero or trainer.state.fn != TrainerFn.FITTING:
            return
        path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        try:
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            path.parent.mkdir(parents=True, exist_ok=True)
            trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
        except Exception as e:  # the previous last.ckpt (atomic writes) is still whole
            print(f"\ninterrupted: could not save {path} ({e})", file=sys.stderr, flush=True)
            return
        command = self.resume_command
        if command is None:
            args = [a for a in sys.argv[1:] if not a.startswith(("ckpt_path=", "hydra."))]
            command = shlex.join(["python", Path(sys.argv[0]).name, *args, "ckpt_path=last"])
        print(
            f"\ninterrupted ({exception or 'Ctrl-C'}) in epoch {trainer.current_epoch + 1}/"
            f"{trainer.max_epochs} (step {trainer.global_step}): saved {path}\n"
            f"resume with: {command}",
            file=sys.stderr,
            flush=True,
        )


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint whose files hold what scoring, eval and fine-tuning read
    (:func:`detector.checkpoint.lean_checkpoint`): for ResNet50 with EMA and AdamW 98 MB
    instead of 390 MB, and faster to write at every validation. ``lean=False``: complete files.

    The checkpoint is assembled as for a complete file (so EMA puts its average into
    ``state_dict``), then trimmed. Its state in ``last.ckpt`` keeps ModelCheckpoint's key, so
    runs started before this class resume with their best-model bookkeeping."""

    def __init__(self, *args: Any, lean: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lean = lean

    @property
    def state_key(self) -> str:
        return "ModelCheckpoint" + super().state_key[len(type(self).__qualname__) :]

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if not self.lean or self.save_weights_only:
            return super()._save_checkpoint(trainer, filepath)
        with trainer.profiler.profile("save_checkpoint"):
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            trainer.strategy.save_checkpoint(lean_checkpoint(checkpoint), filepath)
            trainer.strategy.barrier("Trainer.save_checkpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)


def training_callbacks(resume_command: str | None = None) -> list[L.Callback]:
    """Callbacks every training run gets, whatever conf/callbacks says."""
    return [FiniteLossGuard(), ResumeRandomState(), SaveOnInterrupt(resume_command)]
