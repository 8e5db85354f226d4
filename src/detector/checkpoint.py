"""Checkpoints that survive crashes and cannot run code: safe loading, atomic saving, resuming.

* Loading: every checkpoint is read with ``torch.load(weights_only=True)``, so a crafted file
  cannot execute code while it is unpickled. A Lightning checkpoint of this detector needs no
  extra safe globals (tensors, dicts, lists, strings and numbers only); :data:`SAFE_GLOBALS` is
  where one would be added.
* Saving: :class:`AtomicCheckpointIO` writes to a temporary file beside the target and renames
  it, so a crash or a full disk mid-save leaves the previous ``last.ckpt`` whole.
* Best checkpoints are lean (:func:`lean_checkpoint`, written by
  :class:`~detector.callbacks.BestCheckpoint`): weights and contract, no optimizer or loop
  state; ``last.ckpt`` stays complete. ``init_ckpt`` starts a new run from any one's weights.
* Resuming: ``ckpt_path=last`` finds the newest ``last.ckpt`` of earlier runs of the same task
  (the callbacks :class:`~detector.callbacks.ResumeRandomState` and
  :class:`~detector.callbacks.FiniteLossGuard` carry the random generators across and keep the
  checkpoints on disk the last good ones).
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from detector.checkpoint_file import (  # noqa: F401 - re-exported: the names users import
    LIGHTNING_KEYS,
    NOT_OURS,
    RESUME_KEYS,
    SAFE_GLOBALS,
    SAFETENSORS_META,
    SAFETENSORS_SEP,
    build_for,
    load_checkpoint_file,
    load_safetensors,
    read_checkpoint,
    safe_loading,
)
from detector.checkpoint_file import check_is_detector as _check_is_detector
from detector.checkpoint_file import compare_state as _compare_state
from detector.errors import CheckpointError
from detector.files import atomic_file
from detector.module import NET_SETTINGS, DetectorModule

log = logging.getLogger(__name__)

# What a lean (best) checkpoint keeps: the weights (the EMA average when EMA is on), the
# hyper-parameters (network, preprocessing contract, threshold, class names), the threshold's
# fit and the out-of-domain model: all that eval, predict, the API, export and a fine-tune from
# its weights read. Dropped: optimizer and scheduler state, loop and callback state, the raw
# weights under the EMA, precision-plugin state: what only resuming needs (last.ckpt has it).
LEAN_KEYS = (
    "state_dict",
    "hyper_parameters",
    "hparams_name",
    "threshold_fit",
    "ood",
    "epoch",
    "global_step",
    "pytorch-lightning_version",
)
LEAN_MARK = "lean"  # the names of the keys a lean checkpoint dropped


def _split_tensors(node: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, torch.Tensor):
        tensors[path] = node.detach().cpu().contiguous().clone()  # no shared storage
        return {"__tensor__": path}
    if isinstance(node, dict):
        return {
            str(k): _split_tensors(v, f"{path}{SAFETENSORS_SEP}{k}", tensors)
            for k, v in node.items()
        }
    if isinstance(node, list | tuple):
        return [
            _split_tensors(v, f"{path}{SAFETENSORS_SEP}{i}", tensors) for i, v in enumerate(node)
        ]
    return node


def save_safetensors(checkpoint: dict[str, Any], path: Path, extra: dict[str, Any]) -> None:
    """A (lean) checkpoint as one .safetensors file: every tensor in it (weights, the
    out-of-domain model's Gaussians), the rest (hyper-parameters, threshold fit, ``extra``) as
    JSON in its metadata. Written atomically; loads without pickle at all."""
    from safetensors.torch import save  # deferred: only export writes this format

    tensors: dict[str, torch.Tensor] = {}
    meta = {k: _split_tensors(v, k, tensors) for k, v in lean_checkpoint(checkpoint).items()}
    text = json.dumps({**extra, "checkpoint": meta})
    with atomic_file(path, "wb", durable=True) as f:
        f.write(save(tensors, metadata={SAFETENSORS_META: text}))


def load_checkpoint(path: str | Path | None, map_location: str = "cpu"):
    """A trained detector from a checkpoint (or export's ``.safetensors``), with a one-line
    error for every way that fails.

    Used by eval, predict and export, so all three accept and refuse the same files. This is
    ``DetectorModule.load_from_checkpoint`` from a dict that was read once, safely.
    """
    checkpoint, extra = read_checkpoint(path, map_location)
    path = Path(path).expanduser()
    _check_is_detector(checkpoint, path, "ckpt")
    accepted = {*inspect.signature(DetectorModule.__init__).parameters, *NET_SETTINGS}
    kwargs = {k: v for k, v in checkpoint["hyper_parameters"].items() if k in accepted}
    model = build_for(path, lambda: DetectorModule(**kwargs))
    _compare_state(model, checkpoint["state_dict"], path, "ckpt")
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    # An export names the checkpoint it came from: predictions carry that model's id.
    model.model_id = extra.get("model_id")
    return model.to(map_location)


def lean_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint without what only resuming needs (see :data:`LEAN_KEYS`): for ResNet50
    with EMA and AdamW about a quarter of the full file. The dropped keys are listed under
    :data:`LEAN_MARK`, so a resume from it is refused with a clear reason."""
    lean = {k: v for k, v in checkpoint.items() if k in LEAN_KEYS}
    lean[LEAN_MARK] = sorted(str(k) for k in checkpoint if k not in LEAN_KEYS)
    return lean


def _lean_resume_error(path: Path, checkpoint: dict) -> CheckpointError:
    last = path.parent / "last.ckpt"
    where = f"{last}, " if last.is_file() else "the run's checkpoints/last.ckpt, "
    return CheckpointError(
        f"ckpt_path={path}: a best checkpoint, written without the training state "
        f"({', '.join(checkpoint[LEAN_MARK]) or 'optimizer, loops'}), so training cannot "
        f"resume from it; resume from {where}or start a new run from its weights with "
        f"init_ckpt={path} (a fresh optimizer and schedule)"
    )


def load_initial_weights(model: torch.nn.Module, path: str | Path) -> None:
    """``init_ckpt``: a new run starts from a checkpoint's weights (any of this detector's,
    lean or full); optimizer, schedule, threshold and out-of-domain model start afresh."""
    checkpoint = load_checkpoint_file(path, "cpu", setting="init_ckpt")
    path = Path(path).expanduser()
    _check_is_detector(checkpoint, path, "init_ckpt")
    _compare_state(model, checkpoint["state_dict"], path, "init_ckpt")
    model.load_state_dict(checkpoint["state_dict"], strict=True)


def check_resume_checkpoint(path: Path, model: torch.nn.Module) -> None:
    """Refuse, before training starts, a resume file that Lightning would fail on mid-way."""
    checkpoint = load_checkpoint_file(path, "cpu", setting="ckpt_path")
    _check_is_detector(checkpoint, path, "ckpt_path")
    if LEAN_MARK in checkpoint:
        raise _lean_resume_error(path, checkpoint)
    missing = [k for k in RESUME_KEYS if k not in checkpoint]
    if missing:
        raise CheckpointError(
            f"ckpt_path={path}: holds weights but no training state ({', '.join(missing)}), so "
            "training cannot resume from it"
        )
    _compare_state(model, checkpoint["state_dict"], path, "ckpt_path")


def find_last_checkpoint(log_dir: str | Path, task_name: str) -> Path | None:
    """The newest ``<log_dir>/<task>/runs/*/checkpoints/last.ckpt``: the run to resume."""
    found = list((Path(log_dir) / task_name / "runs").glob("*/checkpoints/last.ckpt"))
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def resolve_ckpt_path(ckpt_path: str | None, log_dir: str | Path, task_name: str) -> Path | None:
    """``ckpt_path`` as a file: None, ``last`` (see :func:`find_last_checkpoint`) or a path."""
    if ckpt_path in (None, ""):
        return None
    if str(ckpt_path) == "last":
        found = find_last_checkpoint(log_dir, task_name)
        if found is None:
            raise CheckpointError(
                f"ckpt_path=last: no earlier run to resume (no "
                f"{Path(log_dir) / task_name / 'runs'}/*/checkpoints/last.ckpt)"
            )
        return found
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={path}: no such file (a .ckpt path, or 'last')")
    return path


def run_folder_of(ckpt: Path) -> Path | None:
    """The run folder that wrote ``<run>/checkpoints/x.ckpt``, where a resumed run continues."""
    ckpt = ckpt.resolve()
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same folder, fsync, then rename over the target.

    ``os.replace`` is atomic on one file system: a reader sees the old file or the new one,
    never a mixture, and a failure (full disk, kill -9) leaves the old one in place.
    """

    @staticmethod
    def _dump(checkpoint: dict[str, Any], f) -> None:
        torch.save(checkpoint, f)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        try:
            with atomic_file(path, "wb", durable=True) as f:
                self._dump(checkpoint, f)
        except OSError as e:
            kept = f"the previous {path.name} is unchanged" if path.exists() else "nothing written"
            raise CheckpointError(
                f"could not save checkpoint {path} ({e.strerror or e}); {kept}"
            ) from None


Fitted = TypeVar("Fitted")


def fit_into_best_checkpoint(
    trainer: Any,
    model: torch.nn.Module,
    best: Path,
    what: str,
    fit: Callable[[], Fitted],
    store: Callable[[dict[str, Any], Fitted], dict[str, Any]],
) -> Fitted | None:
    """What is fitted after training (the family expert, the out-of-domain model) is fitted with
    the best checkpoint's weights and kept in that file, so that the file scores as the run
    tested it. Every rank fits (features are gathered across ranks); rank 0 writes atomically
    and every rank waits for the file, which it tests next. A ``ValueError`` of ``fit`` (the
    same on every rank, e.g. a split with one class) leaves the file as it was, with a warning.
    """
    from lightning.pytorch.utilities import rank_zero_only  # training only

    checkpoint = load_checkpoint_file(best, setting="the best checkpoint")
    model.load_state_dict(checkpoint["state_dict"])
    try:
        fitted = fit()
    except ValueError as e:
        rank_zero_only(log.warning)("%s not fitted (%s): %s scores without it", what, e, best)
        return None
    if trainer.is_global_zero:
        AtomicCheckpointIO().save_checkpoint(store(checkpoint, fitted), best)
    trainer.strategy.barrier()
    return fitted
