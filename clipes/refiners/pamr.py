"""PAMR, pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as NACLIP runs it.

A fixed affinity from the image (each pixel against its dilated 3x3 neighbours, colour differences
scaled by the local standard deviation, averaged over channels, softmax over the neighbours)
propagated ``iterations`` times over class scores. NACLIP applies it (10 steps, dilations 8 and 16)
to its query logits at the original size (``clipes.cams.dense_protocol``); ``PamrRefiner`` makes it
a pixel refiner after any CAM method: over [background (1 - max cam)^t, the image's CAMs], argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import DeviceRefiner, Refined, RefinerError
from .par import STENCIL, neighbours, shifted

__all__ = ["PAMR_DILATIONS", "PAMR_ITERATIONS", "PamrRefiner", "pamr", "pamr_affinity"]

PAMR_ITERATIONS = 10
PAMR_DILATIONS = (8, 16)


def pamr_affinity(image: Tensor, dilations: Sequence[int] = PAMR_DILATIONS) -> Tensor:
    """(B, K, H, W) image -> (B, 1, N, H, W) weights, N = 8 per dilation.

    Per channel: ``-|I_n - I| / (1e-8 + 0.1 s)``, ``s`` the unbiased std of the pixel's 9 * len(dilations)
    stencil values (the centre once per dilation); mean over channels; softmax over the neighbours.
    Neighbours are read with replicate padding, in raster order per dilation (the authors' kernels).
    """
    near = neighbours(image, dilations)  # (B, K, N, H, W)
    stencil = torch.cat([near, image.unsqueeze(2).expand(-1, -1, len(dilations), -1, -1)], dim=2)
    std = stencil.std(dim=2, keepdim=True)
    x = -(near - image.unsqueeze(2)).abs() / (1e-8 + 0.1 * std)
    return x.mean(dim=1, keepdim=True).softmax(dim=2)


def pamr(image: Tensor, scores: Tensor, iterations: int = PAMR_ITERATIONS,
         dilations: Sequence[int] = PAMR_DILATIONS) -> Tensor:
    """Scores (B, C, H, W) propagated ``iterations`` times along ``image`` (B, K, H, W), both float32 at
    the same size: each step a pixel's scores become the affinity-weighted sum of its neighbours'."""
    if image.shape[-2:] != scores.shape[-2:]:
        raise ValueError(f"PAMR: image {tuple(image.shape[-2:])} and scores {tuple(scores.shape[-2:])} differ in size")
    weights = pamr_affinity(image.float(), dilations)[:, 0]  # (B, N, H, W)
    h, w = scores.shape[-2:]
    for _ in range(iterations):  # neighbour by neighbour: no (B, C, N, H, W) tensor per step
        out = torch.zeros_like(scores)
        n = 0
        for d in dilations:
            padded = F.pad(scores, [d] * 4, mode="replicate")
            for dy, dx in STENCIL:
                out += weights[:, n:n + 1] * shifted(padded, d, dy, dx, h, w)
                n += 1
        scores = out
    return scores


class PamrRefiner(DeviceRefiner):
    """PAMR over [background, CAMs] with the background score (1 - max cam)^t, then the argmax (no
    ignore value). After a dense method (``--cam naclip`` ...) it runs on the query logits instead,
    where the authors put it."""

    name = "pamr"
    flags: ClassVar[dict[str, str]] = {"iterations": "--pamr-iterations"}

    def __init__(self, iterations: int = PAMR_ITERATIONS, dilations: Sequence[int] = PAMR_DILATIONS) -> None:
        if iterations < 1:
            raise RefinerError(f"--pamr-iterations {iterations}: give 1 or more")
        self.iterations = iterations
        self.dilations = tuple(dilations)

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "iterations": self.iterations, "dilations": list(self.dilations)}

    def refine(self, images: Sequence[Tensor], cams: Sequence[Tensor], labels: Sequence[Tensor],
               bg_power: float = 1.0) -> list[Refined]:
        out = []
        for image, cam, lab in zip(images, cams, labels, strict=True):
            cam = cam.float()
            if len(cam) == 0:
                out.append(Refined(torch.zeros(image.shape[:2], dtype=torch.uint8, device=cam.device)))
                continue
            bg = (1 - cam.amax(dim=0, keepdim=True)).clamp_min(0) ** bg_power
            scores = pamr(image.permute(2, 0, 1)[None].float(), torch.cat([bg, cam])[None], self.iterations,
                          self.dilations)[0]
            ids = torch.cat([lab.new_zeros(1), lab.to(cam.device) + 1])
            out.append(Refined(ids[scores.argmax(dim=0)].to(torch.uint8)))
        return out
