"""GETAM on CLIP: every block's attention weighted element-wise by its gradient (Sun et al., 2112.02841).

The map of a class sums, over the blocks from ``start`` on, ``mean_h(relu(G * A)) * mean_h(relu(G))``
with ``A`` a block's per-head attention and ``G`` the gradient of CLIP-ES's target with respect to it,
and keeps the CLS row's patch columns: the authors' ``generate_cam_2`` (weixuansun/GETAM, ``DPT/DPT.py``),
``getam-reference.md`` in the shared folder.

Only the CLS row of each block's ``G * A`` reaches the map, so the attention runs fused (SDPA) and
the row is rebuilt beside it: ``A[h, 0]`` from the CLS query, ``G[h, 0] = dO[h, 0] @ V[h]^T`` from the
gradient of the block's per-head attention output ``O = A @ V``. No (P, H, L, L) tensor is kept.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cam import CamPairs, first_pair_of_each_image, one_pair_at_a_time, pair_probabilities
from ..method_options import CAM_FLAGS
from ..vit import _attention_probs, head_mean_attention, merge_heads, project_heads
from .base import CamError, CamMaps, CamMethod

__all__ = ["Getam", "getam_maps", "normalize_by_max"]


def getam_maps(visual: nn.Module, tokens: Tensor, pairs: CamPairs, logit_scale: float, grid: tuple[int, int],
               start: int, attn_blocks: range = range(0)) -> tuple[Tensor, Tensor, Tensor]:
    """Raw GETAM maps of every pair, from the tokens entering block ``start``.

    Each pair runs blocks ``start`` to the last on its own copy of its image's tokens, so one backward
    of the summed targets gives every pair its own gradients (the reference does one backward per
    class). The last block's CLS row gets no gradient (the target pools the patch tokens), so that
    block adds nothing, as in the reference.

    Returns the maps (P, h, w) float32 (unnormalised: about 1e-13 on random weights), the
    probabilities (P, K) and, for the I images that have pairs (in the order of ``pairs.image``),
    the head-mean patch attention (I, n, n) summed over the blocks of ``attn_blocks`` run here.
    """
    blocks = visual.transformer.resblocks
    depth = len(blocks)
    first = first_pair_of_each_image(pairs.image)
    n = grid[0] * grid[1]
    attention = torch.zeros(first.numel(), n, n, device=tokens.device)
    outputs, values, cls_rows = [], [], []
    with torch.enable_grad():
        x = tokens[pairs.image].detach().requires_grad_(True)
        for i in range(start, depth):
            block = blocks[i]
            q, k, v = project_heads(block.attn, block.ln_1(x))
            out = F.scaled_dot_product_attention(q, k, v)
            q, k = q.detach(), k.detach()
            outputs.append(out)
            values.append(v.detach())
            cls_rows.append(_attention_probs(q[:, :, :1], k)[:, :, 0])  # A[h, CLS, :], (P, H, L) fp32
            if i in attn_blocks:
                attention += head_mean_attention(q[first], k[first])[:, 1:, 1:]
            x = x + block.ls_1(merge_heads(block.attn, out))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        probs = pair_probabilities(visual, x, pairs, logit_scale)
        target = probs.gather(1, pairs.target[:, None]).sum()
        grads = torch.autograd.grad(target, outputs)
    total = torch.zeros(pairs.image.numel(), tokens.shape[1], device=tokens.device)
    for grad, v, a in zip(grads, values, cls_rows, strict=True):
        g = (grad[:, :, :1].float() @ v.float().transpose(-2, -1))[:, :, 0]  # d target / d A[h, CLS, :]
        total += torch.relu(g * a).mean(dim=1) * torch.relu(g).mean(dim=1)
    return torch.relu(total[:, 1:]).view(-1, *grid), probs.detach(), attention


def normalize_by_max(maps: Tensor) -> Tensor:
    """Each map divided by its maximum, no epsilon (GETAM's maps can be ~1e-13); an all-zero map stays 0."""
    top = maps.flatten(1).amax(dim=1)
    return maps / torch.where(top > 0, top, torch.ones_like(top)).view(-1, *[1] * (maps.dim() - 1))


class Getam(CamMethod):
    """GETAM summed over the blocks from ``start`` on (6: the authors' setting, blocks 7..12 of
    ViT-B's 12; 0: every block), each map divided by its maximum."""

    name = "getam"
    flags: ClassVar[dict[str, str]] = CAM_FLAGS["getam"]

    def __init__(self, start: int = 6, per_pair: bool = False) -> None:
        super().__init__(per_pair)
        if start < 0:
            raise CamError(f"--getam-start {start}: give a block index, 0 (every block) or more")
        self.start = start

    def first_block(self, depth: int) -> int:
        if self.start >= depth:
            raise CamError(f"--getam-start {self.start}: the model's vision transformer has {depth} blocks, "
                           f"numbered 0 to {depth - 1}")
        return self.start

    def settings(self) -> dict:
        return {"name": self.name, "start": self.start}

    def __call__(self, visual: nn.Module, tokens: Tensor, pairs: CamPairs, logit_scale: float,
                 grid: tuple[int, int], attn_blocks: range) -> CamMaps:
        args = (logit_scale, grid, self.start, attn_blocks)
        if self.per_pair:
            maps, probs, attention = one_pair_at_a_time(getam_maps, visual, tokens, pairs, *args)
        else:
            maps, probs, attention = getam_maps(visual, tokens, pairs, *args)
        return CamMaps(normalize_by_max(maps), probs, attention)
