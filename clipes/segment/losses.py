"""The segmenter's loss choices: plain cross-entropy (the authors'), a class-balanced one, and what a loss is
averaged over; on one output or on a model's main and auxiliary outputs (``segmentation_loss``).

- ``ce``: the confidence-guided cross-entropy of CLIP-ES (255 ignored, pixels weighted by the saved CRF
  confidence when given), as deeplab-pytorch and mmseg train.
- ``balanced-ce``: the class-balanced cross-entropy of Lee et al.'s AdvCAM / AMN code (``balanced_cross_entropy``):
  the mean cross-entropy over background pixels and the mean over foreground pixels, averaged, so that a large
  background does not drown the objects. A reproduction of CLIP-ES's DeepLab-v2 from the ImageNet init reported
  NaN losses at lr 2e-4 with plain CE and trained with this one (69.7 mIoU on VOC val).

Averaging (``loss_norm``): ``labelled`` divides the summed loss by the (confidence-weighted) labelled pixels of
the batch (CLIP-ES's CGL); ``all`` by every pixel of the crops, padding and ignored pixels included (mmseg's
``CrossEntropyLoss`` with ``avg_non_ignore`` off, as SETR trains).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..masks import IGNORE

__all__ = ["LOSSES", "LOSS_NORMS", "balanced_ce", "cgl_loss", "loss_norm", "segmentation_loss"]

LOSSES = ("ce", "balanced-ce")
LOSS_NORMS = ("labelled", "all")


def balanced_ce(logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """(mean CE over background pixels + mean CE over foreground pixels) / 2, 255 ignored, each pixel weighted
    by ``weights``; a crop without background (or without foreground) takes the other group's mean alone
    (the authors' code divides by zero there)."""
    ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="none") * weights
    groups = [weights * (labels == 0), weights * ((labels != 0) & (labels != IGNORE))]
    means = [(ce * (g > 0)).sum() / g.sum() for g in groups if g.sum() > 0]
    if not means:
        return (ce * 0).sum()  # nothing labelled: no gradient, but still part of the graph
    return torch.stack(means).mean()


def loss_norm(labels: Tensor, weights: Tensor, mode: str, world: int = 1) -> Tensor:
    """What a batch's summed loss is divided by: its weighted labelled pixels (``labelled``, summed over the
    ``world`` processes, which DDP then averages) or all its pixels (``all``: every process has as many)."""
    if mode == "all":
        return torch.tensor(float(labels.numel()), device=labels.device)
    valid = ((labels != IGNORE) * weights).sum()
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(valid)
    return valid.clamp_min(1e-6) / world


def cgl_loss(logits: Tensor, labels: Tensor, weights: Tensor, norm: Tensor | float) -> Tensor:
    """Sum of weighted per-pixel cross-entropy over pixels whose label is not 255, divided by ``norm``."""
    ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="none")
    return (ce * weights * (labels != IGNORE)).sum() / norm


def segmentation_loss(out: Tensor | Sequence[tuple[float, Tensor]], labels: Tensor, weights: Tensor,
                      norm: Tensor | float, loss: str = "ce") -> Tensor:
    """CGL of a model's output: its logits, or the weighted sum over ``(loss weight, logits)`` pairs of a
    model with auxiliary heads (mmseg's sum of each head's loss times its ``loss_weight``). ``loss``
    "balanced-ce": the class-balanced cross-entropy of these pixels instead (``norm`` unused)."""
    def one(logits: Tensor) -> Tensor:
        return balanced_ce(logits, labels, weights) if loss == "balanced-ce" else cgl_loss(logits, labels, weights,
                                                                                            norm)

    if isinstance(out, Tensor):
        return one(out)
    return sum(w * one(logits) for w, logits in out)  # type: ignore[return-value]
