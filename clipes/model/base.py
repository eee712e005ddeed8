"""What every CLIP loader shares: the loaded model's type, the error it raises and the advice it gives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..defaults import DEFAULT_MODEL, MODEL_ENV
from ..errors import ClipesError
from ..model_spec import LOCAL_HINT

__all__ = ["DEFAULT_MODEL", "MODEL_ENV", "TRANSFORMERS_ARCH", "ClipModel", "ModelLoadError", "how_to", "how_to_path"]

TRANSFORMERS_ARCH = "transformers-clip"  # ClipModel.arch of a transformers CLIPModel folder or hub id
# for named weights (ARCH/TAG, hub ids): the cache is where a download would have put them
_HOW_TO = LOCAL_HINT + ("; or pre-download '{name}' into the Hugging Face cache (HF_HOME) on a machine with "
                        "internet access.")
# for a checkpoint path that does not exist: the cache has nothing to do with it
_HOW_TO_PATH = LOCAL_HINT + "."


def how_to(flag: str, name: str) -> str:
    """The advice closing every error about named weights that cannot be had: the ways to give them."""
    return _HOW_TO.format(flag=flag, name=name)


def how_to_path(flag: str) -> str:
    """The advice after a checkpoint path that does not exist: a local file, not the cache."""
    return _HOW_TO_PATH.format(flag=flag)


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
