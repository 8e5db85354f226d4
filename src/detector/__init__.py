"""Detector of AI-generated images: ResNet50 + Squeeze-and-Excitation head, Lightning + Hydra."""

__version__ = "0.1.0"
