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
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from ..errors import ClipesError
from ..evaluate import read_label_png
from ..images import find_images, read_image

__all__ = ["PositionSampler", "SegDataset", "SegItem", "pair_folders"]


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


class SegDataset(Dataset):
    """Samples keyed by (index, position): training crops with random scale and flip, or whole images.

    Returns the normalised image (3, H, W), labels (H, W) int64 with 255 ignored, and pixel weights
    (H, W) float (the saved CRF confidence, else 1). The scale is drawn uniformly from ``scale``, or
    from the list ``scales`` (DeepLab's {0.5, 0.75, 1, 1.25, 1.5}) when given. With ``num_classes``
    (background included), a mask value that is no class and not 255 is an error naming the mask.
    """

    def __init__(self, items: Sequence[SegItem], mean: Sequence[float], std: Sequence[float], *,
                 train: bool, crop: int = 321, scale: tuple[float, float] = (0.5, 1.5), flip: bool = True,
                 seed: int = 0, scales: Sequence[float] | None = None, num_classes: int | None = None) -> None:
        self.items = list(items)
        self.mean = np.asarray(mean, dtype=np.float32) * 255
        self.std = np.asarray(std, dtype=np.float32) * 255
        self.train, self.crop, self.scale, self.flip, self.seed = train, crop, scale, flip, seed
        self.scales = list(scales) if scales else None
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, item: SegItem) -> tuple[Image.Image, Image.Image | None, np.ndarray]:
        img = read_image(item.image).convert("RGB")
        mask = None
        if item.mask:
            values = read_label_png(item.mask)
            self._check_values(item.mask, values)
            mask = Image.fromarray(values)
            if mask.size != img.size:
                raise ClipesError(f"{item.mask}: mask size {mask.size} differs from its image {img.size}")
        weight = np.ones((img.height, img.width), dtype=np.float32)
        if item.confidence:
            try:
                with np.load(item.confidence) as data:
                    if "confidence" not in data:
                        raise ClipesError(f"{item.confidence}: holds no CRF confidence; --confidence needs a "
                                          "clipes label run made with --crf --save-cams (PAR and plain runs "
                                          "save none)")
                    weight = data["confidence"].astype(np.float32)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                raise ClipesError(f"{item.confidence}: cannot read its confidence array ({e})") from None
            if weight.shape != (img.height, img.width):
                raise ClipesError(f"{item.confidence}: confidence of size {weight.shape[::-1]} for an image of "
                                  f"{img.size}")
        return img, mask, weight

    def _check_values(self, path: Path, values: np.ndarray) -> None:
        if self.num_classes is None:
            return
        bad = np.unique(values[(values >= self.num_classes) & (values != 255)])
        if bad.size:
            raise ClipesError(f"{path}: mask value(s) {', '.join(map(str, bad[:5]))} are not classes of the "
                              f"{self.num_classes - 1}-class set (0 background, 1-{self.num_classes - 1}, "
                              "255 ignored); was it made with other --classes?")

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        index, position = key if isinstance(key, tuple) else (key, key)
        img, mask, weight = self._load(self.items[index])
        labels = np.asarray(mask, dtype=np.int64) if mask is not None else np.full(weight.shape, 255, np.int64)
        if self.train:
            return self._augment(img, labels, weight, np.random.default_rng([self.seed, position]))
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
