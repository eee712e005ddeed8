"""Image names: the suffixes clipes reads as images, and the key an image is known by (no torch here)."""

from __future__ import annotations

from pathlib import PurePosixPath

__all__ = ["IMAGE_SUFFIXES", "image_key"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif")


def image_key(name: str) -> str:
    """Image key: the relative name without an image suffix (``a/b.jpg`` -> ``a/b``; ``img.v2`` stays)."""
    p = PurePosixPath(name.replace("\\", "/"))
    return str(p.with_suffix("")) if p.suffix.lower() in IMAGE_SUFFIXES else str(p)
