"""DeepLab-v2's ASPP head for torchvision ResNets."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ASPPv2"]


class ASPPv2(nn.Module):
    """DeepLab-v2's ASPP (LargeFOV per branch): parallel 3x3 convolutions at dilations 6, 12, 18, 24 straight
    to class scores, summed (Chen et al., 2017; deeplab-pytorch's ``_ASPP``, weights N(0, 0.01), biases 0)."""

    def __init__(self, in_ch: int, num_classes: int, rates: tuple[int, ...] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(in_ch, num_classes, 3, padding=r, dilation=r) for r in rates)
        for conv in self.branches:
            nn.init.normal_(conv.weight, 0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, feats: Tensor) -> Tensor:
        return sum(conv(feats) for conv in self.branches)
