"""The CAM-method seam: the trunk's tokens and the (image, class) pairs in, one class map per pair out.

CLIP-ES explains each present class of an image with a class activation map on the patch grid, then
refines it with the ViT's attention (CAA). How that map is made is one module of this package,
registered in ``CAMS`` under its ``--cam`` name. A method says from which block on it runs the
transformer itself (``first_block``); the Labeler runs the blocks before it without gradients
(``clipes.vit.encode_trunk``) and hands it their output tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from ..cam import CamPairs
from ..errors import ClipesError

__all__ = ["CamError", "CamMaps", "CamMethod"]


class CamError(ClipesError):
    """A CAM method cannot be used as asked (unknown name, option of another method, bad value)."""


@dataclass
class CamMaps:
    """A size group's maps: ``cams`` (P, h, w) per pair, normalised to [0, 1] (what the boxes and CAA
    take), ``probs`` (P, K) the softmax over each pair's text set, and ``attention`` (I, n, n) float32,
    per image with pairs (in the order of ``pairs.image``), the summed head-mean patch-to-patch
    attention (CLS dropped) of the CAA blocks the method ran itself."""

    cams: Tensor
    probs: Tensor
    attention: Tensor


class CamMethod(ABC):
    """A class activation map of CLIP-ES's target on a CLIP ViT.

    The target of pair p is the softmax probability of its class over [the image's classes] +
    [background prompts], from the mean patch token after the last block (``clipes.cam``). ``name``
    is the ``--cam`` value; ``flags`` maps each constructor keyword to the ``clipes label`` flag that
    sets it. ``per_pair`` runs one backward per (image, class), the reference's cost: a baseline
    for benchmarks and tests, with the same results.
    """

    name: ClassVar[str]
    flags: ClassVar[dict[str, str]] = {}

    def __init__(self, per_pair: bool = False) -> None:
        self.per_pair = per_pair

    @classmethod
    def spelling(cls) -> str:
        return f"--cam {cls.name}"

    def first_block(self, depth: int) -> int:
        """Index of the first of the ``depth`` blocks this method runs itself; the last one by default.

        Raises a ``CamError`` when the method cannot run on a transformer of that depth.
        """
        return depth - 1

    def settings(self) -> dict[str, Any]:
        """What identifies this method's maps (name and options), for a run's manifest."""
        return {"name": self.name}

    @abstractmethod
    def __call__(self, visual: nn.Module, tokens: Tensor, pairs: CamPairs, logit_scale: float,
                 grid: tuple[int, int], attn_blocks: range) -> CamMaps:
        """Maps of every pair of a size group.

        ``tokens`` (B, L, D) enter block ``first_block(depth)``; ``attn_blocks`` are the blocks whose
        attention CAA uses: the method sums the head-mean attention of those it runs itself
        (``CamMaps.attention``).
        """
