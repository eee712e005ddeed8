"""``load_clip``: which loader a ``--model`` spec names (a file, a folder, an open_clip name, a hub id), and
the frozen, fp32-layer-norm model it returns whatever the loader."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..weights import check_finite
from . import named
from .base import DEFAULT_MODEL, MODEL_ENV, TRANSFORMERS_ARCH, ClipModel, ModelLoadError, how_to, how_to_path
from .device import cast_vision_weights, fp32_layer_norms
from .openai import ARCH as OPENAI_ARCH
from .openai import load_openai_file

__all__ = ["load_clip"]


def load_clip(spec: str | None = None, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, flag: str = "--model") -> ClipModel:
    """Load frozen CLIP weights from ``spec``.

    ``spec`` is one of: ``ARCH/TAG`` (open_clip name and pretrained tag, e.g. ``ViT-B-16/openai``),
    ``ARCH`` alone (random weights, for tests and benchmarks), ``hf-hub:org/repo``, a path to an
    OpenAI-format or open_clip checkpoint (architecture inferred), ``ARCH:PATH``, or a Hugging Face
    transformers CLIP: a folder of ``CLIPModel.save_pretrained`` or a hub id ``org/repo``.
    ``None`` reads ``$CLIPES_MODEL`` and falls back to ``ViT-B-16/openai``. Errors tell the user to pass
    ``flag``, the option that gave ``spec``. ``dtype`` bf16 or fp16 casts the vision tower's matrix
    weights once (``cast_vision_weights``); layer norms compute in fp32 whatever the dtype, on every device.
    """
    spec = spec or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    path = Path(spec).expanduser()
    arch_name, sep, arch_path = spec.partition(":")
    tokenizer = None
    try:
        if path.is_file():
            model, arch = load_openai_file(path), OPENAI_ARCH
        elif path.is_dir():
            from .transformers_clip import load_folder

            (model, tokenizer), arch = load_folder(path), TRANSFORMERS_ARCH
        elif sep and not spec.startswith("hf-hub:") and named.is_arch(arch_name):
            model, arch = named.create_with_file(arch_name, arch_path, flag), arch_name
        elif spec.startswith("hf-hub:"):
            model, arch = named.create_hf_hub(spec, flag), spec
        elif spec.startswith(("/", "./", "~", "..")) or spec.endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise ModelLoadError(f"checkpoint file not found: {path}. " + how_to_path(flag))
        else:
            from .transformers_clip import is_hub_id, load_hub_id

            arch, _, tag = spec.partition("/")
            if tag and not named.is_arch(arch) and is_hub_id(spec):
                (model, tokenizer), arch = load_hub_id(spec, flag), TRANSFORMERS_ARCH
            else:
                model = named.create_named(arch, tag or None, flag)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot load CLIP model {spec!r}: {e}. " + how_to(flag, spec)) from e
    if not hasattr(model, "visual") or not hasattr(model.visual, "transformer"):
        raise ModelLoadError(f"{spec!r} is not a CLIP ViT (clipes needs a vision transformer)")
    check_finite(model.state_dict().items(), f"{flag} {spec}", ModelLoadError)  # every tower, by any path above
    model = fp32_layer_norms(model.to(device=device, dtype=torch.float32).eval().requires_grad_(False))
    cast_vision_weights(model, dtype)
    return ClipModel(model=model, tokenizer=tokenizer or named.tokenizer_for(arch), spec=spec, arch=arch)
