"""Segmenter's mask transformer head (Strudel et al., ICCV 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MaskTransformerHead"]


class MaskTransformerHead(nn.Module):
    """Learnable class tokens attend jointly with the patch tokens; masks are the scalar products of
    normalised patch and class embeddings."""

    def __init__(self, dim: int, num_classes: int, d_model: int = 256, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, d_model)
        self.cls = nn.Parameter(torch.randn(1, num_classes, d_model) * d_model ** -0.5)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.proj_patch = nn.Linear(d_model, d_model, bias=False)
        self.proj_cls = nn.Linear(d_model, d_model, bias=False)
        self.norm = nn.LayerNorm(num_classes)

    def forward(self, feats: Tensor) -> Tensor:
        b, _, h, w = feats.shape
        x = self.proj_in(feats.flatten(2).transpose(1, 2))
        x = self.blocks(torch.cat([x, self.cls.expand(b, -1, -1)], dim=1))
        patches, cls = x[:, : h * w], x[:, h * w:]
        patches = F.normalize(self.proj_patch(patches), dim=-1)
        cls = F.normalize(self.proj_cls(cls), dim=-1)
        masks = self.norm(patches @ cls.transpose(1, 2))
        return masks.transpose(1, 2).reshape(b, -1, h, w)
