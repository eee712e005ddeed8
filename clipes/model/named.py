"""CLIP by open_clip name: ``ARCH/TAG`` (pretrained, from the cache or the hub), ``ARCH`` (random weights),
``ARCH:PATH`` (an open_clip checkpoint file) and ``hf-hub:org/repo``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
from torch import nn

from . import hub
from .base import ModelLoadError, how_to, how_to_path

__all__ = ["cached_pretrained", "create_hf_hub", "create_named", "create_with_file", "is_arch", "tokenizer_for"]


def is_arch(name: str) -> bool:
    """Whether ``name`` is an open_clip architecture."""
    return name in open_clip.list_models()


def cached_pretrained(arch: str, tag: str) -> str | None:
    """Local path of open_clip pretrained weights already in the Hugging Face cache, if any."""
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    repo_path = cfg.get("hf_hub", "")
    if not repo_path:
        return None
    from huggingface_hub import try_to_load_from_cache

    sub = repo_path.strip("/").split("/", 2)
    repo = "/".join(sub[:2])
    names = [sub[2]] if len(sub) > 2 and sub[2] else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for name in names:
        hit = try_to_load_from_cache(repo, name)
        if isinstance(hit, str):
            return hit
    return None


def create_named(arch: str, tag: str | None, flag: str = "--model") -> nn.Module:
    """An open_clip architecture, randomly initialised (no tag) or with a pretrained tag's weights."""
    if not is_arch(arch):
        raise ModelLoadError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    if tag is None:
        return open_clip.create_model(arch)
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = [t for a, t in open_clip.list_pretrained() if a == arch]
        raise ModelLoadError(f"unknown pretrained tag {tag!r} for {arch}; known: {', '.join(tags)}")
    cached = cached_pretrained(arch, tag)
    if cached:
        return open_clip.create_model(arch, pretrained=cached, force_quick_gelu=bool(cfg.get("quick_gelu", False)))
    if not hub.reachable():
        raise ModelLoadError(f"weights for {arch}/{tag} are not cached and cannot be downloaded "
                             "(no network). " + how_to(flag, f"{arch}/{tag}"))
    return open_clip.create_model(arch, pretrained=tag)


def create_with_file(arch: str, path: str, flag: str = "--model") -> nn.Module:
    """``ARCH:PATH``: an open_clip architecture with the weights of a local checkpoint file."""
    ckpt = Path(path).expanduser()
    if not ckpt.is_file():
        raise ModelLoadError(f"checkpoint file not found: {ckpt}. " + how_to_path(flag))
    return open_clip.create_model(arch, pretrained=str(ckpt))


def create_hf_hub(spec: str, flag: str = "--model") -> nn.Module:
    """``hf-hub:org/repo``: an open_clip model on the Hugging Face hub (a cached copy under ``HF_HUB_OFFLINE``)."""
    if not hub.offline() and not hub.reachable():
        raise ModelLoadError(f"cannot reach the Hugging Face hub to fetch {spec}; set HF_HUB_OFFLINE=1 "
                             "to use a cached copy. " + how_to(flag, spec))
    return open_clip.create_model(spec)


def tokenizer_for(arch: str) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's tokenizer for a named architecture; CLIP's BPE tokenizer for OpenAI-layout checkpoints."""
    if arch.startswith("hf-hub:") or is_arch(arch):
        return open_clip.get_tokenizer(arch)
    return open_clip.tokenize
