"""PAR, AFA's pixel-adaptive refinement (Ru et al., CVPR 2022), exact to the authors' code.

A fixed, image-derived local affinity (colour differences over dilated 3x3 neighbourhoods plus a
position term) propagated over class maps. No training, no compiled package: a few tensor
operations, batched, in float32 on any device. ``par`` is AFA's ``PAR`` module; ``ParRefiner``
makes AFA's pseudo labels from clipes' refined CAMs as ``refine_cams_with_bkg_v2`` does: a
background channel at a high and a low threshold, PAR at half resolution, the upsampled argmax,
255 where the two runs disagree about background. See ``par-reference.md`` for every constant.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..masks import IGNORE
from ..method_options import REFINER_FLAGS
from .base import DeviceRefiner, Refined, RefinerError

__all__ = ["BG_HIGH", "BG_LOW", "COCO_ITERATIONS", "DILATIONS", "ITERATIONS", "STENCIL", "ParRefiner", "afa_image",
           "afa_masks", "afa_refine", "combine_runs", "denorm_lut", "neighbours", "par", "par_affinity",
           "par_iterations", "position_softmax", "propagate", "shifted", "upsampled_keys", "working_size"]

DILATIONS = (1, 2, 4, 8, 12, 24)  # VOC and COCO
ITERATIONS = 10  # VOC and any other class set (AFA's dist_train_voc.py)
COCO_ITERATIONS = 15  # AFA's dist_train_coco.py: PAR(num_iter=15, ...)
W1 = 0.3  # temperature of both the colour and the position term
W2 = 0.01  # weight of the position softmax
BG_HIGH, BG_LOW = 0.55, 0.35  # AFA's background scores for pseudo labels
# working-size pixels per batch: the affinity's intermediates take about 1 KB a pixel
MAX_PIXELS = 2**20
NORM_MEAN = (123.675, 116.28, 103.53)  # AFA's RGB normalisation
NORM_STD = (58.395, 57.12, 57.375)
# the 8 neighbours of a 3x3 stencil in raster order without the centre, (dy, dx), dy = row
STENCIL = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def shifted(padded: Tensor, d: int, dy: int, dx: int, h: int, w: int) -> Tensor:
    """The (h, w) window of a tensor replicate-padded by ``d``, displaced by (dy, dx) * d."""
    y, x = d + dy * d, d + dx * d
    return padded[..., y:y + h, x:x + w]


def neighbours(x: Tensor, dilations: Sequence[int] = DILATIONS) -> Tensor:
    """(B, C, h, w) -> (B, C, 8 * len(dilations), h, w): each pixel's dilated 3x3 neighbours.

    Neighbour n = 8 * (index of d) + stencil index, read at (clamp(y + dy*d), clamp(x + dx*d)):
    the replicate border of AFA's one-hot dilated convolutions, as an exact gather.
    """
    h, w = x.shape[-2:]
    out = []
    for d in dilations:
        padded = F.pad(x, [d] * 4, mode="replicate")
        out += [shifted(padded, d, dy, dx, h, w) for dy, dx in STENCIL]
    return torch.stack(out, dim=2)


def position_softmax(dilations: Sequence[int] = DILATIONS, w1: float = W1) -> Tensor:
    """The position term, the same at every pixel: softmax over n of -((p_n / (std p + 1e-8)) / w1)^2.

    p_n is d for axial and d * sqrt(2) (float32) for diagonal neighbours; std is unbiased.
    """
    ring = torch.ones(len(STENCIL))
    ring[[i for i, (dy, dx) in enumerate(STENCIL) if dy and dx]] = math.sqrt(2)
    p = torch.cat([ring * d for d in dilations])
    return (-((p / (p.std() + 1e-8) / w1) ** 2)).softmax(dim=0)


def par_affinity(image: Tensor, dilations: Sequence[int] = DILATIONS, w1: float = W1, w2: float = W2) -> Tensor:
    """(B, 3, h, w) float32 image -> (B, 1, N, h, w) weights, fixed for every iteration.

    softmax over the N neighbours of the channel mean of -((|I_n - I| / (s + 1e-8)) / w1)^2, s the
    unbiased std of the N neighbour values per channel, plus w2 times the position softmax. The N
    weights of a pixel sum to 1 + w2 and are not renormalised (as the authors').
    """
    g = neighbours(image, dilations)
    s = g.std(dim=2, keepdim=True).add_(1e-8)
    # in place, in the authors' order: -((|g - I| / (s + 1e-8) / w1) ** 2); g is not needed after
    k = g.sub_(image.unsqueeze(2)).abs_().div_(s).div_(w1).square_().neg_()
    colour = k.mean(dim=1, keepdim=True).softmax(dim=2)
    return colour.add_(w2 * position_softmax(dilations, w1).to(image.device).view(1, 1, -1, 1, 1))


def propagate(masks: Tensor, affinity: Tensor, dilations: Sequence[int] = DILATIONS,
              iterations: int = ITERATIONS) -> Tensor:
    """``iterations`` steps of M[k, y, x] <- sum_n A[n, y, x] M[k, neighbour n of (y, x)].

    Channels are independent and share the (B, 1, N, h, w) affinity; the centre never enters;
    no renormalisation. The sum runs over n in order, one neighbour at a time (a fused
    multiply-add), which keeps the memory at one map instead of N; the authors' gather-and-sum
    rounds differently, by about 1e-7.
    """
    h, w = masks.shape[-2:]
    for _ in range(iterations):
        out = torch.zeros_like(masks)
        n = 0
        for d in dilations:
            padded = F.pad(masks, [d] * 4, mode="replicate")
            for dy, dx in STENCIL:
                out.addcmul_(affinity[:, :, n], shifted(padded, d, dy, dx, h, w))
                n += 1
        masks = out
    return masks


def par(image: Tensor, masks: Tensor, dilations: Sequence[int] = DILATIONS, iterations: int = ITERATIONS,
        w1: float = W1, w2: float = W2) -> Tensor:
    """AFA's ``PAR(image, masks)``: (B, 3, h, w) and (B, K, hm, wm) float32 -> (B, K, h, w).

    Masks of another size are first resized to the image's (bilinear, align_corners=True).
    """
    if image.ndim != 4 or image.shape[1] != 3 or masks.ndim != 4 or masks.shape[0] != image.shape[0]:
        raise ValueError(f"PAR takes (B, 3, h, w) images and (B, K, h, w) masks, not {tuple(image.shape)} "
                         f"and {tuple(masks.shape)}")
    if masks.shape[-2:] != image.shape[-2:]:
        masks = F.interpolate(masks, size=image.shape[-2:], mode="bilinear", align_corners=True)
    return propagate(masks, par_affinity(image, dilations, w1, w2), dilations, iterations)


# ----------------------------------------------------------------------- AFA's pseudo-label path

@functools.cache
def denorm_lut() -> np.ndarray:
    """(3, 256) uint8: what AFA's float32 normalise / denormalise / uint8 round trip makes of each value.

    Not the identity: float error leaves a few values just below their integer and the cast to
    uint8 truncates (R 1, 6, 61, 62, G 56, B 42, 45 come out one lower).
    """
    v = np.arange(256, dtype=np.float32)
    lut = np.empty((3, 256), dtype=np.uint8)
    for c, (mean, std) in enumerate(zip(NORM_MEAN, NORM_STD, strict=True)):
        m, s = np.float32(mean), np.float32(std)
        lut[c] = ((v - m) / s * s + m).astype(np.uint8)
    lut.setflags(write=False)
    return lut


def afa_image(rgb: Tensor) -> Tensor:
    """(B, H, W, 3) uint8 RGB -> (B, 3, H, W) float32, the image AFA gives PAR: the round trip, then / 255.

    The values come from a table made on the CPU (a GPU divides by 255 as a product with 1/255).
    """
    table = torch.from_numpy(denorm_lut().astype(np.float32)) / 255.0
    x = rgb.permute(0, 3, 1, 2).long()
    return torch.stack([table[c].to(rgb.device)[x[:, c]] for c in range(3)], dim=1)


def working_size(height: int, width: int) -> tuple[int, int]:
    """AFA's PAR resolution: (H // 2, W // 2), at least one pixel (an image under 2 pixels stays as it is)."""
    return max(1, height // 2), max(1, width // 2)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def afa_masks(cams: Tensor, threshold: float, size: tuple[int, int]) -> Tensor:
    """PAR's masks in AFA: a background channel equal to ``threshold`` before (B, K, H, W) CAMs
    (classes in ascending order), resized to ``size``, softmax over the 1 + K channels."""
    bg = torch.full((cams.shape[0], 1, *cams.shape[-2:]), threshold, dtype=torch.float32, device=cams.device)
    return _resize(torch.cat([bg, cams.float()], dim=1), size).softmax(dim=1)


def afa_refine(rgb: Tensor, cams: Tensor, thresholds: Sequence[float] = (BG_HIGH, BG_LOW),
               dilations: Sequence[int] = DILATIONS, iterations: int = ITERATIONS) -> Tensor:
    """PAR's output at the working size for each background threshold: (B, T, 1 + K, h, w).

    ``rgb`` (B, H, W, 3) uint8, ``cams`` (B, K, H, W) with classes in ascending order. The image
    and the affinity are the same in every run, so the runs share one affinity (channels are
    independent in PAR).
    """
    size = working_size(*rgb.shape[1:3])
    image = _resize(afa_image(rgb), size)
    masks = torch.cat([afa_masks(cams, t, size) for t in thresholds], dim=1)
    out = par(image, masks, dilations, iterations)
    return out.view(out.shape[0], len(thresholds), -1, *size)


def upsampled_keys(out: Tensor, keys: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, C, h, w) scores resized to ``size`` (align_corners=False), argmax (first wins a tie),
    channel j -> ``keys[:, j]``: (B, H, W) long."""
    index = _resize(out, size).max(dim=1).indices
    return keys.gather(1, index.flatten(1)).view(index.shape)


def combine_runs(high: Tensor, low: Tensor) -> Tensor:
    """AFA's pseudo label: foreground from the high run, background where both runs say so, 255 elsewhere."""
    pseudo = high.clone()
    pseudo[high == 0] = IGNORE
    pseudo[(high == 0) & (low == 0)] = 0
    return pseudo.to(torch.uint8)


def par_iterations(class_set: str) -> int:
    """AFA's PAR iterations for a class set: 15 for COCO (``dist_train_coco.py``), 10 for VOC and others."""
    return COCO_ITERATIONS if class_set == "coco" else ITERATIONS


class ParRefiner(DeviceRefiner):
    """AFA's pseudo labels from clipes' refined CAMs, on the Labeler's device, batched, float32.

    ``bg_high`` / ``bg_low``: the background channel of the two runs (AFA: 0.55 / 0.35); pixels
    whose high run says background but low run does not are 255. ``bg_power`` is not used: the
    background is a constant score here, as in AFA. Images of equal size and class count run as
    one batch of at most ``max_pixels`` working-size pixels (an image larger than that alone);
    batching does not change the numbers.
    """

    name = "par"
    flags: ClassVar[dict[str, str]] = REFINER_FLAGS["par"]

    def __init__(self, bg_high: float = BG_HIGH, bg_low: float = BG_LOW, dilations: Sequence[int] = DILATIONS,
                 iterations: int = ITERATIONS, max_pixels: int = MAX_PIXELS) -> None:
        for key, value in (("bg_high", bg_high), ("bg_low", bg_low)):
            if not (math.isfinite(value) and 0 <= value <= 1):
                raise RefinerError(f"{self.flags[key]} {value}: a background score must be in [0, 1]")
        if bg_low > bg_high:
            raise RefinerError(f"--par-bg-low {bg_low} is above --par-bg-high {bg_high}: the low run must give "
                               "less background")
        if isinstance(iterations, bool) or not float(iterations).is_integer() or iterations < 0:
            raise RefinerError(f"--par-iterations {iterations}: a whole number >= 0")
        if not dilations or any(int(d) < 1 for d in dilations):
            raise RefinerError("PAR needs positive dilations")
        self.bg_high, self.bg_low = float(bg_high), float(bg_low)
        self.dilations, self.iterations = tuple(int(d) for d in dilations), int(iterations)
        self.max_pixels = max_pixels

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "bg_high": self.bg_high, "bg_low": self.bg_low, "dilations": list(self.dilations),
                "iterations": self.iterations}

    def refine(self, images: Sequence[Tensor], cams: Sequence[Tensor], labels: Sequence[Tensor],
               bg_power: float = 1.0) -> list[Refined]:
        results: list[Refined | None] = [None] * len(images)
        batches: dict[tuple[int, int, int], list[int]] = {}  # equal size and class count batch exactly
        for i, (image, cam) in enumerate(zip(images, cams, strict=True)):
            if image.ndim != 3 or image.shape[-1] != 3 or cam.shape[1:] != image.shape[:2]:
                raise ValueError(f"PAR takes (H, W, 3) images and (k, H, W) CAMs of the same size, not "
                                 f"{tuple(image.shape)} and {tuple(cam.shape)}")
            batches.setdefault((*image.shape[:2], cam.shape[0]), []).append(i)
        chunks = []
        for (h, w, _), idx in batches.items():
            step = max(1, self.max_pixels // math.prod(working_size(h, w)))
            chunks += [(h, w, idx[i:i + step]) for i in range(0, len(idx), step)]
        for h, w, idx in chunks:
            order = [labels[i].to(cams[i].device).argsort() for i in idx]
            cam = torch.stack([cams[i][o] for i, o in zip(idx, order, strict=True)])
            keys = torch.stack([torch.cat([labels[i].new_zeros(1), labels[i][o.to(labels[i].device)] + 1])
                                for i, o in zip(idx, order, strict=True)]).to(cam.device)
            rgb = torch.stack([images[i] for i in idx]).to(cam.device)
            out = afa_refine(rgb, cam, (self.bg_high, self.bg_low), self.dilations, self.iterations)
            pseudo = combine_runs(upsampled_keys(out[:, 0], keys, (h, w)), upsampled_keys(out[:, 1], keys, (h, w)))
            for j, i in enumerate(idx):
                results[i] = Refined(pseudo[j])
        return results  # type: ignore[return-value]
