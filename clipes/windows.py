"""The sliding-window grid of mmseg's ``slide_inference``, which the dense CLIP methods' authors and SETR's
configs both test with: windows of ``window`` every ``stride`` pixels, the last of each row and column moved
back to end at the border. Torch-free."""

from __future__ import annotations

__all__ = ["sliding_windows"]


def sliding_windows(height: int, width: int, window: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of every window in raster order: max(side - window + stride - 1, 0) // stride + 1 per
    axis."""
    rows = max(height - window + stride - 1, 0) // stride + 1
    cols = max(width - window + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + window, height), min(c * stride + window, width)
            boxes.append((max(y2 - window, 0), y2, max(x2 - window, 0), x2))
    return boxes
