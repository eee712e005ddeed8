"""SETR's training pipeline as mmseg runs it (``configs/_base_/datasets/pascal_context.py`` of fudan-zvg/SETR).

In its order: ``Resize`` (a ratio drawn in ``ratio_range`` times the ``base`` size, the image rescaled to fit
that square with its aspect kept: OpenCV bilinear for the image, nearest for the labels), ``RandomCrop`` with
``cat_max_ratio`` (up to ten draws for a crop where no single class holds ``cat_max_ratio`` of the labelled
pixels), ``RandomFlip`` (0.5), ``PhotoMetricDistortion`` (brightness, contrast, saturation, hue, each on a coin
flip), ``Normalize``, ``Pad`` to the crop (image 0 after normalising, labels 255, confidence 0). Every draw comes
from one ``numpy`` generator, so a sample is a function of (seed, position) as elsewhere in ``SegDataset``.

Where this differs: the HSV round trip of saturation and hue is computed in float and rounded once per
conversion (OpenCV's uint8 tables round the same way up to a unit in the last place).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..masks import IGNORE

__all__ = ["MmsegAugment", "cat_max_crop", "mmseg_augment", "nearest_resize", "photometric_distortion",
           "rescale_size", "short_side_size"]


@dataclass(frozen=True)
class MmsegAugment:
    """The pipeline's settings (SETR's configs: 520, (0.5, 2.0), 480, 0.75, distortion on)."""

    base: int = 520
    ratio_range: tuple[float, float] = (0.5, 2.0)
    crop: int = 480
    cat_max_ratio: float = 0.75
    photometric: bool = True
    flip: bool = True


def rescale_size(h: int, w: int, target: int) -> tuple[int, int]:
    """mmcv ``imrescale`` to the square ``target``: factor min(target / long side, target / short side), each
    side ``int(side * factor + 0.5)``."""
    factor = min(target / max(h, w), target / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def short_side_size(h: int, w: int, short: int) -> tuple[int, int]:
    """SETR's test ``Resize`` (``dataset='pascal_context'``, keep_ratio): the short side to ``short``, each
    side ``int(side * short / short side + 0.5)``."""
    factor = short / min(h, w)
    return int(h * factor + 0.5), int(w * factor + 0.5)


def nearest_resize(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """OpenCV ``INTER_NEAREST``: output pixel i reads input floor(i * in / out)."""
    ys = np.minimum((np.arange(h) * (a.shape[0] / h)).astype(np.int64), a.shape[0] - 1)
    xs = np.minimum((np.arange(w) * (a.shape[1] / w)).astype(np.int64), a.shape[1] - 1)
    return a[ys[:, None], xs[None, :]]


def _bilinear_uint8(rgb: np.ndarray, h: int, w: int) -> np.ndarray:
    """OpenCV ``INTER_LINEAR`` on uint8 (half-pixel centres, no antialiasing), rounded back to uint8."""
    x = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def cat_max_crop(labels: np.ndarray, crop: int, cat_max_ratio: float, rng: np.random.Generator,
                 tries: int = 10) -> tuple[int, int]:
    """mmseg ``RandomCrop``'s top-left corner: a random one; while (up to ``tries`` times) its crop holds fewer
    than two labelled classes or one class covers ``cat_max_ratio`` or more of its labelled pixels, another
    (the last one drawn is kept unchecked)."""
    def draw() -> tuple[int, int]:
        return (int(rng.integers(0, max(labels.shape[0] - crop, 0) + 1)),
                int(rng.integers(0, max(labels.shape[1] - crop, 0) + 1)))

    y0, x0 = draw()
    if cat_max_ratio >= 1:
        return y0, x0
    for _ in range(tries):
        values, counts = np.unique(labels[y0:y0 + crop, x0:x0 + crop], return_counts=True)
        counts = counts[values != IGNORE]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
        y0, x0 = draw()
    return y0, x0


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg's ``convert``: x * alpha + beta in float32, clipped to [0, 255], truncated to uint8."""
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """uint8 HSV as OpenCV's 8-bit form: H in [0, 180) (degrees / 2), S and V in [0, 255]."""
    x = rgb.astype(np.float32)
    v = x.max(-1)
    delta = v - x.min(-1)
    s = np.where(v > 0, 255 * delta / np.maximum(v, 1e-12), 0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    safe = np.maximum(delta, 1e-12)
    hue = np.where(v == r, 60 * (g - b) / safe, np.where(v == g, 120 + 60 * (b - r) / safe, 240 + 60 * (r - g) / safe))
    hue = np.where(delta > 0, np.mod(hue, 360), 0)
    return np.stack([np.round(hue / 2) % 180, np.round(s), v], -1).astype(np.uint8)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h = hsv[..., 0].astype(np.float32) * 2 / 60
    s, v = hsv[..., 1].astype(np.float32) / 255, hsv[..., 2].astype(np.float32)
    c = v * s
    x = c * (1 - np.abs(np.mod(h, 2) - 1))
    m = v - c
    sector = np.floor(h).astype(np.int64) % 6
    zero = np.zeros_like(c)
    table = [(c, x, zero), (x, c, zero), (zero, c, x), (zero, x, c), (x, zero, c), (c, zero, x)]
    out = np.zeros((*h.shape, 3), np.float32)
    for k, parts in enumerate(table):
        out[sector == k] = np.stack(parts, -1)[sector == k]
    return np.clip(np.round(out + m[..., None]), 0, 255).astype(np.uint8)


def photometric_distortion(rgb: np.ndarray, rng: np.random.Generator, brightness_delta: int = 32,
                           contrast: tuple[float, float] = (0.5, 1.5), saturation: tuple[float, float] = (0.5, 1.5),
                           hue_delta: int = 18) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion`` on uint8: brightness (+U(-32, 32)), contrast before or after the rest
    (x U(0.5, 1.5)), saturation (x U(0.5, 1.5)), hue (+ an integer in [-18, 18) of OpenCV's half degrees),
    each applied on a fair coin flip."""
    img = rgb
    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_last = rng.integers(2) == 0  # mmseg's mode 0: contrast last
    if not contrast_last and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(*contrast))
    if rng.integers(2):
        hsv = _rgb_to_hsv(img)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation))
        img = _hsv_to_rgb(hsv)
    if rng.integers(2):
        hsv = _rgb_to_hsv(img)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + int(rng.integers(-hue_delta, hue_delta))) % 180
        img = _hsv_to_rgb(hsv)
    if contrast_last and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(*contrast))
    return img


def mmseg_augment(rgb: np.ndarray, labels: np.ndarray, weight: np.ndarray, rng: np.random.Generator,
                  settings: MmsegAugment, mean: np.ndarray, std: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
    """One training sample through SETR's pipeline: (3, crop, crop) normalised input, labels, weights."""
    ratio = rng.uniform(*settings.ratio_range)
    h, w = rescale_size(*labels.shape, int(settings.base * ratio))
    if (h, w) != labels.shape:
        rgb = _bilinear_uint8(rgb, h, w)
        labels, weight = nearest_resize(labels, h, w), nearest_resize(weight, h, w)
    c = settings.crop
    y0, x0 = cat_max_crop(labels, c, settings.cat_max_ratio, rng)
    rgb, labels, weight = (a[y0:y0 + c, x0:x0 + c] for a in (rgb, labels, weight))
    if settings.flip and rng.random() < 0.5:
        rgb, labels, weight = rgb[:, ::-1], labels[:, ::-1], weight[:, ::-1]
    if settings.photometric:
        rgb = photometric_distortion(np.ascontiguousarray(rgb), rng)
    x = (rgb.astype(np.float32) - mean) / std
    ph, pw = c - x.shape[0], c - x.shape[1]
    x = np.pad(x, ((0, ph), (0, pw), (0, 0)))
    labels = np.pad(labels, ((0, ph), (0, pw)), constant_values=IGNORE)
    weight = np.pad(weight, ((0, ph), (0, pw)))
    return (torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))),
            torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
            torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)))
