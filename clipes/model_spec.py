"""What ``--model`` names, checked without torch or open_clip: a checkpoint path that is not there is
answered before anything heavy loads, with the hint that fits a path (never the Hugging Face cache's)."""

from __future__ import annotations

import os
from pathlib import Path

from .defaults import DEFAULT_MODEL, MODEL_ENV
from .errors import ClipesError

__all__ = ["CHECKPOINT_SUFFIXES", "LOCAL_HINT", "MissingCheckpointError", "check_checkpoint_path"]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
# how to point at weights on this machine; ``{flag}`` is the option that named them
LOCAL_HINT = (f"Pass {{flag}} with a local checkpoint (e.g. {{flag}} ~/weights/ViT-B-16.pt, an OpenAI or "
              f"open_clip state dict, ARCH:PATH such as ViT-B-16:/path/open_clip_model.safetensors, or a "
              f"transformers CLIP folder), or set {MODEL_ENV} to one")


class MissingCheckpointError(ClipesError):
    """``--model`` names a checkpoint file that does not exist."""


def _path_like(text: str) -> bool:
    return text.startswith(("/", "./", "~", "..")) or text.endswith(CHECKPOINT_SUFFIXES)


def check_checkpoint_path(spec: str | None, flag: str = "--model") -> None:
    """Raise ``MissingCheckpointError`` when ``spec`` (None: ``$CLIPES_MODEL``, else the default) is a
    checkpoint path, or ``ARCH:PATH``, whose file does not exist; names (``ARCH/TAG``, hub ids) pass."""
    spec = spec or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    if spec.startswith("hf-hub:") or Path(spec).expanduser().exists():
        return
    _arch, sep, rest = spec.partition(":")
    if sep and rest and (_path_like(rest) or "/" in rest):
        target = Path(rest).expanduser()
    elif _path_like(spec):
        target = Path(spec).expanduser()
    else:
        return
    if not target.is_file():
        raise MissingCheckpointError(f"checkpoint file not found: {target}. " + LOCAL_HINT.format(flag=flag) + ".")
