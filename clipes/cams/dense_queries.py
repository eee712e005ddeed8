"""The dense methods' text queries: lines of words, one line per class, line 0 the background.

For ``--classes voc`` each method takes its authors' ``configs/cls_voc21.txt``: SCLIP's and NACLIP's
line 0 holds 26 background words and person and tvmonitor have synonyms (56 queries); ClearCLIP's
(MaskCLIP's too) holds the 21 plain names, ``background`` first. For another class set the same recipe
runs over its own words: line 0 its background prompts, then per class its name and the synonyms of
its prompt (``person with clothes,people,human`` gives three). Each word becomes CLIP's 80 ImageNet
templates, each text feature L2-normalised, averaged, normalised again.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import torch
from torch import Tensor

from ..model import ClipModel
from ..prompts import ClassSet
from ..text import encode_prompts

__all__ = ["CLEARCLIP_VOC21", "SCLIP_VOC21", "Queries", "encode_queries", "openai_templates", "query_lines"]

_VOC_WORDS = ("aeroplane", "bicycle", "bird", "ship", "bottle", "bus", "car", "cat", "chair", "cow", "table", "dog",
              "horse", "motorbike")
SCLIP_VOC21: tuple[tuple[str, ...], ...] = (
    ("sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk", "bed", "building",
     "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf", "curtain", "stair", "floor", "hill", "rail",
     "fence"),
    *((w,) for w in _VOC_WORDS),
    ("person", "person in shirt", "person in jeans", "person in dress", "person in sweater", "person in skirt",
     "person in jacket"),
    ("pottedplant",), ("sheep",), ("sofa",), ("train",),
    ("television monitor", "tv monitor", "monitor", "television", "screen"),
)
CLEARCLIP_VOC21: tuple[tuple[str, ...], ...] = (
    ("background",), *((w,) for w in _VOC_WORDS), ("person",), ("pottedplant",), ("sheep",), ("sofa",), ("train",),
    ("tvmonitor",),
)
_BUILTIN = {"sclip": SCLIP_VOC21, "plain": CLEARCLIP_VOC21}


def openai_templates() -> tuple[str, ...]:
    """CLIP's 80 ImageNet templates as shipped in ``clipes/prompts/`` (read here, not through
    ``clipes.prompt_selection``, which imports the data pipeline and with it the Labeler)."""
    text = resources.files("clipes.prompts").joinpath("imagenet_templates.txt").read_text(encoding="utf-8")
    return tuple(s for line in text.splitlines() if (s := line.strip()) and not s.startswith("#"))


def query_lines(style: str, class_set: ClassSet) -> tuple[tuple[str, ...], ...]:
    """Line 0 the background words, line c + 1 the words of class c (see the module's docstring)."""
    if class_set.name == "voc" and len(class_set) == 20 and class_set.classes[0] == "aeroplane":
        return _BUILTIN[style]
    lines = [tuple(class_set.background)]
    for name, prompt in zip(class_set.classes, class_set.prompts, strict=True):
        words = [name, *(w.strip() for w in prompt.split(",") if w.strip())]
        lines.append(tuple(dict.fromkeys(words)))
    return tuple(lines)


@dataclass(frozen=True)
class Queries:
    """Unit-norm query features ``features`` (Q, E) and the line of each, ``line`` (Q,) long (0 = background,
    c + 1 = class c)."""

    features: Tensor
    line: Tensor

    def restricted(self, classes: list[int]) -> tuple[Tensor, Tensor]:
        """Indices of the queries of background and ``classes``, and each one's line renumbered 0
        (background), 1.. (the classes in the order given: ``dense_segment`` gives them in class order,
        the order of the authors' label-restricted class files)."""
        keep, lines = [], []
        for new, old in enumerate([0, *(c + 1 for c in classes)]):
            idx = torch.nonzero(self.line == old).flatten()
            keep.append(idx)
            lines.append(torch.full_like(idx, new))
        return torch.cat(keep), torch.cat(lines)


def encode_queries(clip: ClipModel, lines: tuple[tuple[str, ...], ...]) -> Queries:
    """Every word of ``lines`` embedded with the 80 ImageNet templates (normalise, mean, normalise)."""
    words = [w for line in lines for w in line]
    features = encode_prompts(clip, words, openai_templates())
    line = torch.tensor([i for i, ws in enumerate(lines) for _ in ws], dtype=torch.long, device=features.device)
    return Queries(features, line)
