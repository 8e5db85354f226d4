"""A fault for the DDP tests to inject through the command line (``+callbacks.straggler=...``):
ranks other than 0 stop answering at the end of the first training epoch, as a hung rank
would. Lives in ``tests/`` so that Lightning's re-launched ranks can import it too
(``PYTHONPATH`` = the repository)."""

from __future__ import annotations

import time

import lightning as L


class Straggler(L.Callback):
    def __init__(self, seconds: float = 600.0) -> None:
        self.seconds = seconds

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0:
            time.sleep(self.seconds)
