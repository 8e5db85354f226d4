"""Export a checkpoint to ONNX, TorchScript or safetensors, with the preprocessing contract
beside the file.

``safetensors`` is the weights alone (no pickle, no optimizer state), with the hyper-parameters
and out-of-domain model in its metadata: ``Detector.from_checkpoint("model.safetensors")``
loads it, and every command's ``ckpt=`` takes it. The ONNX and TorchScript graphs take float32
RGB in [0, 1] (uint8 / 255), NCHW, any batch size, and normalise inside, as the PyTorch model
does; their outputs are the logit and the probability of ``class_names[1]``. Resizing is the
consumer's job and the contract says how eval does it.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from detector.api import Detector
from detector.checkpoint import load_checkpoint_file, save_safetensors
from detector.errors import ConfigError
from detector.files import describe_error
from detector.matmul_conv import set_matmul_convs
from detector.tasks.inputs import output_target, require_ckpt

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}
INPUT_NAME = "image"
OUTPUT_NAMES = ("logit", "probability")


class ExportWrapper(nn.Module):
    """Logit and probability in one graph, so consumers need no sigmoid of their own."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit = self.net(image)
        return logit, torch.sigmoid(logit)


def _geometry(detector: Detector) -> dict:
    """How an image becomes the model's input, by the checkpoint's preprocessing contract."""
    pre = detector.preprocessing
    s = pre.image_size
    if pre.input == "resize":
        return {
            "resize": f"bilinear (PIL Image.BILINEAR) to {s}x{s}, only when the image is not "
            f"already {s}x{s}; no crop, no padding"
        }
    return {
        "resize": "never: the image's own pixels",
        "tiles": f"{s}x{s} tiles as rows of the batch; a side shorter than {s} is first padded "
        f"to {s} by mirroring (numpy 'symmetric'); a grid covering the image when "
        f"ceil(H/{s})*ceil(W/{s}) <= {pre.max_tiles}, else at most {pre.max_tiles} tiles spread "
        "evenly edge to edge (docs/use.md, 'Tiles with onnxruntime')",
        "aggregate": f"{pre.aggregate} of the tiles' logits, then sigmoid: the image's probability",
    }


def contract(detector: Detector, fmt: str, file: Path, checkpoint: str | Path) -> dict:
    """Everything a consumer needs to reproduce eval's numbers without this repository."""
    net = detector.net
    s = detector.image_size
    names = detector.class_names
    return {
        "format": fmt,
        "file": file.name,
        "model_id": detector.model_id,
        "checkpoint": str(Path(checkpoint).resolve()),
        "class_names": names,
        "threshold": detector.threshold,
        "image_size": s,
        "mean": [float(v) for v in net.mean.flatten()],
        "std": [float(v) for v in net.std.flatten()],
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 3, s, s],
            "dtype": "float32",
            "layout": "NCHW",
            "channels": "RGB",
            "range": "[0, 1]: uint8 pixel values divided by 255",
            **_geometry(detector),
            "normalization": "inside the model: (x - mean) / std; do NOT normalise again",
        },
        "outputs": {
            OUTPUT_NAMES[0]: {"shape": ["batch"], "meaning": f"logit of P({names[1]})"},
            OUTPUT_NAMES[1]: {"shape": ["batch"], "meaning": f"P({names[1]}) = sigmoid(logit)"},
        },
        "preprocessing": detector.preprocessing.as_dict(),
        "decision": f"{names[1]} if probability >= threshold else {names[0]}",
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def export_onnx(wrapper: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1)
    # The exporter's optimiser logs every pass at INFO, which drowns the run's own log.
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={INPUT_NAME: {0: batch}},
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    except Exception as e:
        raise ConfigError(f"ONNX export failed for opset={opset} ({describe_error(e)})") from e


def export_torchscript(wrapper: nn.Module, example: torch.Tensor, path: Path) -> None:
    # torch.jit is deprecated upstream but still the format TorchScript/LibTorch users load.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=Warning)
        traced = torch.jit.trace(wrapper, example, check_trace=False)
        traced.save(str(path))


def export_safetensors(ckpt: str | Path, path: Path, model_id: str) -> None:
    """The checkpoint's weights (the EMA average when trained with EMA), out-of-domain model,
    hyper-parameters and threshold fit, nothing else, in one file with no pickle in it;
    ``Detector.from_checkpoint`` loads it."""
    checkpoint = load_checkpoint_file(ckpt)
    save_safetensors(checkpoint, path, {"model_id": model_id, "source": str(Path(ckpt).resolve())})


def run_exported(fmt: str, path: str | Path, images: torch.Tensor) -> torch.Tensor:
    """P(class 1) from an exported file for a float [0, 1] batch: the consumer's view."""
    if fmt == "safetensors":
        return Detector.from_checkpoint(path, device="cpu").score(images)
    if fmt == "onnx":
        import onnxruntime as ort  # deferred: needed only to check an ONNX export

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run([OUTPUT_NAMES[1]], {INPUT_NAME: images.numpy()})[0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=Warning)
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return module(images)[1]


def export(cfg: DictConfig) -> dict:
    """Write the model file and ``<file>.json``; check the file against PyTorch before leaving."""
    fmt = cfg.get("format")
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt} must be one of {', '.join(FORMATS)}")
    require_ckpt(cfg.get("ckpt"))
    out = output_target(
        cfg.get("output"), cfg.paths.output_dir, f"model{FORMATS[fmt]}", (FORMATS[fmt],)
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    detector = Detector.from_checkpoint(cfg.ckpt, device="cpu")
    # Ordinary convolutions in the file: ONNX Runtime and LibTorch optimise those themselves.
    wrapper = ExportWrapper(set_matmul_convs(detector.net, enabled=False)).eval()
    s = detector.image_size
    # Batch 2 for tracing: batch 1 could be specialised into the graph as a constant.
    example = torch.rand(2, 3, s, s, generator=torch.Generator().manual_seed(0))
    if fmt == "onnx":
        export_onnx(wrapper, example, out, int(cfg.opset))
    elif fmt == "safetensors":
        export_safetensors(cfg.ckpt, out, detector.model_id)
    else:
        export_torchscript(wrapper, example, out)

    # Self-check on a batch size the export never saw, so a fixed batch axis shows up here.
    check = torch.rand(3, 3, s, s, generator=torch.Generator().manual_seed(1))
    expected = detector.score(check)  # the API's own scoring: what predict.py gives
    diff = float((run_exported(fmt, out, check) - expected).abs().max())
    info = contract(detector, fmt, out, cfg.ckpt)
    info["check"] = {"batch": 3, "max_abs_diff_probability": diff}
    if fmt == "onnx":
        info["opset"] = int(cfg.opset)
    meta = out.with_name(out.name + ".json")
    meta.write_text(json.dumps(info, indent=2) + "\n")
    if diff > 1e-4:
        log.warning("exported model differs from PyTorch by %.2e on a random batch", diff)
    print(
        f"Exported {fmt}: {out} ({out.stat().st_size / 1e6:.1f} MB)\nContract: {meta}\n"
        f"Check against PyTorch (batch of 3): max abs diff {diff:.2e}"
    )
    return {"output": str(out), "contract": str(meta), "max_abs_diff": diff, **info}
