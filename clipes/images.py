"""Reading images of any PIL mode and preparing them the way CLIP-ES does."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from .errors import ClipesError
from .names import IMAGE_SUFFIXES
from .pixels import ImageTooLargeError, open_image

if TYPE_CHECKING:  # torch loads where a tensor is made: finding and reading images need none
    from torch import Tensor

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGE_SUFFIXES",
    "ImageError",
    "find_images",
    "input_size",
    "preprocess",
    "read_image",
    "to_rgb_or_gray",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(ClipesError):
    """An image cannot be read or used; the message names the file."""


def to_rgb_or_gray(img: Image.Image) -> Image.Image:
    """Bring any PIL mode to 'RGB' or 'L' so that resizing then converting to RGB is well defined.

    RGB and L pass untouched (the reference path). High bit-depth gray is scaled to 8 bits rather
    than clipped, float samples in [0, 1] to 0-255 (a ValueError for another range); palette,
    alpha, CMYK and other modes are converted to RGB (alpha dropped).
    """
    if img.mode in ("RGB", "L"):
        return img
    if img.mode == "F":  # float samples (a TIFF): [0, 1] by convention; any other range has no agreed meaning
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if not np.isfinite(arr).all() or lo < 0 or hi > 1:
            raise ValueError(f"float samples in [{lo:g}, {hi:g}]; float images are read with samples in [0, 1]")
        return Image.fromarray(np.rint(arr * 255).astype(np.uint8), "L")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "I" and (arr.min(initial=0) < 0 or arr.max(initial=0) > 65535):
            lo, hi = arr.min(), arr.max()
            arr, top = arr - lo, max(hi - lo, 1e-12)
        return Image.fromarray(np.clip(np.rint(arr / top * 255), 0, 255).astype(np.uint8), "L")
    if img.mode in ("1", "LA"):
        return img.convert("L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def read_image(path: str | Path, exif_transpose: bool = True) -> Image.Image:
    """Open and decode an image fully; an ``ImageError`` naming the file if that fails."""
    path = Path(path)
    try:
        with open_image(path) as img:
            img.load()
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            img = to_rgb_or_gray(img)
    except ImageTooLargeError as e:
        raise ImageError(str(e)) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{path}: cannot read image ({e})") from e
    if min(img.size) < 1:
        raise ImageError(f"{path}: image has no pixels")
    return img


def input_size(height: int, width: int, patch: int, max_side: int | None = None) -> tuple[int, int]:
    """Network input size: each side rounded up to a multiple of ``patch`` (after an optional cap)."""
    scale = 1.0
    if max_side and max(height, width) > max_side:
        scale = max_side / max(height, width)
    return (math.ceil(height * scale / patch) * patch, math.ceil(width * scale / patch) * patch)


def preprocess(img: Image.Image, patch: int = 16, max_side: int | None = None) -> Tensor:
    """PIL image -> normalised (3, H', W') float tensor, H' and W' multiples of ``patch``.

    As the reference: bicubic resize of the PIL image, then RGB conversion, then CLIP's mean/std.
    """
    import torch

    h, w = input_size(img.height, img.width, patch, max_side)
    img = img.resize((w, h), Image.Resampling.BICUBIC).convert("RGB")
    # channels first while still uint8: the float maths then runs on contiguous memory (2.3 -> 1.4 ms)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous().float().div(255)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def find_images(folder: Path) -> list[tuple[str, Path]]:
    """Images under ``folder`` (recursively, sorted) as (stem relative to the folder, path)."""
    if not folder.exists():
        raise ImageError(f"input folder {folder} does not exist")
    if not folder.is_dir():
        raise ImageError(f"input {folder} is not a folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file() or path.name.startswith("."):
            continue
        stem = path.relative_to(folder).with_suffix("").as_posix()
        if stem in found:
            raise ImageError(f"{found[stem]} and {path} would both write masks/{stem}.png; rename one")
        found[stem] = path
    if not found:
        raise ImageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {folder}")
    return list(found.items())
