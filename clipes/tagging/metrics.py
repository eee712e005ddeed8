"""Multi-label classification metrics as TagCLIP reports them: mAP and overall F1 / precision / recall."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TagMetrics", "average_precision", "overall_f1", "tag_metrics"]


def average_precision(scores: Tensor, truth: Tensor) -> Tensor:
    """(C,) AP per class of (n, C) scores against (n, C) 0/1 truth; NaN for a class with no positive.

    The authors' ``compute_AP``: rank by score (descending; ties kept in image order), AP = mean of
    the precision at each positive.
    """
    truth = truth.bool()
    order = scores.double().sort(dim=0, descending=True, stable=True).indices
    hits = truth.gather(0, order).double()
    tp = hits.cumsum(0)
    fp = (1 - hits).cumsum(0)
    positives = hits.sum(0)
    ap = (hits * tp / (tp + fp)).sum(0) / positives
    return torch.where(positives > 0, ap, torch.full_like(ap, float("nan")))


def overall_f1(scores: Tensor, truth: Tensor, rel: float = 0.5) -> tuple[float, float, float]:
    """F1, precision and recall over all (image, class) pairs, a class predicted when its score is
    above min + rel (max - min) of its image's scores (the authors' ``compute_F1``, 'overall', relative)."""
    lo, hi = scores.amin(dim=1, keepdim=True), scores.amax(dim=1, keepdim=True)
    pred = scores > lo + rel * (hi - lo)
    truth = truth.bool()
    tp = float((pred & truth).sum())
    fp = float((pred & ~truth).sum())
    fn = float((~pred & truth).sum())
    p = tp / (tp + fp + 1e-9)
    r = tp / (tp + fn + 1e-9)
    return (2 * p * r / (p + r) if p + r > 0 else 0.0), p, r


@dataclass
class TagMetrics:
    """``mean_ap`` averages the classes present in the ground truth; ``mean_ap_all_classes`` counts
    absent classes as 0, as the authors' script prints it (equal when every class is present)."""

    images: int
    mean_ap: float
    mean_ap_all_classes: float
    f1: float
    precision: float
    recall: float
    ap: dict[str, float | None]

    def to_dict(self) -> dict:
        """Plain JSON values; an undefined mAP (no class present) is None."""
        return {"images": self.images, "mAP": _finite(self.mean_ap), "mAP_all_classes": self.mean_ap_all_classes,
                "F1": self.f1, "precision": self.precision, "recall": self.recall, "AP": self.ap}


def _finite(x: float) -> float | None:
    return x if x == x else None


def tag_metrics(scores: Tensor, truth: Tensor, classes: tuple[str, ...] | list[str], rel: float = 0.5) -> TagMetrics:
    """All of the above for (n, C) scores and (n, C) truth of the classes ``classes``."""
    ap = average_precision(scores, truth)
    present = ~ap.isnan()
    f1, p, r = overall_f1(scores, truth, rel)
    return TagMetrics(
        images=int(scores.shape[0]),
        mean_ap=float(ap[present].mean()) if present.any() else float("nan"),
        mean_ap_all_classes=float(ap.nan_to_num(0.0).mean()),
        f1=f1, precision=p, recall=r,
        ap={c: (None if a != a else float(a)) for c, a in zip(classes, ap.tolist(), strict=True)})
