"""The tagger seam: images in, every class's score and the present classes out.

A tagger answers "which classes are in this image" when no image-level labels are given. Each
method is one module of this package, registered in ``TAGGERS`` under its ``--tagger`` name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ..errors import ClipesError
from ..model import ClipModel
from ..prompts import ClassSet

__all__ = ["Tagger", "TaggerError", "Tags"]


# the other classes labels.json records beside an image's labels, best first
RECORDED_OTHERS = 5


class TaggerError(ClipesError):
    """A tagger cannot be used as asked (unknown name, unsuitable class set or image)."""


@dataclass
class Tags:
    """A batch's tags: ``scores`` (B, C) float32 on the CPU, every class's final score; ``labels``
    the present classes per image (ascending indices, never empty); ``thresholds`` the score each
    image's labels had to pass (fixed for absolute rules, per image for relative ones)."""

    scores: Tensor
    labels: list[list[int]]
    thresholds: list[float]


class Tagger(ABC):
    """Multi-label classification of images for a class set with a frozen CLIP.

    ``name`` is the ``--tagger`` value, ``source`` what ``labels.json`` records as the labels'
    source. Images are normalised (B, 3, H, W) batches of one size on the model's device, as the
    Labeler prepares them.
    """

    name: ClassVar[str]
    source: ClassVar[str]

    def __init__(self, clip: ClipModel, class_set: ClassSet) -> None:
        self.check_class_set(class_set)
        self.clip = clip
        self.class_set = class_set

    @classmethod
    def check_class_set(cls, class_set: ClassSet) -> None:
        """Raise ``TaggerError`` when this method cannot tag with ``class_set``; any set by default."""
        return None

    @classmethod
    def settings(cls, **options: Any) -> dict[str, Any]:
        """What identifies this tagger's labels in a run's manifest: its name and its threshold."""
        return {"name": cls.name}

    def unusable(self, height: int, width: int) -> str | None:
        """Why an image of this network input size cannot be tagged, or None; every size by default."""
        return None

    @abstractmethod
    def tag(self, images: Tensor, trunk: Tensor | None = None) -> Tags:
        """Tag a batch. ``trunk`` optionally holds the tokens entering the last block, computed the
        CLIP-ES way by the caller; a method that can use them saves a forward pass."""

    def record(self, scores: Tensor, labels: list[int]) -> dict[str, float]:
        """The scores ``labels.json`` keeps for one image: each label's, then the best ``RECORDED_OTHERS``
        other classes' (however many labels the image has), best first."""
        chosen = set(labels)
        order = [int(i) for i in scores.argsort(descending=True, stable=True)]
        keep = [i for i in order if i in chosen] + [i for i in order if i not in chosen][:RECORDED_OTHERS]
        return {self.class_set.classes[i]: round(float(scores[i]), 6) for i in keep}
