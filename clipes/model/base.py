"""What every CLIP loader shares: the loaded model's type, the error it raises and the advice it gives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..defaults import DEFAULT_MODEL, MODEL_ENV
from ..errors import ClipesError

__all__ = ["DEFAULT_MODEL", "MODEL_ENV", "TRANSFORMERS_ARCH", "ClipModel", "ModelLoadError", "how_to"]

TRANSFORMERS_ARCH = "transformers-clip"  # ClipModel.arch of a transformers CLIPModel folder or hub id
_HOW_TO = (f"Pass {{flag}} with a local checkpoint (e.g. {{flag}} ~/weights/ViT-B-16.pt, an OpenAI or "
           f"open_clip state dict, ARCH:PATH such as ViT-B-16:/path/open_clip_model.safetensors, or a "
           f"transformers CLIP folder), "
           f"or set {MODEL_ENV} to one; or pre-download '{{name}}' into the Hugging Face cache "
           f"(HF_HOME) on a machine with internet access.")


def how_to(flag: str, name: str) -> str:
    """The advice closing every error about weights that cannot be had: the ways to give them."""
    return _HOW_TO.format(flag=flag, name=name)


class ModelLoadError(ClipesError):
    """The requested CLIP weights cannot be found, downloaded or understood."""


@dataclass
class ClipModel:
    """A frozen open_clip CLIP model with its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    spec: str
    arch: str

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def patch_size(self) -> int:
        return int(self.model.visual.conv1.kernel_size[0])

    @property
    def device(self) -> torch.device:
        return self.model.visual.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual.conv1.weight.dtype
