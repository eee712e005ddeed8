"""A synthetic segmentation set: textured discs and squares over real photos, with exact masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = "disc: circle\nsquare: box\n"


def _background(rng: np.random.Generator, photos: list[np.ndarray], size: int) -> np.ndarray:
    if photos:
        p = photos[int(rng.integers(len(photos)))]
        y, x = rng.integers(0, p.shape[0] - size), rng.integers(0, p.shape[1] - size)
        return p[y:y + size, x:x + size].copy()
    return rng.integers(60, 200, (size, size, 3)).astype(np.uint8)


def make_dataset(root: Path, n_train: int = 48, n_val: int = 12, size: int = 64, seed: int = 0,
                 photos_dir: Path | None = None, corrupt: float = 0.25) -> Path:
    """Writes images/, masks/ (ground truth), noisy/ (masks with 255 holes and wrong labels), val_*.

    Class 1 (disc) has horizontal red stripes, class 2 (square) a blue checkerboard. The noisy masks
    mark a ``corrupt`` share of each object's pixels as 255 and flip a band of labels to the wrong class.
    """
    rng = np.random.default_rng(seed)
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(photos_dir.glob("*.png"))] if photos_dir \
        and photos_dir.is_dir() else []
    yy, xx = np.mgrid[:size, :size]
    for split, n in (("", n_train), ("val_", n_val)):
        for d in ("images", "masks", "noisy"):
            (root / f"{split}{d}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = _background(rng, photos, size)
            mask = np.zeros((size, size), np.uint8)
            for cls in rng.permutation([1, 2]):
                cy, cx, r = rng.integers(12, size - 12), rng.integers(12, size - 12), rng.integers(7, 14)
                region = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r if cls == 1 else \
                    (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
                stripe = ((yy // 3) % 2 == 0) if cls == 1 else (((yy // 4) + (xx // 4)) % 2 == 0)
                light, dark = ([220, 40, 40], [150, 20, 20]) if cls == 1 else ([40, 60, 230], [20, 20, 120])
                texture = np.where(stripe[..., None], light, dark).astype(np.uint8)
                img[region] = texture[region]
                mask[region] = cls
            noisy = mask.copy()
            holes = (rng.random(mask.shape) < corrupt) & (mask > 0)
            noisy[holes] = 255
            band = (yy >= 0) & (yy < 6)
            noisy[band & (mask == 1)] = 2  # wrong labels in a band
            Image.fromarray(img).save(root / f"{split}images" / f"{i:03d}.png")
            Image.fromarray(mask).save(root / f"{split}masks" / f"{i:03d}.png")
            Image.fromarray(noisy).save(root / f"{split}noisy" / f"{i:03d}.png")
    (root / "classes.txt").write_text(CLASSES)
    return root
