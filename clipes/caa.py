"""Class-aware attention affinity (CAA): refine CAMs with the ViT's own attention, inside class boxes."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .cam import minmax_normalize
from .defaults import CAA_BLOCKS, block_slice
from .errors import ClipesError

__all__ = ["CAA_BLOCKS", "box_mask", "caa_blocks", "refine_cams", "refine_pairs", "sinkhorn_affinity", "upsample",
           "upsample_batch"]

def caa_blocks(spec: str, depth: int) -> range:
    """The indices of the blocks (of ``depth``) whose attention CAA averages, given as a Python slice
    ``START:STOP``: ``-8:`` the last eight (CLIP-ES), ``-8:-1`` the seven before the last (TagCLIP's
    label-free VOC run)."""
    blocks = range(depth)[block_slice(spec)]
    if not blocks:
        raise ClipesError(f"--caa-blocks {spec!r}: selects none of the model's {depth} blocks")
    return blocks


def sinkhorn_affinity(attn: Tensor, rounds: int = 3) -> Tensor:
    """Attention (…, n, n) -> symmetric, near doubly-stochastic affinity T, squared (T @ T), in fp32."""
    t = attn.float()
    for _ in range(rounds):
        t = t / t.sum(dim=-2, keepdim=True)
        t = t / t.sum(dim=-1, keepdim=True)
    t = (t + t.transpose(-2, -1)) / 2
    return t @ t


def _components(binary: Tensor, rounds_per_check: int = 8) -> Tensor:
    """8-connected components of (P, h, w) booleans: every pixel of a region carries the region's
    largest flat index + 1 (0 on background). Label propagation by 3x3 max-pooling, on any device.

    Propagation past the fixed point changes nothing, so convergence is checked only every
    ``rounds_per_check`` rounds: each check waits for the device, the rounds between do not.
    """
    h, w = binary.shape[1:]
    ids = torch.arange(1, h * w + 1, device=binary.device, dtype=torch.float32).view(1, h, w)
    mask = binary.float()
    labels = ids * mask
    while True:
        before = labels
        for _ in range(rounds_per_check):
            labels = F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * mask
        if torch.equal(before, labels):
            return labels.long()


def _boxes_mask(binary: Tensor) -> Tensor:
    """1 inside the bounding box of every 8-connected region, with the reference's border clipping.

    As cv2.boundingRect then ``x1 = min(x0 + w, W - 1)``, ``y1 = min(y0 + h, H - 1)``: a region
    touching the last row or column loses it. Boxes are painted with 2-D prefix sums.
    """
    p, h, w = binary.shape
    n = h * w + 1
    labels = _components(binary).view(p, -1)
    rows = torch.arange(h, device=binary.device).repeat_interleave(w).expand(p, -1)
    cols = torch.arange(w, device=binary.device).repeat(h).expand(p, -1)
    key = (labels + torch.arange(p, device=binary.device)[:, None] * n).flatten()

    def reduce(values: Tensor, how: str, init: int) -> Tensor:
        out = torch.full((p * n,), init, device=binary.device, dtype=torch.long)
        return out.scatter_reduce(0, key, values.flatten(), how, include_self=True).view(p, n)

    y0, y1 = reduce(rows, "amin", h), (reduce(rows, "amax", -1) + 1).clamp(max=h - 1)
    x0, x1 = reduce(cols, "amin", w), (reduce(cols, "amax", -1) + 1).clamp(max=w - 1)
    keep = (y1 > y0) & (x1 > x0)
    keep[:, 0] = False  # background
    pi, ci = torch.nonzero(keep, as_tuple=True)
    diff = torch.zeros((p, h + 1, w + 1), device=binary.device, dtype=torch.long)
    for (ys, xs), sign in (((y0, x0), 1), ((y0, x1), -1), ((y1, x0), -1), ((y1, x1), 1)):
        diff.index_put_((pi, ys[pi, ci], xs[pi, ci]), torch.full_like(pi, sign), accumulate=True)
    return (diff.cumsum(1).cumsum(2)[:, :h, :w] > 0).float()


def box_mask(cam: Tensor, threshold: float) -> Tensor:
    """Per-class box masks (k, h*w) from CAMs (k, h, w) in [0, 1], on the CAMs' device.

    A pixel is foreground when ``uint8(cam * 255) > int(threshold * max(uint8(cam * 255)))``; the
    mask is 1 inside the bounding box of each connected foreground region, 0 elsewhere.
    """
    if cam.shape[0] == 0:
        return cam.new_zeros((0, cam.shape[1] * cam.shape[2]))
    quantised = (cam.detach().float() * 255).to(torch.uint8).long()
    top = quantised.flatten(1).max(dim=1).values
    # int(threshold * max) in float64, as the reference computes it in numpy
    thr = torch.floor(top.double() * threshold).long()
    binary = quantised > thr[:, None, None]
    return _boxes_mask(binary).flatten(1).to(cam.dtype if cam.dtype.is_floating_point else torch.float32)


def refine_cams(affinity: Tensor, cam: Tensor, mask: Tensor) -> Tensor:
    """``(T * mask[None, :]) @ vec(cam)`` per class: (n, n), (k, h, w), (k, n) -> (k, h, w), unnormalised.

    Masking T's columns equals masking the CAM before the product (the mask is 0/1). One image's
    ``refine_pairs``: the same bits as when it is refined in a batch.
    """
    return refine_pairs(affinity[None], cam, mask, torch.zeros(cam.shape[0], dtype=torch.long, device=cam.device))


def refine_pairs(affinity: Tensor, cams: Tensor, masks: Tensor, image: Tensor, budget: int = 1 << 26) -> Tensor:
    """``refine_cams`` for the P (image, class) pairs of a batch at once: affinities (B, n, n), CAMs
    (P, h, w), box masks (P, n), the image of each pair (P,) -> (P, h, w).

    Each pair's map is its own rows of T times its masked CAM, multiplied and summed over the last
    dimension: no reduction is shared between pairs, so a pair gets the same bits in any batch (a
    matrix product's kernel would depend on how many pairs share it). ``budget`` bounds the
    elements of the (pairs, n, n) products made at once.
    """
    masked = cams.flatten(1).float() * masks.float()
    n = masked.shape[1]
    out = masked.new_empty(masked.shape)
    step = max(1, budget // max(n * n, 1))
    for s in range(0, masked.shape[0], step):
        rows = affinity.float()[image[s:s + step]]
        out[s:s + step] = rows.mul_(masked[s:s + step, None, :]).sum(dim=-1)
    return out.view_as(cams)


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Min-max normalise each map, then resize (k, h, w) to ``size`` (bilinear, half-pixel centres)."""
    maps = minmax_normalize(maps.float())
    if maps.shape[0] == 0:
        return maps.new_zeros((0, *size))
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]


def upsample_batch(maps: Tensor, counts: list[int], sizes: list[tuple[int, int]]) -> list[Tensor]:
    """``upsample`` for a batch: the maps (P, h, w) of every image in turn, ``counts[i]`` of them for
    image i, to its size ``sizes[i]`` -> one (counts[i], *sizes[i]) tensor per image.

    One resize for all the maps of a size. Every map is normalised and resized on its own (no
    reduction spans maps), so each image gets its ``upsample``, bit for bit.
    """
    maps = minmax_normalize(maps.float()) if maps.shape[0] else maps.float()
    starts = np.cumsum([0, *counts])
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        by_size.setdefault(tuple(size), []).append(i)
    out: list[Tensor] = [maps.new_zeros((0, *size)) for size in sizes]
    for size, members in by_size.items():
        pairs = [p for i in members for p in range(starts[i], starts[i + 1])]
        if not pairs:
            continue
        index = torch.tensor(pairs, device=maps.device)
        resized = F.interpolate(maps[index][None], size=size, mode="bilinear", align_corners=False)[0]
        at = 0
        for i in members:
            out[i] = resized[at:at + counts[i]]
            at += counts[i]
    return out
