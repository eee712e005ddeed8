"""The dense methods' protocol around the forward: resize, sliding windows, thresholds, PAMR.

Each step as the authors' segmentor classes take it (``dense-reference.md``, "From tokens to a mask"):
the image resized keep-ratio to short side S (mmcv's ``rescale_size`` rounding, bilinear), normalised
on the 0-255 scale; per window the patch logits upsampled to the window; the windows' average
upsampled to the original size; PAMR when asked; ``softmax(logit_scale * logits)`` over the queries,
each class the max over its queries, SCLIP's area threshold, ``prob_threshold`` to background.
Images of one size run together: every window of every image goes through the network in one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..refiners.pamr import PAMR_DILATIONS, pamr
from ..windows import sliding_windows
from .dense import DenseCam, DenseProtocol
from .dense_queries import Queries

__all__ = ["DENSE_MEAN", "DENSE_STD", "WINDOW_BATCH", "class_probabilities", "dense_input", "dense_segment",
           "normalise", "pad_to_patch", "predict", "rescale_size", "resize_linear_u8", "slide_logits", "window_boxes"]

DENSE_MEAN = (122.771, 116.746, 104.094)  # the authors' SegDataPreProcessor, RGB, 0-255 scale
DENSE_STD = (68.501, 66.632, 70.323)
LONG_SIDE = 2048
WINDOW_BATCH = 64  # windows per forward: bounds the memory of a group's batch


def rescale_size(height: int, width: int, short: int, long: int = LONG_SIDE) -> tuple[int, int]:
    """mmcv's ``rescale_size`` for ``keep_ratio`` to (long, short): factor min(long / long side, short /
    short side), each side ``int(side * factor + 0.5)``; (height, width)."""
    factor = min(long / max(height, width), short / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def _linear_taps(dst: int, src: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per output index: the two source indices and their weights in 1/2048, as OpenCV's ``INTER_LINEAR``
    on 8-bit images computes them (half-pixel centres in float32, clamped at the borders, rounded)."""
    fx = ((torch.arange(dst, dtype=torch.float64, device=device) + 0.5) * (1.0 / (dst / src)) - 0.5).float()
    sx = torch.floor(fx)
    fx = fx - sx
    outside = (sx < 0) | (sx >= src - 1)
    fx = torch.where(outside, torch.zeros_like(fx), fx)
    sx = sx.long().clamp(0, src - 1)
    return (sx, (sx + 1).clamp_max(src - 1), torch.round((1 - fx) * 2048).int(), torch.round(fx * 2048).int())


def resize_linear_u8(rgb: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, H, W, C) uint8 -> (B, h, w, C) uint8: bilinear in OpenCV's fixed-point arithmetic (the
    authors read images with OpenCV): a horizontal pass in 11-bit weights, then the vertical one as its
    SIMD path rounds it. Matches ``cv2.resize(INTER_LINEAR)`` on all but about 0.1% of the values (by 1),
    where plain float bilinear misses some 10%."""
    x0, x1, a0, a1 = _linear_taps(size[1], rgb.shape[2], rgb.device)
    y0, y1, b0, b1 = _linear_taps(size[0], rgb.shape[1], rgb.device)
    s = rgb.int()
    rows = s[:, :, x0] * a0[:, None] + s[:, :, x1] * a1[:, None]  # (B, H, w, C), in 1/2048
    top, bottom = rows[:, y0] >> 4, rows[:, y1] >> 4
    out = ((top * b0[:, None, None]) >> 16) + ((bottom * b1[:, None, None]) >> 16)
    return ((out + 2) >> 2).clamp_(0, 255).to(torch.uint8)


def dense_input(rgb: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, H, W, 3) uint8 RGB -> (B, 3, h, w) float32 network input at ``size`` (``resize_linear_u8``),
    normalised."""
    if tuple(rgb.shape[1:3]) != tuple(size):
        rgb = resize_linear_u8(rgb, size)
    return normalise(rgb.permute(0, 3, 1, 2).float())


def normalise(x: Tensor) -> Tensor:
    """(B, 3, h, w) RGB on the 0-255 scale -> the authors' normalised input."""
    mean = torch.tensor(DENSE_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(DENSE_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def window_boxes(height: int, width: int, window: int, stride: int) -> list[tuple[int, int, int, int]]:
    """The authors' ``forward_slide`` windows (y1, y2, x1, x2) in raster order; ``window`` 0: the image."""
    return [(0, height, 0, width)] if window == 0 else sliding_windows(height, width, window, stride)


def pad_to_patch(height: int, width: int, patch: int) -> tuple[int, int, int, int]:
    """ClearCLIP's ``compute_padsize``: (left, right, top, bottom) zeros to a multiple of ``patch``, the odd
    pixel at the right or bottom."""
    lr, tb = -width % patch, -height % patch
    return lr // 2, lr - lr // 2, tb // 2, tb - tb // 2


def slide_logits(images: Tensor, protocol: DenseProtocol, patch: int, out_size: tuple[int, int],
                 window_logits: Callable[[Tensor], Tensor]) -> Tensor:
    """Query logits (B, Q, H, W) at ``out_size`` of normalised images (B, 3, h, w).

    ``window_logits`` maps windows (N, 3, wh, ww) to their patch logits (N, Q, gh, gw). Each window's
    are upsampled to the window, added where it lies, divided by the count, then upsampled to
    ``out_size``. Without windows (NACLIP's ``slide_crop=0``) the image is the one window: its logits
    go to the input size, then to ``out_size``, as NACLIP does it at the reference commit.
    """
    b, _, h, w = images.shape
    boxes = window_boxes(h, w, protocol.window, protocol.stride)
    crops = torch.cat([images[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])  # box-major, then image
    ch, cw = crops.shape[-2:]
    pad = pad_to_patch(ch, cw, patch) if protocol.pad_windows else (0, 0, 0, 0)
    if any(pad):
        crops = F.pad(crops, pad)
    logits = torch.cat([window_logits(crops[s:s + WINDOW_BATCH]) for s in range(0, len(crops), WINDOW_BATCH)])
    logits = F.interpolate(logits, size=crops.shape[-2:], mode="bilinear", align_corners=False)
    logits = logits[:, :, pad[2]:pad[2] + ch, pad[0]:pad[0] + cw]
    total = images.new_zeros((b, logits.shape[1], h, w))
    count = images.new_zeros((1, 1, h, w))
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        total[:, :, y1:y2, x1:x2] += logits[i * b:(i + 1) * b]
        count[:, :, y1:y2, x1:x2] += 1
    return F.interpolate(total / count, size=out_size, mode="bilinear", align_corners=False)


def class_probabilities(logits: Tensor, line: Tensor, n_lines: int, logit_scale: float) -> Tensor:
    """(Q, H, W) query logits -> (C, H, W): softmax of ``logit_scale * logits`` over the queries, each
    class (``line`` of each query) the max over its queries."""
    probs = (logits * logit_scale).softmax(dim=0)
    if n_lines == len(line):  # one query a class, in class order (ClearCLIP's, MaskCLIP's lists)
        return probs
    return torch.stack([probs[line == c].amax(dim=0) for c in range(n_lines)])


def predict(probs: Tensor, prob_threshold: float, area_threshold: float | None) -> tuple[Tensor, Tensor]:
    """(C, H, W) class probabilities -> (pred (H, W) long, its probability (H, W)) as the authors'
    ``postprocess_result``: classes whose argmax area is at most ``area_threshold`` of the foreground's
    scaled to 0 (SCLIP), the argmax, 0 where its probability is under ``prob_threshold``."""
    if area_threshold is not None:
        area = F.one_hot(probs.argmax(dim=0), probs.shape[0])[..., 1:].sum(dim=(0, 1)).to(probs.dtype)
        probs = probs.clone()
        probs[1:] *= (area > area_threshold * area.sum()).to(probs.dtype).view(-1, 1, 1)
    top, pred = probs.amax(dim=0), probs.argmax(dim=0)
    return torch.where(top < prob_threshold, torch.zeros_like(pred), pred), top



def dense_segment(cam: DenseCam, visual: nn.Module, queries: Queries, rgb: Tensor,
                  labels: Sequence[Sequence[int] | None], pamr_steps: int = 0,
                  pamr_dilations: Sequence[int] = PAMR_DILATIONS) -> list[tuple[Tensor, Tensor, Tensor, list[int]]]:
    """Each image's (mask (H, W) long: 0 background, c + 1 class c; its probability (H, W); class
    probabilities (R, H, W); the class of each row after row 0, background) from the images ``rgb``
    (B, H, W, 3) uint8 of one size.

    ``labels[i]`` None: the open-vocabulary protocol (every class a row); else background plus those
    classes, in class order as the authors' restricted class files list them (ties go to the lower
    class). PAMR runs on the logits at the original size when ``pamr_steps`` > 0, on the network
    input resized there. With ``renormalise`` (NACLIP) the probabilities returned are divided by their
    sum over the rows, as NACLIP outputs them (the mask is made before).
    """
    p = cam.protocol
    size = tuple(rgb.shape[1:3])
    x = dense_input(rgb, rescale_size(*size, p.scale))
    patch = visual.conv1.kernel_size[0]

    def window_logits(windows: Tensor) -> Tensor:
        tokens, grid = cam.tokens(visual, windows)
        feats = F.normalize(tokens.float(), dim=-1)
        return (feats @ queries.features.T).transpose(1, 2).reshape(len(windows), -1, *grid)

    logits = slide_logits(x, p, patch, size, window_logits)
    chosen = []
    for lab in labels:
        if lab is None:
            line = queries.line
            chosen.append((torch.arange(len(line), device=line.device), line, list(range(int(line.max())))))
        else:
            classes = sorted(set(lab))
            chosen.append((*queries.restricted(classes), classes))
    if pamr_steps:
        # PAMR propagates each query's map on its own: only the queries some image keeps need it
        used = torch.unique(torch.cat([keep for keep, _, _ in chosen]))
        if len(used) < logits.shape[1]:
            where = torch.full((logits.shape[1],), -1, dtype=torch.long, device=used.device)
            where[used] = torch.arange(len(used), device=used.device)
            logits = logits[:, used]
            chosen = [(where[keep], line, classes) for keep, line, classes in chosen]
        image = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        logits = pamr(image, logits, pamr_steps, pamr_dilations)
    out = []
    for i, (keep, line, classes) in enumerate(chosen):
        probs = class_probabilities(logits[i, keep], line, int(line.max()) + 1, p.logit_scale)
        pred, top = predict(probs, p.prob_threshold, p.area_threshold)
        if p.renormalise:  # NACLIP's class probabilities, once the mask is made, sum to 1 over the classes
            probs = probs / probs.sum(dim=0, keepdim=True)
            top = probs.amax(dim=0)
        ids = torch.tensor([0, *(c + 1 for c in classes)], device=pred.device)
        out.append((ids[pred], top, probs, classes))
    return out
