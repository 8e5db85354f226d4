"""Reading a checkpoint file without running code it may hold, and telling whether it is one of
this detector's: torch and the standard library only (no Lightning), so that scoring (predict,
the API, export, explain, the service) starts fast. Saving and resuming: :mod:`checkpoint`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

from detector.errors import CheckpointError, DetectorError, ckpt_not_set
from detector.files import first_line

log = logging.getLogger(__name__)
T = TypeVar("T")

# Globals beyond torch's weights-only defaults that our checkpoints need: none (measured on the
# checkpoints train.py writes, with the ModelCheckpoint, History and ResumeRandomState states,
# Adam and the torch LR schedulers).
SAFE_GLOBALS: tuple = ()
LIGHTNING_KEYS = ("state_dict", "hyper_parameters")
NOT_OURS = "not a checkpoint of this detector"
RESUME_KEYS = ("state_dict", "optimizer_states", "loops", "epoch", "global_step")


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


def check_is_detector(checkpoint: dict, path: Path, setting: str) -> None:
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


def build_for(path: Path, build: Callable[[], T]) -> T:
    """``build()`` (the network or module from a checkpoint's settings), its failures worded
    as what they say of the file."""
    try:
        return build()
    except DetectorError as e:
        raise CheckpointError(f"ckpt={path}: its settings are not valid here ({e})") from None
    except Exception as e:
        raise CheckpointError(
            f"ckpt={path}: a checkpoint of another model ({type(e).__name__}: {first_line(e)})"
        ) from None


def compare_state(model: torch.nn.Module, state: dict, path: Path, setting: str) -> None:
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
# dict, parts joined by this (state-dict keys hold dots); the rest is JSON in its metadata
# (written by detector.checkpoint.save_safetensors).
SAFETENSORS_SEP = "/"
SAFETENSORS_META = "detector"


def _join_tensors(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, dict):
        if set(node) == {"__tensor__"}:
            return tensors[node["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in node.items()}
    if isinstance(node, list):
        return [_join_tensors(v, tensors) for v in node]
    return node


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


def read_checkpoint(
    path: str | Path | None, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Any], dict]:
    """A ``.ckpt`` (or export's ``.safetensors``) as the checkpoint dict, and the export's
    extra metadata (``model_id`` of the checkpoint it came from; empty for a ``.ckpt``)."""
    if path and str(path).endswith(".safetensors") and Path(path).expanduser().is_file():
        return load_safetensors(Path(path).expanduser())
    return load_checkpoint_file(path, map_location), {}
