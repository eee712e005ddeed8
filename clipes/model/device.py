"""Where and in what precision a loaded CLIP runs: the device asked for, fp32 layer norms, cast weights."""

from __future__ import annotations

import open_clip
import torch
from torch import nn

from .base import ModelLoadError

__all__ = ["cast_vision_weights", "fp32_layer_norms", "resolve_device"]


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is an error, not a silent fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"--device {device!r}: choose auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelLoadError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


def fp32_layer_norms(model: nn.Module) -> nn.Module:
    """Make every LayerNorm of ``model`` compute in fp32 and return its input's dtype, in place.

    As OpenAI's CLIP does, and what low precision needs: CUDA's layer norm refuses a bf16 input with
    fp32 weights (the text tower crashed so), the CPU's accepts it. For fp32 inputs nothing changes.
    """
    for module in model.modules():
        if type(module) in (nn.LayerNorm, open_clip.transformer.LayerNorm):
            module.__class__ = open_clip.transformer.LayerNormFp32
    return model


def cast_vision_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The vision tower's matrix weights (convolution, linear, attention, projection) in ``dtype``, once.

    Layer norms, embeddings and the text tower stay fp32: the text features are computed once per
    class set, in full precision.
    """
    if dtype != torch.float32:
        open_clip.model.convert_weights_to_lp(model.visual, dtype)
    return model
