"""Softmax-GradCAM (CLIP-ES): the last block's normalised input weighted by its gradient, patch-averaged.

The computation is ``clipes.cam.softmax_gradcam``; this module puts it behind the CAM-method seam.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..cam import CamPairs, softmax_gradcam, softmax_gradcam_per_pair
from .base import CamMaps, CamMethod

__all__ = ["GradCam"]


class GradCam(CamMethod):
    """CLIP-ES's softmax-GradCAM on the last block, normalised twice as the reference does."""

    name = "gradcam"

    def __call__(self, visual: nn.Module, tokens: Tensor, pairs: CamPairs, logit_scale: float,
                 grid: tuple[int, int], attn_blocks: range) -> CamMaps:
        run = softmax_gradcam_per_pair if self.per_pair else softmax_gradcam
        cams, probs, last_attn = run(visual, tokens, pairs, logit_scale, grid)
        attention = last_attn[:, 1:, 1:].float()
        if len(visual.transformer.resblocks) - 1 not in attn_blocks:  # e.g. TagCLIP's blocks [-8:-1]
            attention = torch.zeros_like(attention)
        return CamMaps(cams, probs, attention)
