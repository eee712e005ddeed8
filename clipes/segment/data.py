"""Training and validation data for the segmenter: image + pseudo mask (+ confidence), augmented.

Augmentation is a pure function of (seed, sample position): a resumed run or a run split over
several processes sees exactly the batches of one uninterrupted process.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from ..errors import ClipesError
from ..evaluate import read_label_png
from ..images import find_images, read_image
from .augment import MmsegAugment, mmseg_augment
from .deeplabv2 import CAFFE_MEAN_BGR, caffe_input

__all__ = ["PositionSampler", "SegDataset", "SegItem", "check_mask_values", "check_training_data", "deeplab_augment",
           "pair_folders"]


@dataclass(frozen=True)
class SegItem:
    stem: str
    image: Path
    mask: Path | None
    confidence: Path | None = None


def pair_folders(images: Path, masks: Path | None, confidence: Path | None = None) -> list[SegItem]:
    """Images under ``images`` with a mask ``<stem>.png`` under ``masks`` (and ``<stem>.npz`` with a
    ``confidence`` array under ``confidence``); images without a mask are an error naming them."""
    items, missing = [], []
    for stem, path in find_images(images):
        mask = masks / f"{stem}.png" if masks else None
        if mask is not None and not mask.is_file():
            missing.append(stem)
            continue
        conf = confidence / f"{stem}.npz" if confidence else None
        items.append(SegItem(stem, path, mask, conf if conf and conf.is_file() else None))
    if missing:
        raise ClipesError(f"{len(missing)} image(s) in {images} have no mask in {masks}, e.g. {missing[0]}.png")
    return items


def _confidence(path: Path) -> np.ndarray:
    """The ``confidence`` array a clipes label run saved (``cams/<stem>.npz``), or a one-line error."""
    try:
        with np.load(path) as data:
            if "confidence" not in data:
                raise ClipesError(f"{path}: holds no CRF confidence; --confidence needs a clipes label run made "
                                  "with --crf --save-cams (PAR and plain runs save none)")
            weight = data["confidence"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ClipesError(f"{path}: cannot read its confidence array ({e})") from None
    if not np.issubdtype(weight.dtype, np.number) or weight.ndim != 2:
        raise ClipesError(f"{path}: confidence must be a 2-D array of numbers, not {weight.dtype} of shape "
                          f"{weight.shape}")
    weight = weight.astype(np.float32)
    bad = ~np.isfinite(weight) | (weight < 0) | (weight > 1)
    if bad.any():
        raise ClipesError(f"{path}: confidence {float(weight[bad].flat[0])!r} at {int(bad.sum())} pixel(s); "
                          "confidences are pixel weights in [0, 1]")
    return weight


def check_training_data(items: Sequence[SegItem], num_classes: int) -> None:
    """Every mask and confidence of ``items`` read once before training: mask values within the class set or
    255, at least one labelled pixel over all masks, confidences finite in [0, 1]. Each refusal names the file
    (a bad value found only when a step loads that image, or weights of -5, would train on nonsense)."""
    labelled = False
    for item in items:
        if item.mask is not None:
            values = read_label_png(item.mask)
            check_mask_values(item.mask, values, num_classes)
            labelled = labelled or bool((values != 255).any())
        if item.confidence is not None:
            _confidence(item.confidence)
    if items and not labelled and any(item.mask is not None for item in items):
        raise ClipesError(f"every pixel of the {len(items)} training mask(s) is 255 (ignored), e.g. "
                          f"{items[0].mask}; there is nothing to train on")


def check_mask_values(path: Path, values: np.ndarray, num_classes: int) -> None:
    """A mask's values are classes of a ``num_classes`` set (background included) or 255, else an error."""
    bad = np.unique(values[(values >= num_classes) & (values != 255)])
    if bad.size:
        raise ClipesError(f"{path}: mask value(s) {', '.join(map(str, bad[:5]))} are not classes of the "
                          f"{num_classes - 1}-class set (0 background, 1-{num_classes - 1}, "
                          "255 ignored); was it made with other --classes?")


class SegDataset(Dataset):
    """Samples keyed by (index, position): training crops with random scale and flip, or whole images.

    Returns the normalised image (3, H, W), labels (H, W) int64 with 255 ignored, and pixel weights
    (H, W) float (the saved CRF confidence, else 1). The scale is drawn uniformly from ``scale``, or
    from the list ``scales`` (DeepLab's {0.5, 0.75, 1, 1.25, 1.5}) when given. With ``num_classes``
    (background included), a mask value that is no class and not 255 is an error naming the mask.
    """

    def __init__(self, items: Sequence[SegItem], mean: Sequence[float], std: Sequence[float], *,
                 train: bool, crop: int = 321, scale: tuple[float, float] = (0.5, 1.5), flip: bool = True,
                 seed: int = 0, scales: Sequence[float] | None = None, num_classes: int | None = None,
                 recipe: str = "clipes", exif: bool = True, mmseg: MmsegAugment | None = None) -> None:
        self.items = list(items)
        self.mean = np.asarray(mean, dtype=np.float32) * 255
        self.std = np.asarray(std, dtype=np.float32) * 255
        self.train, self.crop, self.scale, self.flip, self.seed = train, crop, scale, flip, seed
        self.scales = list(scales) if scales else None
        self.num_classes = num_classes
        self.recipe, self.exif = recipe, exif
        self.mmseg = mmseg  # SETR's pipeline (segment/augment.py) instead of clipes' scale-crop-flip

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, item: SegItem) -> tuple[Image.Image, Image.Image | None, np.ndarray]:
        img = read_image(item.image, exif_transpose=self.exif).convert("RGB")
        mask = None
        if item.mask:
            values = read_label_png(item.mask)
            self._check_values(item.mask, values)
            mask = Image.fromarray(values)
            if mask.size != img.size:
                raise ClipesError(f"{item.mask}: mask size {mask.size} differs from its image {img.size}")
        weight = np.ones((img.height, img.width), dtype=np.float32)
        if item.confidence:
            weight = _confidence(item.confidence)
            if weight.shape != (img.height, img.width):
                raise ClipesError(f"{item.confidence}: confidence of size {weight.shape[::-1]} for an image of "
                                  f"{img.size}")
        return img, mask, weight

    def _check_values(self, path: Path, values: np.ndarray) -> None:
        if self.num_classes is not None:
            check_mask_values(path, values, self.num_classes)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        index, position = key if isinstance(key, tuple) else (key, key)
        img, mask, weight = self._load(self.items[index])
        labels = np.asarray(mask, dtype=np.int64) if mask is not None else np.full(weight.shape, 255, np.int64)
        rng = np.random.default_rng([self.seed, position])
        if self.recipe == "deeplab-pytorch":
            if self.train:
                return deeplab_augment(np.asarray(img), labels, weight, rng, self.scales or [1.0], self.crop, self.flip)
            x = caffe_input(np.asarray(img))
        elif self.train and self.mmseg is not None:
            return mmseg_augment(np.asarray(img), labels, weight, rng, self.mmseg, self.mean, self.std)
        elif self.train:
            return self._augment(img, labels, weight, rng)
        else:
            x = (np.asarray(img, dtype=np.float32) - self.mean) / self.std
        return torch.from_numpy(x).permute(2, 0, 1).contiguous(), torch.from_numpy(labels), torch.from_numpy(weight)

    def _augment(self, img: Image.Image, labels: np.ndarray, weight: np.ndarray,
                 rng: np.random.Generator) -> tuple[Tensor, Tensor, Tensor]:
        s = self.scales[int(rng.integers(len(self.scales)))] if self.scales else rng.uniform(*self.scale)
        w, h = max(1, round(img.width * s)), max(1, round(img.height * s))
        img = img.resize((w, h), Image.Resampling.BILINEAR)
        labels = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((w, h), Image.Resampling.NEAREST),
                            dtype=np.int64)
        weight = np.asarray(Image.fromarray(weight).resize((w, h), Image.Resampling.NEAREST), dtype=np.float32)
        x = np.asarray(img, dtype=np.uint8)
        if self.flip and rng.random() < 0.5:
            x, labels, weight = x[:, ::-1], labels[:, ::-1], weight[:, ::-1]
        c = self.crop
        ph, pw = max(c - h, 0), max(c - w, 0)
        x = np.pad(x, ((0, ph), (0, pw), (0, 0)))
        labels = np.pad(labels, ((0, ph), (0, pw)), constant_values=255)
        weight = np.pad(weight, ((0, ph), (0, pw)))
        y0 = int(rng.integers(0, x.shape[0] - c + 1))
        x0 = int(rng.integers(0, x.shape[1] - c + 1))
        x, labels, weight = x[y0:y0 + c, x0:x0 + c], labels[y0:y0 + c, x0:x0 + c], weight[y0:y0 + c, x0:x0 + c]
        # normalise the crop only, not the whole rescaled image; padding is the mean colour, i.e. 0
        x = (x.astype(np.float32) - self.mean) / self.std
        x[max(h - y0, 0):] = 0
        x[:, max(w - x0, 0):] = 0
        return (torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).contiguous(),
                torch.from_numpy(np.ascontiguousarray(labels)), torch.from_numpy(np.ascontiguousarray(weight)))


def deeplab_augment(rgb: np.ndarray, labels: np.ndarray, weight: np.ndarray, rng: np.random.Generator,
                    scales: Sequence[float], crop: int, flip: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """deeplab-pytorch's training augmentation (``libs/datasets/base.py``), in its order and rounding: a scale
    drawn from ``scales`` (sides truncated, ``int(h * s)``), the float BGR image resized bilinearly (OpenCV's
    ``INTER_LINEAR``: half-pixel centres, no antialiasing) and the labels (and weights) by PIL NEAREST; padding
    at the bottom and right to ``crop`` with the mean colour / 255 (weight 0); a random ``crop`` square; a
    random horizontal flip; then the Caffe mean subtracted. Returns (3, crop, crop) input, labels, weights."""
    s = scales[int(rng.integers(len(scales)))]
    h, w = labels.shape
    h, w = int(h * s), int(w * s)
    bgr = torch.from_numpy(np.ascontiguousarray(rgb[..., ::-1], dtype=np.float32)).permute(2, 0, 1)[None]
    if (h, w) != tuple(labels.shape):
        bgr = F.interpolate(bgr, size=(h, w), mode="bilinear", align_corners=False)
        labels = np.asarray(Image.fromarray(labels.astype(np.int32)).resize((w, h), Image.Resampling.NEAREST))
        weight = np.asarray(Image.fromarray(weight).resize((w, h), Image.Resampling.NEAREST))
    image = bgr[0].permute(1, 2, 0).numpy()
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    if ph or pw:
        image = np.concatenate([np.pad(image[..., c], ((0, ph), (0, pw)), constant_values=np.float32(m))[..., None]
                                for c, m in enumerate(CAFFE_MEAN_BGR)], axis=2)
        labels = np.pad(labels, ((0, ph), (0, pw)), constant_values=255)
        weight = np.pad(weight, ((0, ph), (0, pw)))
    y0 = int(rng.integers(0, labels.shape[0] - crop + 1))
    x0 = int(rng.integers(0, labels.shape[1] - crop + 1))
    image, labels, weight = (a[y0:y0 + crop, x0:x0 + crop] for a in (image, labels, weight))
    if flip and rng.random() < 0.5:
        image, labels, weight = image[:, ::-1], labels[:, ::-1], weight[:, ::-1]
    x = (image - np.asarray(CAFFE_MEAN_BGR)).astype(np.float32)  # float32 minus the float64 mean, as the reference
    return (torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))),
            torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
            torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)))


class PositionSampler(Sampler[list[tuple[int, int]]]):
    """Batches of (index, position) for steps ``start..steps``: position p is the p-th sample of an
    endless stream of seeded epoch permutations; rank r of ``world`` takes its slice of each global
    batch."""

    def __init__(self, size: int, global_batch: int, steps: int, start: int = 0, seed: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        if global_batch % world:
            raise ClipesError(f"batch size {global_batch} is not divisible by the {world} processes")
        self.size, self.global_batch, self.steps, self.start = size, global_batch, steps, start
        self.seed, self.rank, self.world = seed, rank, world
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def _index(self, position: int) -> int:
        epoch = position // self.size
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, 10**6 + epoch]).permutation(self.size)}
        return int(self._perms[epoch][position % self.size])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        local = self.global_batch // self.world
        for step in range(self.start, self.steps):
            first = step * self.global_batch + self.rank * local
            yield [(self._index(p), p) for p in range(first, first + local)]
