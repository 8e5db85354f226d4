"""Knowing when not to answer: a density model of what the detector was trained on.

A binary detector gives every input a label, also an image unlike anything it learned (random
noise, a flat colour, another generator's images, a photograph at another scale), often with
high confidence. Density models of the training split look at three things, and at a fourth on
request:

* ``stages_nn``: the channel means and spreads of the backbone's early stages (1/4 and 1/8 of
  the input), textures and edges, where other image sources differ first; scored by the
  distance to the nearest training image (:mod:`detector.evaluation.neighbours`);
* ``log_stages``: the same statistics on a log scale, where a channel's relative change counts
  (a quiet channel that wakes up), not only its absolute one; one Gaussian per class with a
  shared covariance, scored by the smallest squared Mahalanobis distance to a class mean (Lee
  et al., NeurIPS 2018);
* ``image_nn``: statistics of the pixels at the model's input (channel means and spreads, the
  step between neighbours, the correlation of neighbours and of colour channels, fine detail
  at two scales, the energy of the spectrum in four bands, colourfulness and clipping): far
  from natural images for noise and flat colours, and different between sources of
  photographs (how they were resized, compressed, lit); nearest training image;
* ``features`` (``ood.feature=hidden`` or ``pooled``; default ``none``): the network's
  penultimate features. Measured, they separate other sources worse than the others and
  dilute them (docs/ood.md), so they are off unless asked for.

``ood_score`` is the geometric mean of the distances, each divided by its median on the
validation split (higher = less like the training data). Distances of in-domain images have
long right tails, and an arithmetic mean is set by whichever component's tail is longest; in
the mean of their logarithms an image moderately far on every component stands out (measured:
docs/ood.md); one component far beyond any validation image's (:data:`EXTREME`) is enough on
its own. The threshold is the ``quantile`` of the validation split's scores, so about
``1 - quantile`` of in-domain images are flagged by construction. The label is never changed:
``in_domain=false`` says it is unreliable.

Checkpoints from before (Gaussians of ``stages`` and ``image``; earlier ``stages`` and
``pixels``, 13 pixel statistics, and the arithmetic mean) load and score as they did: the state
says which components and which mean.

Everything is plain tensors and numbers, stored in the checkpoint under ``"ood"``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from detector.data.tiles import segment_mean
from detector.errors import ConfigError
from detector.evaluation.gaussians import Gaussians
from detector.evaluation.image_statistics import image_statistics, pixel_statistics
from detector.evaluation.neighbours import NearestNeighbours

# none: no network-feature component; hidden: the head's ReLU activations; pooled: the pooled
# backbone map
FEATURES = ("none", "hidden", "pooled")
STATE_KEYS = {"feature", "means", "precisions", "scales", "threshold", "quantile"}
NO_OOD_MODEL = (
    "this checkpoint has no out-of-domain model (trained before it existed, or with ood=null): "
    "ood_score and in_domain are left empty; python eval.py ckpt=... ood.refit=true fits one"
)


# In this order, those fitted. Only in older checkpoints: the Gaussians of ``stages`` and
# ``image`` (before their nearest-neighbour densities), ``pixels`` (13 statistics, before
# ``image``; those scored by the arithmetic mean of the components).
COMPONENTS = ("features", "stages", "stages_nn", "log_stages", "image", "image_nn", "pixels")
# Components scored by the distance to the nearest training image, not by Gaussians
NEAREST = ("stages_nn", "image_nn")
# The geometric mean floors each scaled distance at this share of its validation median, so that
# one component that happens to sit at a class mean cannot cancel another that is far off (no
# in-domain image measured came below it: the 1% quantiles were 0.3-0.5).
FLOOR = 0.25
# An image whose farthest component is beyond what this share of validation images reaches on
# any component scores at least at the geometric mean's threshold: a mean of three dilutes one
# far component (downsized noise: near on the stages, 37x the median on the image statistics)
# down to the threshold's edge (docs/ood.md).
EXTREME = 0.995


def log_scale(stages: torch.Tensor) -> torch.Tensor:
    """``log_stages`` from ``stages``: log(x + 0.001) of the (non-negative) statistics."""
    return torch.log(stages.float().abs() + 1e-3)


def _same(values: torch.Tensor) -> torch.Tensor:
    return values


# Components a fit derives from another one's values instead of collecting them: a second copy
# of every training image's early-stage statistics would double what a fit holds in memory.
DERIVED = {
    "log_stages": ("stages", log_scale),
    "stages_nn": ("stages", _same),
    "image_nn": ("image", _same),
}


def _part(parts: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name in parts or name not in DERIVED:
        return parts[name]
    source, transform = DERIVED[name]
    return transform(parts[source])


def fitted_components(feature: str) -> tuple[str, ...]:
    """What a new fit reads: the network's features when asked for, stages and the image."""
    return (*(("features",) if feature != "none" else ()), "stages_nn", "log_stages", "image_nn")


def sources(names: Iterable[str]) -> list[str]:
    """What components ``names`` are computed from (a derived one from its source), in order."""
    return list(dict.fromkeys(DERIVED[k][0] if k in DERIVED else k for k in names))


@dataclass
class OODModel:
    """One density model per component, their scales and the threshold on the mean score."""

    feature: str
    models: dict[str, Gaussians | NearestNeighbours]
    scales: dict[str, float]  # validation medians of each component's distance
    threshold: float
    quantile: float
    info: dict
    combine: str = "geometric"  # "mean": checkpoints from before the geometric mean
    # (the EXTREME quantile of the largest scaled distance on validation, the geometric mean's
    # threshold); None in checkpoints from before it
    extreme: tuple[float, float] | None = None

    def score(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Geometric (or, for older checkpoints, arithmetic) mean of the scaled distances of
        ``parts`` (component -> (N, D); one of :data:`DERIVED` may be left to its source),
        float32, CPU; at least ``anchor * largest / extreme`` (:data:`EXTREME`)."""
        distances = {k: g.distance(_part(parts, k)) for k, g in self.models.items()}
        return self.combine_distances(distances)

    def scaled(self, distances: dict[str, torch.Tensor]) -> torch.Tensor:
        """(components, N): each component's distances (component -> (N,)) over its scale."""
        return torch.stack([distances[k] / self.scales[k] for k in self.models])

    def combine_distances(self, distances: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`score` from each component's distances (component -> (N,))."""
        scaled = self.scaled(distances)
        if self.combine == "mean":
            return scaled.mean(0).float()
        score = scaled.clamp_min(FLOOR).log().mean(0).exp()
        if self.extreme is not None:
            extreme, anchor = self.extreme
            score = torch.maximum(score, anchor * scaled.max(0).values / extreme)
        return score.float()

    def score_batch(
        self, images: torch.Tensor, embedding, counts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The score of a batch at the model's input size and its
        :meth:`SEClassifier.embed` (the same call gives the probability); ``counts``: the
        number of tiles of each image, for a batch of tiles (a crop model)."""
        return self.score(components(images, embedding, list(self.models), counts, self.feature))

    def in_domain(self, scores: torch.Tensor) -> torch.Tensor:
        return scores <= self.threshold

    def state(self) -> dict:
        return {
            "method": f"{self.combine} mean of the scaled distances (Mahalanobis; nearest "
            "training image for *_nn) of " + ", ".join(self.models),
            "combine": self.combine,
            "extreme": self.extreme,
            "feature": self.feature,
            "means": {k: g.means for k, g in self._gaussians()},
            "precisions": {k: g.precision for k, g in self._gaussians()},
            "neighbours": {k: g.state() for k, g in self.models.items() if k in NEAREST},
            "scales": dict(self.scales),
            "threshold": self.threshold,
            "quantile": self.quantile,
            "info": self.info,
        }

    def _gaussians(self) -> list[tuple[str, Gaussians]]:
        return [(k, g) for k, g in self.models.items() if isinstance(g, Gaussians)]

    @classmethod
    def from_state(cls, state: dict | None) -> OODModel | None:
        if not state:
            return None
        if not isinstance(state, dict) or not set(state) >= STATE_KEYS:
            warnings.warn(
                "the checkpoint's out-of-domain model is of another version and is ignored "
                "(refit it with python eval.py ckpt=... ood.refit=true)",
                stacklevel=2,
            )
            return None
        neighbours = state.get("neighbours") or {}  # none before the nearest-neighbour ones
        models = {
            k: NearestNeighbours.from_state(neighbours[k])
            if k in neighbours
            else Gaussians(state["means"][k].double(), state["precisions"][k].double())
            for k in COMPONENTS
            if k in state["means"] or k in neighbours  # older checkpoints hold other components
        }
        return cls(
            feature=state["feature"],
            models=models,
            scales={k: float(v) for k, v in state["scales"].items()},
            threshold=float(state["threshold"]),
            quantile=float(state["quantile"]),
            info=dict(state.get("info") or {}),
            combine=state.get("combine", "mean"),  # saved before the geometric mean: "mean"
            extreme=tuple(state["extreme"]) if state.get("extreme") else None,
        )


def components(
    images: torch.Tensor,
    embedding,
    names: list[str] | tuple[str, ...],
    counts: torch.Tensor | None = None,
    feature: str = "none",
) -> dict[str, torch.Tensor]:
    """What each of the components ``names`` reads, from a batch and its embedding
    (``features``: the ``feature`` kind); for a batch of tiles (``counts`` tiles per image)
    each image's mean over its tiles. Those of :data:`DERIVED` come from their source's
    per-image values, as a fit derives them."""
    read = {
        "features": lambda: embedding.pooled if feature == "pooled" else embedding.hidden,
        "stages": lambda: embedding.stages,
        "image": lambda: image_statistics(images),
        "pixels": lambda: pixel_statistics(images),
    }
    parts = {k: read[k]() for k in sources(names)}
    if counts is not None:
        parts = {k: segment_mean(v.float(), counts) for k, v in parts.items()}
    return {k: _part(parts, k) for k in names}


def check_ood_settings(feature: str, quantile: float) -> None:
    if feature not in FEATURES:
        raise ConfigError(f"ood.feature={feature!r} must be one of {', '.join(FEATURES)}")
    if not 0.5 <= quantile < 1.0:
        raise ConfigError(f"ood.quantile={quantile} must be in [0.5, 1)")


def fit_ood(
    train: dict[str, torch.Tensor],
    labels: torch.Tensor,
    val: dict[str, torch.Tensor],
    feature: str,
    quantile: float,
) -> OODModel:
    """The density models of the training split's components (component -> (N, D); those
    of :data:`DERIVED` are computed from their source when it is there and they are not);
    scales and threshold from the validation split's."""
    names = [k for k in fitted_components(feature) if sources([k])[0] in train]
    models: dict[str, Gaussians | NearestNeighbours] = {}
    for k in names:
        if k in NEAREST:
            models[k] = NearestNeighbours.fit(_part(train, k))
        else:
            source, transform = (k, None) if k in train else DERIVED[k]
            models[k] = Gaussians.fit(train[source], labels, transform)
    val = {k: _part(val, k) for k in names}
    # Each validation distance once: the scales, the extreme and the threshold all read them.
    distances = {k: models[k].distance(val[k]) for k in names}
    scales = {k: float(d.median()) + 1e-12 for k, d in distances.items()}
    model = OODModel(feature, models, scales, float("inf"), quantile, {})
    largest = model.scaled(distances).max(0).values
    anchor = torch.quantile(model.combine_distances(distances).double(), quantile)
    model.extreme = (float(torch.quantile(largest, EXTREME)), float(anchor))
    val_scores = model.combine_distances(distances)
    model.threshold = float(torch.quantile(val_scores.double(), quantile))
    model.info = {
        "train_images": len(labels),
        "val_images": len(val_scores),
        "val_flagged": float((val_scores > model.threshold).float().mean()),
        "dims": {k: int(val[k].shape[1]) for k in names},
    }
    return model


def collect_features(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    prepare: Callable[[torch.Tensor], torch.Tensor],
    embed: Callable,
    feature: str,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(component -> (N, D), labels) of every batch, on the CPU: the components a fit reads,
    less those it derives (:data:`DERIVED`)."""
    collected = sources(fitted_components(feature))
    parts: dict[str, list[torch.Tensor]] = {}
    labels = []
    with torch.inference_mode():
        for images, targets, *counts in batches:  # counts: tiles per image (crop models)
            x = prepare(images)
            parts_of = components(x, embed(x), collected, *counts, feature=feature)
            for k, v in parts_of.items():
                parts.setdefault(k, []).append(v.float().cpu())
            labels.append(targets.cpu())
    return {k: torch.cat(v) for k, v in parts.items()}, torch.cat(labels)


def fit_on_data(model, datamodule, trainer, feature: str, quantile: float) -> OODModel:
    """Fit on ``datamodule``'s training split (densities) and validation split (scales,
    threshold), with ``model``'s current weights in float32, on the trainer's device.

    Under DDP every rank embeds its own shard and the features of all ranks are gathered, so
    every rank fits the same model (the same numbers as on one device).
    """
    check_ood_settings(feature, quantile)
    device = trainer.strategy.root_device
    model.to(device).eval()

    def prepare(images: torch.Tensor) -> torch.Tensor:
        return model.prepare(images.to(device))

    from detector.distributed import gather_rows  # Lightning: only fitting needs it, not scoring

    def gathered(loader) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        parts, labels = collect_features(loader, prepare, model.net.embed, feature)
        return {k: gather_rows(trainer, v) for k, v in parts.items()}, gather_rows(trainer, labels)

    train, labels = gathered(datamodule.features_dataloader())
    val, _ = gathered(datamodule.val_dataloader())
    return fit_ood(train, labels, val, feature, quantile)


def ood_summary(
    scores: torch.Tensor,
    ood: OODModel,
    probs: torch.Tensor,
    targets: torch.Tensor,
    class_names: list[str],
    positive_class: int,
    threshold: float,
) -> dict:
    """How many test images are flagged, and the metrics on all of them vs the in-domain ones
    (what the labels are worth where the detector does answer)."""
    # torchmetrics takes a second to import: the report needs it, scoring does not
    from detector.evaluation.metrics import ranking_metrics, threshold_metrics

    keep = ood.in_domain(scores)
    out = {
        "threshold": ood.threshold,
        "quantile": ood.quantile,
        "feature": ood.feature,
        "components": list(ood.models),
        "n": len(scores),
        "n_flagged": int((~keep).sum()),
        "flagged": float((~keep).float().mean()) if len(scores) else float("nan"),
    }
    if keep.any():
        m = threshold_metrics(probs[keep], targets[keep], threshold, class_names, positive_class)
        m.update(ranking_metrics(probs[keep], targets[keep], positive_class))
        out["in_domain"] = {
            "n": int(keep.sum()),
            **{k: m[k] for k in ("accuracy", "balanced_accuracy", "auroc", "average_precision")},
        }
    return out


def format_ood(summary: dict) -> str:
    read = ", ".join(
        f"{summary['feature']} features" if c == "features" else c for c in summary["components"]
    )
    lines = [
        f"Out of domain ({read}; threshold "
        f"{summary['threshold']:.4g} = "
        f"the {summary['quantile']:.0%} quantile of validation scores)",
        f"  {summary['n_flagged']} of {summary['n']} images ({summary['flagged']:.1%}) are unlike "
        "the training data: their labels are unreliable",
    ]
    inside = summary.get("in_domain")
    if inside:
        lines.append(
            f"  on the {inside['n']} in-domain images: accuracy {inside['accuracy']:.4f}, "
            f"AUROC {inside['auroc']:.4f}"
        )
    return "\n".join(lines)
