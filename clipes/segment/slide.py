"""mmseg's sliding-window inference (``EncoderDecoder.slide_inference``), as SETR's configs test (480 / 320).

Windows of ``crop`` every ``stride`` pixels, the last of each row and column moved back to end at the border;
each window's logits are added where it lies and the sum divided by how many windows cover each pixel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..windows import sliding_windows as slide_windows

__all__ = ["slide_logits", "slide_windows"]


def slide_logits(predict: Callable[[Tensor], Tensor], x: Tensor, crop: int, stride: int) -> Tensor:
    """(B, C, H, W) logits of ``x`` (B, 3, H, W) from ``predict`` run on each window (logits at its size)."""
    h, w = x.shape[-2:]
    total: Tensor | None = None
    count = torch.zeros((1, 1, h, w), device=x.device)
    for y1, y2, x1, x2 in slide_windows(h, w, crop, stride):
        logits = predict(x[..., y1:y2, x1:x2]).float()
        if total is None:
            total = torch.zeros((*logits.shape[:2], h, w), device=x.device)
        total += F.pad(logits, (x1, w - x2, y1, h - y2))
        count[..., y1:y2, x1:x2] += 1
    assert total is not None
    return total / count
