"""Where the network looked: Grad-CAM (pytorch-grad-cam) and Integrated Gradients (Captum).

What these maps can tell: which regions or pixels moved the logit of the explained class, for
this model, on this image. What they cannot: they are not a map of "fake pixels" (the network
was never trained to localise anything, and both maps attribute a *score*, not a defect), they
do not prove the model is right, and two methods disagreeing is common. Grad-CAM's resolution
is the chosen layer's feature map (ResNet50's last layer is 1x1 at 32 px, hence the automatic
choice of an earlier layer); Integrated Gradients depends on its baseline (black here).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

from detector.evaluation.tile_map import explain_file
from detector.files import describe_error
from detector.tasks.inputs import (
    image_paths,
    load_detector,
    require_ckpt,
    require_some_read,
    warn_unreadable,
    write_rows,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

from detector.errors import ConfigError

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger(__name__)

# Grad-CAM maps coarser than this say little; "auto" picks the deepest layer at least this fine.
MIN_CAM_SIDE = 4


@dataclass
class Explanation:
    """Maps for a batch; ``gradcam`` is in [0, 1], ``ig`` is signed (channel sum of Captum's
    attributions: positive pushed towards the explained class, negative away from it)."""

    probability: torch.Tensor  # (N,) P(class 1)
    target: torch.Tensor  # (N,) class index explained
    gradcam: torch.Tensor  # (N, S, S)
    ig: torch.Tensor  # (N, S, S)
    ig_delta: torch.Tensor  # (N,) completeness error of the IG integral
    layer: str
    cam_size: tuple[int, int]


def _net(model: nn.Module) -> nn.Module:
    """Accepts the Lightning module or the bare SEClassifier."""
    return getattr(model, "net", model)


def gradcam_layer(
    model: nn.Module, image_size: int, name: str | None = "auto"
) -> tuple[str, nn.Module]:
    """The layer Grad-CAM reads: ``name`` inside the network, or with ``auto`` the deepest
    backbone stage whose feature map is at least ``MIN_CAM_SIDE`` cells wide."""
    net = _net(model)
    if name not in (None, "", "auto"):
        try:
            return name, net.get_submodule(name)
        except AttributeError as e:
            stages = [f"backbone.{f['module']}" for f in getattr(net.backbone, "feature_info", [])]
            raise ConfigError(
                f"gradcam_layer={name}: no such module in the network (try one of "
                f"{', '.join(stages) or 'backbone'})"
            ) from e
    stages = [
        (f"backbone.{f['module']}", int(f["reduction"]))
        for f in getattr(net.backbone, "feature_info", [])
    ]
    if not stages:
        return "backbone", net.backbone
    fine_enough = [s for s in stages if image_size // s[1] >= MIN_CAM_SIDE]
    chosen = fine_enough[-1][0] if fine_enough else stages[0][0]
    return chosen, net.get_submodule(chosen)


class _SignedLogits(nn.Module):
    """(N, 2) = (-logit, logit): class c's score is column c, so Captum's ``target`` works."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = self.net(x)
        return torch.stack([-logit, logit], dim=1)


@contextmanager
def _frozen_eval(net: nn.Module):
    """Eval mode and no parameter gradients for the duration: explaining must leave a model
    exactly as it found it (no BatchNorm updates, no ``.grad`` left behind)."""
    was_training = net.training
    flags = [(p, p.requires_grad) for p in net.parameters()]
    net.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        net.train(was_training)


@contextmanager
def _single_view(net: nn.Module):
    """Grad-CAM pairs one hooked activation with each image; with ``flip_average`` the layer
    would see every image twice (itself and its mirror), so Grad-CAM maps the image as given.
    The probability and Integrated Gradients still come from the whole (averaged) model."""
    flip = getattr(net, "flip_average", False)
    net.flip_average = False
    try:
        yield
    finally:
        net.flip_average = flip


def _attributions(net: nn.Module, x, targets, layer_module, n_steps, internal_batch_size):
    """Grad-CAM, with the hooked layer's size read while the hooks still hold it (the figure
    titles say how coarse the map really was), then Integrated Gradients from black."""
    # deferred: captum and grad-cam are heavy and needed only here
    from captum.attr import IntegratedGradients
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

    with _single_view(net), GradCAM(model=net, target_layers=[layer_module]) as cam:
        cams = cam(
            input_tensor=x.clone().requires_grad_(True),
            targets=[BinaryClassifierOutputTarget(int(t)) for t in targets],
        )
        cam_size = tuple(cam.activations_and_grads.activations[0].shape[-2:])
    ig = IntegratedGradients(_SignedLogits(net))
    attributions, delta = ig.attribute(
        x.clone().requires_grad_(True),
        baselines=torch.zeros_like(x),
        target=targets.tolist(),
        n_steps=n_steps,
        internal_batch_size=internal_batch_size,
        return_convergence_delta=True,
    )
    return cams, cam_size, attributions, delta


def explain_maps(
    model: nn.Module,
    images: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    threshold: float | None = None,
    layer: str | None = "auto",
    n_steps: int = 32,
    internal_batch_size: int | None = 64,
) -> Explanation:
    """Grad-CAM and Integrated Gradients for a uint8 batch (N, 3, S, S).

    ``target`` is the class index to explain (default: the predicted one, by ``threshold``,
    which defaults to the module's own). Gradients are switched on here, so it also works
    right after ``trainer.test`` or inside ``torch.inference_mode``.
    """
    net = _net(model)
    if threshold is None:
        threshold = float(getattr(model, "threshold", 0.5))
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, S, S), got {tuple(images.shape)}")
    device = next(net.parameters()).device
    size = int(images.shape[-1])
    layer_name, layer_module = gradcam_layer(net, size, layer)
    with _frozen_eval(net):
        # Same values as the uint8 path of SEClassifier.normalize, but differentiable.
        x = images.to(device).float() / 255.0
        with torch.no_grad():
            probability = net.probability(x)
        if target is None:
            targets = (probability >= threshold).long()
        else:
            targets = torch.as_tensor(target, device=device).long().expand(len(x)).clone()
        if ((targets != 0) & (targets != 1)).any():
            raise ConfigError(f"target={target} must be the class index 0 or 1")
        cams, cam_size, attributions, delta = _attributions(
            net, x, targets, layer_module, n_steps, internal_batch_size
        )
    return Explanation(
        probability=probability.detach().cpu(),
        target=targets.cpu(),
        gradcam=torch.from_numpy(np.asarray(cams, dtype=np.float32)),
        ig=attributions.detach().sum(1).cpu(),
        ig_delta=delta.detach().float().cpu(),
        layer=layer_name,
        cam_size=(int(cam_size[0]), int(cam_size[1])),
    )


# Nearest-neighbour upsampling for display: each pixel the model saw stays one visible block,
# and nothing finer than the model's input is invented (Grad-CAM's own map is already smoothed
# to the input size by pytorch-grad-cam).
def _upsample_image(image: torch.Tensor, size: int) -> np.ndarray:
    pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    return np.asarray(pil.resize((size, size), Image.NEAREST))


def _upsample_map(m: torch.Tensor, size: int) -> np.ndarray:
    up = torch.nn.functional.interpolate(m[None, None].float(), size=(size, size), mode="nearest")
    return up[0, 0].cpu().numpy()


def draw_explanations(
    images: torch.Tensor,
    result: Explanation,
    class_names: Sequence[str],
    titles: Sequence[str] | None = None,
    display_size: int = 224,
) -> plt.Figure:
    """One row per image: the input, Grad-CAM over it, Integrated Gradients over it, all shown
    at ``display_size`` pixels."""
    n = len(images)
    s = int(images.shape[-1])
    fig, axes = plt.subplots(n, 3, figsize=(9, 3.2 * n + 0.3), squeeze=False)
    for i in range(n):
        img = _upsample_image(images[i], display_size)
        grey = img.mean(axis=2)
        cls = class_names[int(result.target[i])]
        p = float(result.probability[i])
        p_cls = p if int(result.target[i]) == 1 else 1.0 - p
        ig = _upsample_map(result.ig[i], display_size)
        scale = float(np.percentile(np.abs(ig), 99)) or 1.0
        row = axes[i]
        row[0].imshow(img, interpolation="nearest")
        row[0].set_title((titles[i] + "\n" if titles else "") + f"input ({s} px)", fontsize=9)
        row[1].imshow(img, interpolation="nearest")
        cam = _upsample_map(result.gradcam[i], display_size)
        row[1].imshow(cam, cmap="jet", alpha=0.45, interpolation="nearest")
        h, w = result.cam_size
        # Grad-CAM keeps only positive evidence: an all-zero map means none at this layer.
        empty = ", empty" if float(result.gradcam[i].max()) == 0.0 else ""
        row[1].set_title(
            f"Grad-CAM for {cls} (P={p_cls:.3f})\n{result.layer}, {h}x{w} map{empty}", fontsize=9
        )
        row[2].imshow(grey, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        shown = np.clip(ig / scale, -1, 1)
        row[2].imshow(shown, cmap="bwr", vmin=-1, vmax=1, alpha=0.6, interpolation="nearest")
        row[2].set_title(
            f"Integrated Gradients for {cls}\nred: towards {cls}, blue: away", fontsize=9
        )
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    return fig


def _safe_stem(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem)[:60] or "image"


def _one(result: Explanation, j: int) -> Explanation:
    return Explanation(
        result.probability[j : j + 1],
        result.target[j : j + 1],
        result.gradcam[j : j + 1],
        result.ig[j : j + 1],
        result.ig_delta[j : j + 1],
        result.layer,
        result.cam_size,
    )


def _parse_target(target, names: Sequence[str]) -> int | None:
    if target is None:
        return None
    if str(target) in names:
        return list(names).index(str(target))
    if str(target) in ("0", "1"):
        return int(target)
    raise ConfigError(f"target={target} must be null, {names[0]}, {names[1]}, 0 or 1")


def _explain_chunk(detector, stack, ok, out_dir: Path, target, cfg) -> dict[int, dict]:
    """Maps for one batch of decoded images, one PNG each; returns their table rows."""
    names = detector.class_names
    result = explain_maps(
        detector.module,
        stack,
        target=target,
        threshold=detector.threshold,
        layer=cfg.gradcam_layer,
        n_steps=int(cfg.n_steps),
        internal_batch_size=int(cfg.batch_size),
    )
    rows = {}
    for j, (i, path) in enumerate(ok):
        pred = detector.decide(float(result.probability[j]))
        title = f"{Path(path).name}: {pred.label} (P({names[1]})={pred.probability:.3f})"
        fig = draw_explanations(
            stack[j : j + 1], _one(result, j), names, [title], int(cfg.display_size)
        )
        png = out_dir / f"{i:04d}_{_safe_stem(path)}.png"
        fig.savefig(png, dpi=int(cfg.dpi))
        plt.close(fig)
        rows[i] = {
            "path": path,
            "figure": png.name,
            f"prob_{names[0]}": round(1.0 - pred.probability, 7),
            f"prob_{names[1]}": round(pred.probability, 7),
            "label": pred.label,
            "explained": names[int(result.target[j])],
            "gradcam_layer": result.layer,
            "ig_delta": round(float(result.ig_delta[j]), 6),
        }
    return rows


def explained_rows(detector, paths, out_dir: Path, target, cfg, errors) -> Iterator[dict]:
    """One batch's rows (by input index) at a time, so the table grows while the maps are
    drawn; a file that does not decode gets an error row (and a place in ``errors``). A crop
    model gets its per-tile score map instead (:mod:`detector.evaluation.tile_map`)."""
    if detector.preprocessing.input == "crop":  # one figure of tile scores per image
        for i, path in enumerate(paths):
            try:
                png = out_dir / f"{i:04d}_{_safe_stem(path)}_tiles.png"
                yield {i: explain_file(detector, path, png, int(cfg.dpi))}
            except Exception as e:  # reported per row, the other images still run
                errors.append((path, describe_error(e)))
                yield {i: {"path": path, "error": describe_error(e)}}
        return
    batch = 1  # one image at a time: the progress bar moves per image (IG batches its steps)
    for start in range(0, len(paths), batch):
        ok, images, rows = [], [], {}
        for i, path in enumerate(paths[start : start + batch], start):
            try:
                images.append(detector.prepare(path).pixels)  # the checkpoint's contract
                ok.append((i, path))
            except Exception as e:  # reported per row, the other images still run
                msg = describe_error(e)
                errors.append((path, msg))
                rows[i] = {"path": path, "error": msg}
        if ok:
            stack = torch.stack(images)
            rows |= _explain_chunk(detector, stack, ok, out_dir, target, cfg)
        yield rows


def explain(cfg: DictConfig) -> dict:
    """Write one PNG per image (input, Grad-CAM, IG) and ``explanations.csv``."""
    require_ckpt(cfg.get("ckpt"))
    for key in ("n_steps", "batch_size", "display_size", "dpi"):
        if int(cfg[key]) <= 0:
            raise ConfigError(f"{key}={cfg[key]} must be a positive integer")
    paths = image_paths(cfg)
    limit = cfg.get("max_images")
    if limit is not None and int(limit) <= 0:
        raise ConfigError(f"max_images={limit} must be a positive integer or null (all)")
    if limit is not None and len(paths) > int(limit):
        log.info("explaining the first %d of %d images (max_images=null: all)", limit, len(paths))
        paths = paths[: int(limit)]
    detector = load_detector(cfg)
    names = detector.class_names
    target = _parse_target(cfg.get("target"), names)
    out_dir = Path(cfg.output) if cfg.get("output") else Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "explanations.csv"
    columns = ["path", "figure", f"prob_{names[0]}", f"prob_{names[1]}", "label"]
    columns += ["explained", "gradcam_layer", "ig_delta", "n_tiles", "tile_min", "tile_max"]
    columns += ["error"]
    errors: list[tuple[str, str]] = []
    rows = explained_rows(detector, paths, out_dir, target, cfg, errors)
    write_rows(table, "csv", columns, rows, "explain", cfg.get("progress"), len(paths))
    done = len(paths) - len(errors)
    warn_unreadable(log, errors)
    require_some_read(done, errors, len(paths), cfg.input, f"see {table}")
    print(f"Explained {done} of {len(paths)} images ({len(errors)} unreadable)\nFigures: {out_dir}")
    return {"output": str(out_dir), "table": str(table), "explained": done, "errors": len(errors)}
