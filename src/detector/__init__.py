"""Detector of AI-generated images: ResNet50 + Squeeze-and-Excitation head, Lightning + Hydra."""

__version__ = "0.1.0"

__all__ = ["Detector", "__version__"]


def __getattr__(name: str):
    # Lazy, so that `import detector` (and every `detector.x` submodule import) stays cheap and
    # does not pull in torch/Lightning until the API is used.
    if name == "Detector":
        from detector.api import Detector  # deferred: torch, only when the API is used

        return Detector
    raise AttributeError(f"module 'detector' has no attribute {name!r}")
