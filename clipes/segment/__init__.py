"""The final segmenter of CLIP-ES: encoders, heads and the registry composing them, training with the
confidence-guided loss, inference."""

from .registry import SEGMENTERS, build_segmenter

__all__ = ["SEGMENTERS", "build_segmenter"]
