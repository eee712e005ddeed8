"""The deterministic weights of golden/deeplab/deeplabv2_msc.npz, rebuilt from the file's seed and layout
(``../shared/deeplab-reference.md``, "Golden data"); shared by the parity test and the GPU check."""

from __future__ import annotations

import math

import numpy as np
import torch


def rebuild_weights(ref: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """One generator seeded with ``seed``; for each key in the file's (sorted) order a standard normal draw
    of its shape, scaled by the key's rule."""
    g = torch.Generator().manual_seed(int(ref["seed"]))
    state = {}
    for key, shape in zip(ref["keys"], ref["shapes"], strict=True):
        key = str(key)
        shape = tuple(int(s) for s in str(shape).split(","))
        r = torch.randn(shape, generator=g)
        if key.startswith("aspp.") and key.endswith(".weight"):
            value = r * 5e-5
        elif key.startswith("aspp.") and key.endswith(".bias"):
            value = r * 0.01
        elif len(shape) == 4:
            value = r * math.sqrt(1 / (shape[1] * shape[2] * shape[3]))
        elif key.endswith(".bn.weight"):
            value = 1 + 0.1 * r
        elif key.endswith((".bn.bias", ".bn.running_mean")):
            value = 0.1 * r
        elif key.endswith(".bn.running_var"):
            value = 1 + 0.1 * r.abs()
        else:
            raise ValueError(f"no rule for {key}")
        state[key] = value
    return state
