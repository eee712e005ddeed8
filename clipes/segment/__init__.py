"""The final segmenter of CLIP-ES: models, training with the confidence-guided loss, inference."""

from .models import SEGMENTERS, build_segmenter

__all__ = ["SEGMENTERS", "build_segmenter"]
