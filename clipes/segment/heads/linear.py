"""Per-patch linear classifier (Segmenter's linear baseline)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["LinearHead"]


class LinearHead(nn.Module):
    """A 1x1 convolution from the encoder's features to class logits."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, num_classes, 1)

    def forward(self, feats: Tensor) -> Tensor:
        return self.proj(feats)
