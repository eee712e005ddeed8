"""TagCLIP's region geometry: boxes of connected components to refine in (its ``scoremap2bbox`` and
``mask_attn``), and the crops of class-wise reidentification (``cwr``), with the authors' clipping and early
return (see ``tagclip.py`` and ``tagclip-reference.md``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["RELATIVE_THRESHOLD", "BoxRefinement", "CropRegions", "component_box_mask", "crop_regions",
           "refine_in_boxes"]

RELATIVE_THRESHOLD = 0.5  # cwr candidates, cwr region mask and final labels (VOC and COCO settings)


def component_box_mask(binary: Tensor) -> tuple[Tensor, Tensor]:
    """Union of the clipped bounding boxes of the 8-connected components of (M, h, w) maps.

    A box (x0, y0, x1, y1) = (left, top, min(right + 1, w - 1), min(bottom + 1, h - 1)) covers rows
    y0..y1-1 and columns x0..x1-1, as the authors' ``scoremap2bbox`` and slicing do: the last row and
    column are never covered. Components are labelled on the device by propagating the largest
    patch index through 3 x 3 neighbourhoods. Returns the (M, h, w) mask and the boxes as
    (K, 5) rows (map, x0, y0, x1, y1).
    """
    m, h, w = binary.shape
    n = h * w
    dev = binary.device
    keep = binary[:, None].float()
    ids = torch.arange(1, n + 1, device=dev, dtype=torch.float32).view(1, 1, h, w)
    lab = ids * keep
    while True:
        new = lab
        for _ in range(4):
            new = F.max_pool2d(new, 3, stride=1, padding=1) * keep
        if torch.equal(new, lab):
            break
        lab = new
    lab = lab.view(m, n).long()
    key = (lab + torch.arange(m, device=dev)[:, None] * (n + 1)).flatten()
    rows = torch.arange(h, device=dev).repeat_interleave(w).repeat(m)
    cols = torch.arange(w, device=dev).repeat(h).repeat(m)
    size = m * (n + 1)
    top = torch.full((size,), h, device=dev).scatter_reduce(0, key, rows, "amin")
    bottom = torch.full((size,), -1, device=dev).scatter_reduce(0, key, rows, "amax")
    left = torch.full((size,), w, device=dev).scatter_reduce(0, key, cols, "amin")
    right = torch.full((size,), -1, device=dev).scatter_reduce(0, key, cols, "amax")
    found = (bottom >= 0) & (torch.arange(size, device=dev) % (n + 1) != 0)
    which = found.nonzero().flatten()
    owner = which // (n + 1)
    y0, x0 = top[which], left[which]
    y1, x1 = (bottom[which] + 1).clamp(max=h - 1), (right[which] + 1).clamp(max=w - 1)
    diff = torch.zeros((m, h + 1, w + 1), device=dev, dtype=torch.int32)
    one = torch.ones_like(owner, dtype=torch.int32)
    for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        diff.index_put_((owner, ys, xs), sign * one, accumulate=True)
    mask = diff.cumsum(1).cumsum(2)[:, :h, :w] > 0
    return mask, torch.stack([owner, x0, y0, x1, y1], dim=1)


@dataclass
class BoxRefinement:
    """``refine_in_boxes``' result: the refined (B, N, C) scores and how the boxes were found."""

    refined: Tensor
    mean: Tensor       # (B, C) mean of the min-max normalised column
    threshold: Tensor  # (B, C) int(mean * 255), the binarisation threshold of the uint8 map
    box_mask: Tensor   # (B, N, C) patches inside the column's boxes
    boxes: Tensor      # (K, 6) rows (image, class, x0, y0, x1, y1)


def refine_in_boxes(smoothed: Tensor, coarse: Tensor, attn: Tensor, grid: tuple[int, int]) -> BoxRefinement:
    """The authors' ``mask_attn`` for every column at once.

    Each column of ``smoothed`` (B, N, C) is min-max normalised, cut to uint8 and binarised above
    int(mean * 255); the boxes of its components restrict the attention's source patches, through
    which the ``coarse`` scores are propagated again. Columns whose maximum is not positive keep
    their smoothed scores. A constant column (the authors' code fails on it) gets no box.
    """
    b, n, c = smoothed.shape
    col = smoothed.transpose(1, 2).contiguous()  # each column contiguous, as the authors reduce it
    t = col - col.amin(dim=-1, keepdim=True)
    t = torch.nan_to_num(t / t.amax(dim=-1, keepdim=True), nan=0.0)
    mean = t.mean(dim=-1)
    threshold = (mean * 255).to(torch.int64)
    binary = (t * 255).to(torch.uint8) > threshold[..., None]
    mask, boxes = component_box_mask(binary.view(b * c, *grid))
    box_mask = mask.view(b, c, n).transpose(1, 2)
    refined = attn @ (coarse * box_mask)
    refined = torch.where((col.amax(dim=-1) > 0)[:, None, :], refined, smoothed)
    boxes = torch.cat([torch.stack([boxes[:, 0] // c, boxes[:, 0] % c], dim=1), boxes[:, 1:]], dim=1)
    return BoxRefinement(refined, mean, threshold, box_mask, boxes)


@dataclass
class CropRegions:
    """``crop_regions``' result on the host: per image, the classes to reidentify and their crops."""

    threshold: Tensor                           # (B,) candidate threshold over the refined scores
    candidates: list[list[int]]                 # classes above it, ascending
    boxes: list[list[tuple[int, int, int, int]]]  # per processed candidate (y1, y2, x1, x2), patch units
    early_return: list[int]                     # the candidate that stopped cwr, -1 if none
    region: Tensor                              # (B, C_fg, h, w) each class's region mask


def crop_regions(refined: Tensor, scores: Tensor, grid: tuple[int, int], rel: float = RELATIVE_THRESHOLD
                 ) -> CropRegions:
    """The crops of the authors' ``cwr``: candidates, their region boxes and the early return.

    Candidates are the foreground classes whose score passes min + rel (max - min) of all refined
    scores (background columns included). A class's region is where its min-max normalised column
    exceeds 0.5; the crop is the region's bounding box with its end clipped to the grid's last
    row / column. A candidate whose crop is then empty stops cwr for itself and every later one.
    """
    b = refined.shape[0]
    num_fg = scores.shape[1]
    flat = refined.reshape(b, -1)
    lo, hi = flat.amin(dim=1), flat.amax(dim=1)
    threshold = lo + rel * (hi - lo)
    col = refined[:, :, :num_fg].transpose(1, 2).contiguous()
    t = col - col.amin(dim=-1, keepdim=True)
    t = t / t.amax(dim=-1, keepdim=True)
    region = (t > 0.5).view(b, num_fg, *grid)

    def span(present: Tensor, size: int) -> tuple[Tensor, Tensor]:
        first = present.to(torch.uint8).argmax(dim=-1)
        last = size - present.flip(-1).to(torch.uint8).argmax(dim=-1)
        none = ~present.any(dim=-1)
        return first.masked_fill(none, 0), last.masked_fill(none, 0).clamp(max=size - 1)

    y1, y2 = span(region.any(dim=-1), grid[0])
    x1, x2 = span(region.any(dim=-2), grid[1])
    cand = (scores > threshold[:, None]).cpu()
    y1, y2, x1, x2 = (v.cpu() for v in (y1, y2, x1, x2))
    candidates, boxes, early = [], [], []
    for i in range(b):
        classes = [int(k) for k in cand[i].nonzero().flatten()]
        done, stop = [], -1
        for k in classes:
            box = (int(y1[i, k]), int(y2[i, k]), int(x1[i, k]), int(x2[i, k]))
            if box[0] == box[1] or box[2] == box[3]:
                stop = k
                break
            done.append(box)
        candidates.append(classes)
        boxes.append(done)
        early.append(stop)
    return CropRegions(threshold, candidates, boxes, early, region)
