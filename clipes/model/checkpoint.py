"""The one checkpoint reader under every CLIP loader: a state dict of tensors from any file it may come in."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .base import ModelLoadError

__all__ = ["read_state_dict"]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from an OpenAI JIT archive or a (possibly wrapped) torch/safetensors file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # TorchScript archives are dispatched, fine
                state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as load_error:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    state = torch.jit.load(str(path), map_location="cpu").state_dict()
            except Exception:
                raise ModelLoadError(f"{path}: not a readable PyTorch checkpoint ({load_error})") from load_error
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}
