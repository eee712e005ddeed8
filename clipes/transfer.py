"""Results to the host: one pinned, asynchronous copy for a whole batch instead of one per tensor."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["to_host"]

_ALIGN = 16  # bytes: every piece starts where any dtype's view may


def to_host(tensors: Sequence[Tensor]) -> list[np.ndarray]:
    """NumPy arrays of ``tensors`` (one device; float, integer or bool).

    On the CPU they are the tensors' own memory (no copy). On a GPU every tensor's bytes go into
    one device buffer, which one asynchronous copy brings into pinned host memory; the host waits
    once for the batch, and each array is a view of its piece.
    """
    if not tensors or tensors[0].device.type == "cpu":
        return [t.detach().numpy() for t in tensors]
    pieces, offsets, end = [], [], 0
    for t in tensors:
        raw = t.detach().contiguous().view(-1).view(torch.uint8)
        pad = -raw.numel() % _ALIGN
        pieces += [raw, raw.new_zeros(pad)] if pad else [raw]
        offsets.append(end)
        end += raw.numel() + pad
    device_buffer = torch.cat(pieces)
    host = torch.empty(device_buffer.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(device_buffer, non_blocking=True)
    torch.cuda.current_stream(device_buffer.device).synchronize()
    return [host[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape).numpy()
            for o, t in zip(offsets, tensors, strict=True)]
