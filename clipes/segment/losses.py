"""The training loss of the segmenter: CLIP-ES's confidence-guided loss (CGL), on one output or on a model's
main and auxiliary outputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from ..masks import IGNORE

__all__ = ["cgl_loss", "segmentation_loss"]


def cgl_loss(logits: Tensor, labels: Tensor, weights: Tensor, norm: Tensor | float) -> Tensor:
    """Sum of weighted per-pixel cross-entropy over pixels whose label is not 255, divided by ``norm``."""
    ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="none")
    return (ce * weights * (labels != IGNORE)).sum() / norm


def segmentation_loss(out: Tensor | Sequence[tuple[float, Tensor]], labels: Tensor, weights: Tensor,
                      norm: Tensor | float) -> Tensor:
    """CGL of a model's output: its logits, or the weighted sum over ``(loss weight, logits)`` pairs of a
    model with auxiliary heads (mmseg's sum of each head's loss times its ``loss_weight``)."""
    if isinstance(out, Tensor):
        return cgl_loss(out, labels, weights, norm)
    return sum(w * cgl_loss(logits, labels, weights, norm) for w, logits in out)  # type: ignore[return-value]
