"""Class-aware attention affinity (CAA): refine CAMs with the ViT's own attention, inside class boxes."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

from .cam import minmax_normalize

__all__ = ["box_mask", "refine_cams", "sinkhorn_affinity", "upsample"]


def sinkhorn_affinity(attn: Tensor, rounds: int = 3) -> Tensor:
    """Attention (…, n, n) -> symmetric, near doubly-stochastic affinity T, squared (T @ T), in fp32."""
    t = attn.float()
    for _ in range(rounds):
        t = t / t.sum(dim=-2, keepdim=True)
        t = t / t.sum(dim=-1, keepdim=True)
    t = (t + t.transpose(-2, -1)) / 2
    return t @ t


def _boxes_mask(binary: np.ndarray) -> np.ndarray:
    """1 inside the bounding box of every 8-connected region, with the reference's border clipping."""
    h, w = binary.shape
    mask = np.zeros((h, w), dtype=np.float32)
    labelled, count = ndimage.label(binary, structure=np.ones((3, 3), dtype=bool))
    for ys, xs in ndimage.find_objects(labelled)[:count]:
        # cv2.boundingRect gives x0, x0 + w; the reference then clips x1 to W - 1 (and y1 to H - 1).
        mask[ys.start:min(ys.stop, h - 1), xs.start:min(xs.stop, w - 1)] = 1.0
    return mask


def box_mask(cam: Tensor, threshold: float) -> Tensor:
    """Per-class box masks (k, h*w) from CAMs (k, h, w) in [0, 1].

    A pixel is foreground when ``uint8(cam * 255) > int(threshold * max(uint8(cam * 255)))``; the
    mask is 1 inside the bounding box of each connected foreground region, 0 elsewhere.
    """
    quantised = (cam.detach().float() * 255).to(torch.uint8).cpu().numpy()
    masks = []
    for q in quantised:
        binary = q > int(threshold * int(q.max()))
        masks.append(_boxes_mask(binary))
    out = np.stack(masks) if masks else np.zeros((0, *cam.shape[1:]), dtype=np.float32)
    return torch.from_numpy(out.reshape(len(masks), -1)).to(cam.device)


def refine_cams(affinity: Tensor, cam: Tensor, mask: Tensor) -> Tensor:
    """``(T * mask[None, :]) @ vec(cam)`` per class: (n, n), (k, h, w), (k, n) -> (k, h, w), unnormalised.

    Masking T's columns equals masking the CAM before the product (the mask is 0/1), so one
    (k, n) @ (n, n) product serves every class.
    """
    masked = cam.flatten(1).float() * mask.float()
    return (masked @ affinity.float().T).view_as(cam)


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Min-max normalise each map, then resize (k, h, w) to ``size`` (bilinear, half-pixel centres)."""
    maps = minmax_normalize(maps.float())
    if maps.shape[0] == 0:
        return maps.new_zeros((0, *size))
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]
