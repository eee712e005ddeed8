"""Feeding the engine: decode and resize in DataLoader workers, batches of equal input size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from .images import ImageError, input_size, preprocess, read_image
from .labeler import PreparedImage
from .pixels import ImageTooLargeError, open_image

__all__ = ["ImageFolderDataset", "Sample", "collate_samples", "probe_input_size", "size_batches"]


@dataclass
class Sample:
    """One image ready for the engine, or the reason it could not be read."""

    stem: str
    path: str
    prepared: PreparedImage | None = None
    error: str | None = None

    def pin_memory(self) -> Sample:
        """Called by ``DataLoader(pin_memory=True)`` so host-to-GPU copies can run asynchronously."""
        if self.prepared is not None:
            self.prepared.tensor = self.prepared.tensor.pin_memory()
        return self


def probe_input_size(path: Path, patch: int, max_side: int | None, exif_transpose: bool = True) -> tuple[int, int]:
    """The network input size of an image from its header alone; (0, 0) when it cannot be opened."""
    try:
        with open_image(path) as img:
            w, h = img.size
            if exif_transpose and img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w
    except (OSError, ValueError, SyntaxError, ImageTooLargeError):
        return (0, 0)  # read_image says why
    return input_size(h, w, patch, max_side)


def size_batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of equal size, at most ``batch_size`` each, in first-seen order."""
    buckets: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        buckets.setdefault(size, []).append(i)
    return [idx[j:j + batch_size] for idx in buckets.values() for j in range(0, len(idx), batch_size)]


class ImageFolderDataset(Dataset):
    """Reads, orients and preprocesses images; a failure becomes a ``Sample`` with ``error`` set."""

    def __init__(self, items: Sequence[tuple[str, Path, list[int] | None]], patch: int,
                 max_side: int | None, exif_transpose: bool = True, keep_image: bool = False) -> None:
        self.items = list(items)
        self.patch = patch
        self.max_side = max_side
        self.exif_transpose = exif_transpose
        self.keep_image = keep_image

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        stem, path, labels = self.items[i]
        try:
            img = read_image(path, self.exif_transpose)
        except ImageError as e:
            return Sample(stem, str(path), error=str(e))
        tensor = preprocess(img, self.patch, self.max_side)
        rgb = np.asarray(img.convert("RGB")) if self.keep_image else None
        return Sample(stem, str(path), PreparedImage(tensor, (img.height, img.width), labels, rgb))


def collate_samples(samples: list[Sample]) -> list[Sample]:
    """Keep a batch as a list of samples: the engine groups by size itself."""
    return samples
