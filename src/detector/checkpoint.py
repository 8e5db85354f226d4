"""Checkpoints that survive crashes and cannot run code: safe loading, atomic saving, resuming.

* Loading: every checkpoint is read with ``torch.load(weights_only=True)``, so a crafted file
  cannot execute code while it is unpickled. A Lightning checkpoint of this detector needs no
  extra safe globals (tensors, dicts, lists, strings and numbers only); :data:`SAFE_GLOBALS` is
  where one would be added.
* Saving: :class:`AtomicCheckpointIO` writes to a temporary file beside the target and renames
  it, so a crash or a full disk mid-save leaves the previous ``last.ckpt`` whole.
* Resuming: ``ckpt_path=last`` finds the newest ``last.ckpt`` of earlier runs of the same task
  (the callbacks :class:`~detector.callbacks.ResumeRandomState` and
  :class:`~detector.callbacks.FiniteLossGuard` carry the random generators across and keep the
  checkpoints on disk the last good ones).
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from detector.checkpoint_file import (  # noqa: F401 - re-exported: the names users import
    LIGHTNING_KEYS,
    NOT_OURS,
    RESUME_KEYS,
    SAFE_GLOBALS,
    load_checkpoint_file,
    safe_loading,
)
from detector.checkpoint_file import check_is_detector as _check_is_detector
from detector.checkpoint_file import compare_state as _compare_state
from detector.errors import CheckpointError, DetectorError
from detector.files import atomic_file, first_line
from detector.module import NET_SETTINGS, DetectorModule

log = logging.getLogger(__name__)


def load_checkpoint(path: str | Path | None, map_location: str = "cpu"):
    """A trained detector from a checkpoint, with a one-line error for every way that fails.

    Used by eval, predict and export, so all three accept and refuse the same files. This is
    ``DetectorModule.load_from_checkpoint`` from a dict that was read once, safely.
    """
    checkpoint = load_checkpoint_file(path, map_location)
    path = Path(path).expanduser()
    _check_is_detector(checkpoint, path, "ckpt")
    accepted = {*inspect.signature(DetectorModule.__init__).parameters, *NET_SETTINGS}
    kwargs = {k: v for k, v in checkpoint["hyper_parameters"].items() if k in accepted}
    try:
        model = DetectorModule(**kwargs)
    except DetectorError as e:
        raise CheckpointError(f"ckpt={path}: its settings are not valid here ({e})") from None
    except Exception as e:
        raise CheckpointError(
            f"ckpt={path}: a checkpoint of another model ({type(e).__name__}: {first_line(e)})"
        ) from None
    _compare_state(model, checkpoint["state_dict"], path, "ckpt")
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    return model.to(map_location)


def check_resume_checkpoint(path: Path, model: torch.nn.Module) -> None:
    """Refuse, before training starts, a resume file that Lightning would fail on mid-way."""
    checkpoint = load_checkpoint_file(path, "cpu", setting="ckpt_path")
    _check_is_detector(checkpoint, path, "ckpt_path")
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
