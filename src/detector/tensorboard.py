"""Lightning's TensorBoard logger, laid out for the questions a training run is watched for.

* Train and validation of one metric on one chart: a custom-scalars layout ("train vs val",
  the CUSTOM SCALARS tab) overlays ``train/<m>`` and ``val/<m>`` for loss, acc, precision,
  recall, f1 and auroc. The tag names stay ``train/loss``, ``val/auroc``, ... (README).
* Epoch metrics are plotted against the epoch (Lightning writes them at the global step): every
  metric here is an epoch value, numbered like the checkpoint names (``epoch000`` = 0).
* No ``epoch`` chart (the x axis already is the epoch); the learning rate is ``lr``
  (:class:`detector.callbacks.LearningRate`).
* The HParams tab: :meth:`log_final` writes the run's settings with its final validation
  metrics (``hp/...``), so runs of an ablation or a sweep are compared there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

OVERLAID = ("loss", "acc", "precision", "recall", "f1", "auroc")
LAYOUT = {"train vs val": {m: ["Multiline", [f"train/{m}", f"val/{m}"]] for m in OVERLAID}}


class TensorBoardLogger(_LightningTensorBoardLogger):
    """See the module docstring; a drop-in for Lightning's (same arguments)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._layout_written = False

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        metrics = dict(metrics)
        epoch = metrics.pop("epoch", None)
        if not self._layout_written:
            self.experiment.add_custom_scalars(LAYOUT)
            self._layout_written = True
        super().log_metrics(metrics, int(epoch) if epoch is not None else step)

    @rank_zero_only
    def log_final(self, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """The HParams tab's row of this run: ``params`` (flattened) with ``metrics``."""
        super().log_hyperparams(dict(params), {f"hp/{k}": float(v) for k, v in metrics.items()})
