"""One limit on the pixels clipes decodes from any image or mask file (a decompression bomb is refused).

Every reader of photos and label PNGs opens files through ``open_image``: a file whose header claims
more than ``max_pixels()`` pixels is refused naming it, before anything is decoded. The limit is
PIL's own default (about 89.5 million pixels, 9459 x 9459); ``CLIPES_MAX_PIXELS`` raises it for files
one trusts. PIL and numpy only (no torch): ``export``, ``eval`` and ``view`` read through it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from .errors import ClipesError

__all__ = ["DEFAULT_MAX_PIXELS", "MAX_PIXELS_ENV", "ImageTooLargeError", "max_pixels", "open_image"]

MAX_PIXELS_ENV = "CLIPES_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS as shipped


class ImageTooLargeError(ClipesError):
    """An image file holds more pixels than clipes decodes (``CLIPES_MAX_PIXELS``)."""


def max_pixels() -> int:
    """The most pixels one image may hold: ``CLIPES_MAX_PIXELS`` when set (a whole number > 0), else PIL's default."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise ClipesError(f"{MAX_PIXELS_ENV}={text!r}: give a whole number of pixels above 0 (default "
                          f"{DEFAULT_MAX_PIXELS})")
    return value


def _too_large(path: Path, what: str, limit: int) -> ImageTooLargeError:
    return ImageTooLargeError(f"{path}: {what} is over the limit of {limit} pixels that clipes decodes (a "
                              f"decompression bomb?); if the file is trusted, raise the limit with {MAX_PIXELS_ENV}=N")


@contextmanager
def open_image(path: str | Path) -> Iterator[Image.Image]:
    """``PIL.Image.open(path)`` (lazy: nothing decoded yet), refused with ``ImageTooLargeError`` when its size is over
    ``max_pixels()``. OS and format errors pass through as PIL raises them."""
    path, limit = Path(path), max_pixels()
    # PIL's own guard (an error at twice its limit, checked on open) stays no tighter than the user's limit
    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below decides
        try:
            img = Image.open(path)
        except Image.DecompressionBombError as e:
            raise _too_large(path, f"the image ({e})", limit) from None
    with img:
        width, height = img.size
        if width * height > limit:
            raise _too_large(path, f"the {width}x{height} image ({width * height} pixels)", limit)
        yield img
