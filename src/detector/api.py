"""Scoring one's own images outside Lightning: the :class:`Detector` Python API, which
predict.py, explain.py, export's checks and the robustness sweep score through.

Preprocessing is eval's, step for step, and the checkpoint's own (its preprocessing contract,
:mod:`detector.data.contract`): ``resize`` models see each image resized to S x S (bilinear,
only when not already S x S), ``crop`` models see its native-resolution tiles, whose logits are
aggregated into one probability; the network normalises inside its own ``forward``. In-memory
images (PIL, numpy, uint8 tensors) take the same steps, so a file and the decoded file give the
same probability.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from detector.data.contract import Prepared, Preprocessing
from detector.data.decode import DEFAULT_MAX_PIXELS
from detector.data.tiles import aggregate_logits
from detector.errors import ConfigError, DataError
from detector.files import describe_error, file_hash
from detector.scoring import ScoringModel, load_for_scoring

if TYPE_CHECKING:
    from detector.module import DetectorModule

log = logging.getLogger(__name__)


ImageInput = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor


def _load_module(path: str | Path) -> ScoringModel:
    """The network without Lightning (detector.scoring): the same weights-only loading and the
    same errors as eval's, in a fraction of the start-up."""
    return load_for_scoring(path)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(
            f"device={device!r} is not a torch device (cpu, cuda, cuda:1, auto)"
        ) from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r}: CUDA is not available here; use device=cpu")
    return resolved


@dataclass(frozen=True)
class Prediction:
    """One image's result. ``probability`` is P(``class_names[1]``), the network's own output."""

    label: str
    index: int
    probability: float
    probabilities: dict[str, float]
    threshold: float
    # How unlike the training data the image is (higher: less alike), and whether it is within
    # the checkpoint's out-of-domain threshold; None when the checkpoint has no such model.
    ood_score: float | None = None
    in_domain: bool | None = None
    # Tiles scored (1 for a resize model), and "WxH" when a resize model squashed a much larger
    # or non-square image (detector.data.contract).
    n_tiles: int = 1
    resized_from: str | None = None


class Detector:
    """A trained detector ready to score images.

    >>> d = Detector.from_checkpoint("best.ckpt", device="cpu")
    >>> d.predict(["cat.jpg", PIL.Image.open("dog.png"), uint8_chw_tensor])
    """

    def __init__(
        self,
        module: DetectorModule | ScoringModel,
        device: str | torch.device | None = "cpu",
        threshold: float | None = None,
        model_id: str = "",
        max_tiles: int | None = None,
        aggregate: str | None = None,
        max_pixels: int | None = None,
        jpeg_draft: bool | None = None,
    ) -> None:
        """``max_tiles`` and ``aggregate`` (crop models): None keeps the checkpoint's;
        ``max_pixels``: larger images are refused from their header (None: PIL's limit);
        ``jpeg_draft`` (resize models; None: True): JPEGs much larger than the model's input
        are decoded at reduced size before the exact resize, as eval's loaders do; False
        decodes every pixel (docs/speed.md: the tolerance)."""
        self.max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
        self.device = resolve_device(device)
        self.module = module.to(self.device).eval()
        self.net = self.module.net
        if threshold is None:
            threshold = module.threshold
        if not 0.0 <= float(threshold) <= 1.0:
            raise ConfigError(f"threshold={threshold} must be in [0, 1]")
        self.threshold = float(threshold)
        self.class_names: list[str] = list(module.hparams.class_names)
        # How the network saw images in training; every input goes through it.
        self.preprocessing = Preprocessing.from_hparams(
            module.hparams, max_tiles=max_tiles, aggregate=aggregate, jpeg_draft=jpeg_draft
        )
        self.image_size = self.preprocessing.image_size
        self.model_id = model_id
        self.ood = module.ood  # None: a checkpoint without an out-of-domain model

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str | torch.device | None = "cpu",
        threshold: float | None = None,
        **contract: Any,
    ) -> Detector:
        """A train.py checkpoint, or an ``export.py format=safetensors`` file.

        ``threshold=None`` keeps the one stored in the checkpoint (fitted on validation);
        ``contract``: ``max_tiles`` / ``aggregate`` overrides (None: the checkpoint's),
        ``max_pixels``, ``jpeg_draft``."""
        module = _load_module(path)
        model_id = getattr(module, "model_id", None) or file_hash(path)  # an export: its source's
        return cls(module, device=device, threshold=threshold, model_id=model_id, **contract)

    def prepare(self, image: ImageInput) -> Prepared:
        """The network's input for one image, as eval builds it from a file, by the
        checkpoint's preprocessing contract (:attr:`preprocessing`), and what was done to it.

        Accepts a path, a PIL image, a numpy array (H, W[, C]) or a uint8 tensor (C, H, W).
        """
        contract = self.preprocessing
        if isinstance(image, str | os.PathLike):
            try:
                return contract.prepare_file(str(image), self.max_pixels)
            except Exception as e:
                raise DataError(f"cannot read image {image}: {describe_error(e)}") from e
        if isinstance(image, Image.Image):
            return contract.prepare_pil(image)
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                raise TypeError(f"numpy images must be uint8 (H, W[, C]), got {image.dtype}")
            return contract.prepare_pil(Image.fromarray(image))
        if isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8:
                raise TypeError(
                    f"tensor images must be uint8 (C, H, W) in [0, 255], got {image.dtype}: "
                    "convert with (x * 255).round().to(torch.uint8)"
                )
            if image.ndim == 2:
                image = image[None]
            if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
                raise TypeError(f"tensor images must be (C, H, W) with C in 1, 3, 4: {image.shape}")
            if image.shape[0] == 3:
                return contract.prepare_tensor(image.cpu())
            return contract.prepare_pil(F.to_pil_image(image.cpu()))
        raise TypeError(f"cannot score an object of type {type(image).__name__}")

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """uint8 (3, S, S) for a resize model, (n_tiles, 3, S, S) for a crop model."""
        return self.prepare(image).pixels

    def _aggregate(self, logits: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        logits = logits.float()
        if counts is None:
            return logits
        return aggregate_logits(logits, counts.to(logits.device), self.preprocessing.aggregate)

    @torch.inference_mode()
    def score(self, images: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
        """P(class 1) per image, on the CPU, as eval's test step: ``images`` is a uint8 batch
        (N, 3, S, S), or for a crop model the tiles of N images one after another with
        ``counts`` the number of tiles of each."""
        x = images.to(self.device)
        return torch.sigmoid(self._aggregate(self.net(x), counts)).cpu()

    @torch.inference_mode()
    def score_with_ood(
        self, images: torch.Tensor, counts: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """P(class 1) and each image's ``ood_score`` (None without an out-of-domain model), in
        one pass: the logits of :meth:`SEClassifier.embed` equal :meth:`score`'s."""
        if self.ood is None:
            return self.score(images, counts), None
        x = images.to(self.device)
        embedding = self.net.embed(x)
        probs = torch.sigmoid(self._aggregate(embedding.logits, counts)).cpu()
        return probs, self.ood.score_batch(x, embedding, counts)

    def score_prepared(self, items: Sequence[Prepared]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`score_with_ood` of prepared images (from :meth:`prepare`), one pass."""
        if self.preprocessing.input == "resize":
            return self.score_with_ood(torch.stack([p.pixels for p in items]))
        counts = torch.tensor([p.n_tiles for p in items], dtype=torch.long)
        return self.score_with_ood(torch.cat([p.pixels for p in items]), counts)

    def _batches(self, inputs: Any, batch_size: int) -> Iterator[list[Prepared]]:
        if isinstance(inputs, torch.Tensor) and inputs.ndim == 4:
            items: Sequence = list(inputs)
        elif isinstance(inputs, str | os.PathLike | Image.Image | np.ndarray | torch.Tensor):
            items = [inputs]
        else:
            items = list(inputs)
        for start in range(0, len(items), batch_size):
            yield [self.prepare(x) for x in items[start : start + batch_size]]

    def predict_proba(
        self, inputs: ImageInput | Iterable[ImageInput], batch_size: int = 32
    ) -> torch.Tensor:
        """(N, 2) probabilities, columns in ``class_names`` order (like scikit-learn)."""
        batches = [self.score_prepared(b)[0] for b in self._batches(inputs, batch_size)]
        p1 = torch.cat(batches) if batches else torch.empty(0)
        return torch.stack([1.0 - p1, p1], dim=1)

    def predict(
        self, inputs: ImageInput | Iterable[ImageInput], batch_size: int = 32
    ) -> list[Prediction]:
        """One :class:`Prediction` per image (a single image also gives a list of one)."""
        out = []
        for batch in self._batches(inputs, batch_size):
            probs, ood = self.score_prepared(batch)
            ood_list = ood.tolist() if ood is not None else [None] * len(probs)
            out += [
                self.decide(p, s, item.n_tiles, item.resized_from)
                for p, s, item in zip(probs.tolist(), ood_list, batch, strict=True)
            ]
        return out

    def decide(
        self,
        p1: float,
        ood_score: float | None = None,
        n_tiles: int = 1,
        resized_from: str | None = None,
    ) -> Prediction:
        """Label by the threshold, as eval's report does (``p >= threshold`` is class 1)."""
        index = int(p1 >= self.threshold)
        names = self.class_names
        in_domain = None
        if ood_score is not None and self.ood is not None:
            in_domain = bool(ood_score <= self.ood.threshold)
        return Prediction(
            label=names[index],
            index=index,
            probability=p1,
            probabilities={names[0]: 1.0 - p1, names[1]: p1},
            threshold=self.threshold,
            ood_score=ood_score,
            in_domain=in_domain,
            n_tiles=n_tiles,
            resized_from=resized_from,
        )
