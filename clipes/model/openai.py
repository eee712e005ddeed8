"""CLIP from a checkpoint file in OpenAI's layout (a JIT archive or a state dict; open_clip's ViTs share it)."""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch
from torch import nn

from .base import ModelLoadError
from .checkpoint import read_state_dict

__all__ = ["ARCH", "load_openai_file"]

ARCH = "openai-state-dict"  # ClipModel.arch of a checkpoint whose layout is read from its shapes


def load_openai_file(path: Path) -> nn.Module:
    """Build the architecture from the tensors' shapes (OpenAI layout, also open_clip's for ViTs).

    Shapes cannot tell the activation: like OpenAI's models this uses QuickGELU. Checkpoints trained
    with GELU (most open_clip/LAION ones) are loaded with ``ARCH:PATH`` (e.g. ``ViT-B-16:ckpt.pt``).
    """
    state = read_state_dict(path)
    if "visual.proj" not in state or "visual.conv1.weight" not in state:
        raise ModelLoadError(
            f"{path}: cannot infer a CLIP ViT from this state dict (no visual.proj / visual.conv1). "
            "For other open_clip architectures pass --model ARCH:PATH, e.g. ViT-B-16:/path/to/ckpt.pt")
    # metadata and buffers that some exports carry (OpenAI's JIT archive, scripted open_clip models)
    extra = ("input_resolution", "context_length", "vocab_size", "attn_mask")
    state: dict[str, torch.Tensor] = {k: v.float() for k, v in state.items() if k not in extra}
    try:
        # the builder rounds weights to fp16 (OpenAI's own files are fp16); reload them at full precision
        model = open_clip.model.build_model_from_openai_state_dict(dict(state)).float()
        model.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as e:
        raise ModelLoadError(f"{path}: state dict does not match the inferred CLIP layout ({e})") from e
    return model
