"""Text embeddings of a class set, computed once per model and class set."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import ClipModel
from .prompts import ClassSet

__all__ = ["TextFeatures", "encode_class_set", "encode_prompts", "prompt_strings"]


@dataclass(frozen=True)
class TextFeatures:
    """Unit-norm text embeddings: ``fg`` (C, E) per class, ``bg`` (B, E) per background prompt."""

    fg: Tensor
    bg: Tensor


def prompt_strings(names: list[str] | tuple[str, ...], templates: tuple[str, ...]) -> list[str]:
    """The strings the text encoder sees, name-major: every template filled with each name in turn."""
    return [t.format(n) for n in names for t in templates]


@torch.no_grad()
def encode_prompts(clip: ClipModel, names: list[str] | tuple[str, ...], templates: tuple[str, ...]) -> Tensor:
    """Per name: embed every template, normalise, average, normalise again (CLIP's zero-shot recipe)."""
    prompts = prompt_strings(names, templates)
    tokens = clip.tokenizer(prompts).to(clip.device)
    emb = F.normalize(clip.model.encode_text(tokens).float(), dim=-1)
    emb = emb.view(len(names), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


def encode_class_set(clip: ClipModel, class_set: ClassSet) -> TextFeatures:
    """Embed the fused class prompts and the background prompts with the class set's templates."""
    return TextFeatures(fg=encode_prompts(clip, class_set.prompts, class_set.templates),
                        bg=encode_prompts(clip, class_set.background, class_set.templates))
