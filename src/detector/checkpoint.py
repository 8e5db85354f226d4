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

import contextlib
import inspect
import json
import logging
import pickle
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from detector.errors import CheckpointError, DetectorError, ckpt_not_set
from detector.files import atomic_file, first_line
from detector.module import NET_SETTINGS, DetectorModule

log = logging.getLogger(__name__)

# Globals beyond torch's weights-only defaults that our checkpoints need: none (measured on the
# checkpoints train.py writes, with the ModelCheckpoint, History and ResumeRandomState states,
# Adam and the torch LR schedulers).
SAFE_GLOBALS: tuple = ()
LIGHTNING_KEYS = ("state_dict", "hyper_parameters")
NOT_OURS = "not a checkpoint of this detector"
RESUME_KEYS = ("state_dict", "optimizer_states", "loops", "epoch", "global_step")
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


@contextlib.contextmanager
def safe_loading() -> Iterator[None]:
    """Lightning's own ``torch.load`` calls (resume, ``test(ckpt_path=...)``) see the same
    allow-list as :func:`load_checkpoint_file`."""
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        yield


def load_checkpoint_file(
    path: str | Path | None, map_location: str | torch.device = "cpu", setting: str = "ckpt"
) -> dict[str, Any]:
    """The checkpoint's dict, read without running any code it may hold."""
    if not path:
        raise CheckpointError(ckpt_not_set(setting))
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{setting}={path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{setting}={path}: not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{setting}={path}: {NOT_OURS} (empty file, 0 bytes)")
    try:
        with safe_loading(), warnings.catch_warnings():
            # torch's note on odd pickle protocols would add a second line to the error
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError as e:
        raise CheckpointError(f"{setting}={path}: cannot read it ({e.strerror})") from None
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:
            raise CheckpointError(
                f"{setting}={path}: refused to load: unpickling it would call {found.group(1)}, "
                "which no checkpoint needs (the file may be crafted to run code). Checkpoints "
                "are loaded with weights_only=True; use only files written by train.py"
            ) from None
        detail = re.search(r"(Unsupported operand \d+|invalid load key.*)", str(e))
        raise CheckpointError(
            f"{setting}={path}: {NOT_OURS} (not a PyTorch file, or a damaged one: "
            f"{detail.group(1) if detail else first_line(e)})"
        ) from None
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError... on foreign files
        raise CheckpointError(
            f"{setting}={path}: {NOT_OURS} (not a PyTorch file, or a damaged one: "
            f"{type(e).__name__}: {first_line(e)})"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{setting}={path}: {NOT_OURS} (it holds a {type(checkpoint).__name__}, not a dict)"
        )
    return checkpoint


def _check_is_detector(checkpoint: dict, path: Path, setting: str) -> None:
    missing = [k for k in LIGHTNING_KEYS if k not in checkpoint]
    if missing:
        keys = ", ".join(map(str, list(checkpoint)[:6])) or "nothing"
        raise CheckpointError(
            f"{setting}={path}: {NOT_OURS} (a bare state dict or another program's file: no "
            f"{' or '.join(missing)}; it holds {keys}{', ...' if len(checkpoint) > 6 else ''})"
        )
    hparams = checkpoint["hyper_parameters"]
    if not isinstance(hparams, dict) or "backbone" not in hparams:
        raise CheckpointError(
            f"{setting}={path}: a checkpoint of another model (its hyper-parameters name no "
            "backbone: it was not written by this detector's train.py)"
        )


def _compare_state(model: torch.nn.Module, state: dict, path: Path, setting: str) -> None:
    """Name the first differences, instead of PyTorch's page-long size-mismatch listing."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weights missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unknown weights (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {shapes[0]})")
        raise CheckpointError(
            f"{setting}={path}: a checkpoint of a different model: {'; '.join(parts)}"
        )


# Tensors of a checkpoint in a .safetensors file are named by their path in the checkpoint's
# dict, parts joined by this (state-dict keys hold dots); the rest is JSON in its metadata.
SAFETENSORS_SEP = "/"
SAFETENSORS_META = "detector"


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


def _join_tensors(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, dict):
        if set(node) == {"__tensor__"}:
            return tensors[node["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in node.items()}
    if isinstance(node, list):
        return [_join_tensors(v, tensors) for v in node]
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


def load_safetensors(path: Path, setting: str = "ckpt") -> tuple[dict[str, Any], dict]:
    """The checkpoint dict :func:`save_safetensors` wrote, and its ``extra``."""
    # deferred: only .safetensors checkpoints need it
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            text = (f.metadata() or {}).get(SAFETENSORS_META)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{setting}={path}: not a readable .safetensors file ({e})") from None
    if text is None:
        raise CheckpointError(
            f"{setting}={path}: {NOT_OURS} (a .safetensors file without the detector's "
            "metadata: only export.py format=safetensors files load here)"
        )
    extra = json.loads(text)
    return _join_tensors(extra.pop("checkpoint"), tensors), extra


def load_checkpoint(path: str | Path | None, map_location: str = "cpu"):
    """A trained detector from a checkpoint (or export's ``.safetensors``), with a one-line
    error for every way that fails.

    Used by eval, predict and export, so all three accept and refuse the same files. This is
    ``DetectorModule.load_from_checkpoint`` from a dict that was read once, safely.
    """
    extra: dict[str, Any] = {}
    if path and str(path).endswith(".safetensors") and Path(path).expanduser().is_file():
        checkpoint, extra = load_safetensors(Path(path).expanduser())
    else:
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
