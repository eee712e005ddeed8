"""The CLIP vision transformer, run the CLIP-ES way: any input size, attention weights on demand.

Thin functions over open_clip's ``VisionTransformer`` modules; the weights stay open_clip's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["attention", "block_forward", "embed", "encode_trunk", "interpolate_pos_embed"]


def interpolate_pos_embed(pos: Tensor, grid: tuple[int, int]) -> Tensor:
    """Resize the patch part of a (1 + g*g, D) positional embedding bilinearly to ``grid``; keep CLS."""
    cls, patches = pos[:1], pos[1:]
    side = math.isqrt(patches.shape[0])
    if side * side != patches.shape[0]:
        raise ValueError(f"positional embedding of {patches.shape[0]} patches is not a square grid")
    if (side, side) == tuple(grid):
        return pos
    patches = patches.T.reshape(1, -1, side, side)
    patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
    return torch.cat([cls, patches.reshape(patches.shape[1], -1).T], dim=0)


def embed(visual: nn.Module, images: Tensor) -> Tensor:
    """Patch embedding, CLS token, resized positional embedding and ``ln_pre``: (B, 1 + n, D)."""
    x = visual.conv1(images)
    grid = (x.shape[-2], x.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + interpolate_pos_embed(visual.positional_embedding, grid).to(x.dtype)
    return visual.ln_pre(x)


def attention(attn: nn.MultiheadAttention, x: Tensor, need_weights: bool) -> tuple[Tensor, Tensor | None]:
    """Multi-head self-attention on (B, L, D); with ``need_weights`` also the head-averaged weights."""
    if not isinstance(attn, nn.MultiheadAttention):
        raise TypeError(f"clipes supports CLIP ViTs with nn.MultiheadAttention, not {type(attn).__name__}")
    b, length, dim = x.shape
    heads = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, length, heads, dim // heads).transpose(1, 2) for t in (q, k, v))
    weights = None
    if need_weights:
        probs = torch.softmax((q * (dim // heads) ** -0.5) @ k.transpose(-2, -1), dim=-1)
        out = probs @ v
        weights = probs.mean(dim=1)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(1, 2).reshape(b, length, dim)
    return attn.out_proj(out), weights


def block_forward(block: nn.Module, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
    """One residual attention block of open_clip (pre-norm, optional layer scale)."""
    out, weights = attention(block.attn, block.ln_1(x), need_weights)
    x = x + block.ls_1(out)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, weights


def encode_trunk(visual: nn.Module, images: Tensor, attn_blocks: int = 8) -> tuple[Tensor, Tensor]:
    """Run every block but the last; return its input tokens and the summed attention for CAA.

    The sum covers the head-averaged patch-to-patch attention (CLS row and column dropped) of the
    blocks among the last ``attn_blocks`` that precede the final one: ``attn_blocks - 1`` maps.
    """
    x = embed(visual, images)
    blocks = visual.transformer.resblocks
    first_kept = len(blocks) - attn_blocks
    attn_sum = None
    for i, block in enumerate(blocks[:-1]):
        x, w = block_forward(block, x, need_weights=i >= first_kept)
        if w is not None:
            w = w[:, 1:, 1:].float()
            attn_sum = w if attn_sum is None else attn_sum + w
    if attn_sum is None:
        n = x.shape[1] - 1
        attn_sum = x.new_zeros(x.shape[0], n, n, dtype=torch.float32)
    return x, attn_sum
