"""The CLIP vision transformer, run the CLIP-ES way: any input size, attention weights on demand.

Thin functions over open_clip's ``VisionTransformer`` modules; the weights stay open_clip's.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PositionFn", "add_patch_attention", "attention", "block_forward", "cls_embedding", "embed", "encode_trunk",
           "head_mean_attention", "interpolate_pos_embed", "merge_heads", "mlp_ratio", "project_heads"]


def mlp_ratio(width: int, mlp_width: int) -> float:
    """The ``mlp_ratio`` that makes open_clip build an MLP of ``mlp_width`` units on ``width``. open_clip sizes it
    as ``int(width * mlp_ratio)``, so the plain quotient can floor one short (120 / 88 gives 119); half a unit
    over cannot."""
    return (mlp_width + 0.5) / width


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


PositionFn = Callable[[Tensor, tuple[int, int]], Tensor]


def embed(visual: nn.Module, images: Tensor, positions: PositionFn | None = None) -> Tensor:
    """Patch embedding, CLS token, resized positional embedding and ``ln_pre``: (B, 1 + n, D).

    ``positions`` resizes the (1 + g*g, D) positional embedding to the patch grid: None is CLIP-ES's
    bilinear ``interpolate_pos_embed`` (looked up when called); the dense methods
    (``clipes.cams.dense``) give their authors' bicubic.

    Under autocast the tokens are fp32 whatever the weights' dtype: the residual stream (the sums of
    the blocks' outputs) stays fp32 and only the matrix products run low, as autocast over fp32
    weights runs them; a bf16 residual stream moves CLIP-ES's masks several times more.
    """
    x = visual.conv1(images)
    if torch.is_autocast_enabled(x.device.type):
        x = x.float()
    grid = (x.shape[-2], x.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    resize = interpolate_pos_embed if positions is None else positions
    x = torch.cat([cls, x], dim=1) + resize(visual.positional_embedding, grid).to(x.dtype)
    return visual.ln_pre(x)


def project_heads(attn: nn.MultiheadAttention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values of (B, L, D) tokens, split into heads: three (B, H, L, D / H)."""
    if not isinstance(attn, nn.MultiheadAttention):
        raise TypeError(f"clipes supports CLIP ViTs with nn.MultiheadAttention, not {type(attn).__name__}")
    b, length, dim = x.shape
    heads = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    return tuple(t.reshape(b, length, heads, dim // heads).transpose(1, 2) for t in (q, k, v))  # type: ignore[return-value]


def merge_heads(attn: nn.MultiheadAttention, out: Tensor) -> Tensor:
    """(B, H, L, D / H) per-head outputs -> (B, L, D) after the output projection."""
    b, heads, length, head_dim = out.shape
    return attn.out_proj(out.transpose(1, 2).reshape(b, length, heads * head_dim))


def row_chunk(q: Tensor, length: int) -> int:
    """Query rows per chunk so that one chunk's (B, H, rows, L) scores stay small.

    About 4M elements on the CPU, where it keeps them in cache (twice as fast as one (B, H, L, L)
    pass on a 2-core EPYC), and 256M on accelerators, where it only bounds peak memory.
    """
    budget = 1 << 22 if q.device.type == "cpu" else 1 << 28
    return max(1, budget // (q.shape[0] * q.shape[1] * length))


def _attention_probs(q: Tensor, k: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) for a block of query rows, scaling q first as nn.MultiheadAttention does.

    The softmax is fp32 whatever the scores' dtype: CUDA's autocast does that by itself, the CPU's
    would keep bf16.
    """
    return torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1, dtype=torch.float32)


def head_mean_attention(q: Tensor, k: Tensor) -> Tensor:
    """Head-averaged attention weights (B, L, L), one chunk of query rows at a time."""
    step = row_chunk(q, k.shape[-2])
    return torch.cat([_attention_probs(q[:, :, s:s + step], k).mean(dim=1)
                      for s in range(0, q.shape[-2], step)], dim=1)


def add_patch_attention(q: Tensor, k: Tensor, total: Tensor) -> Tensor:
    """Add the head-averaged patch-to-patch attention weights (CLS row and column dropped) into
    ``total`` (B, L - 1, L - 1), fp32, in place; return it.

    What CAA sums over blocks, computed as ``head_mean_attention`` computes it (same chunks of
    query rows, same values) but added chunk by chunk: no (B, L, L) map per block is ever whole.
    """
    step = row_chunk(q, k.shape[-2])
    for s in range(0, q.shape[-2], step):
        probs = _attention_probs(q[:, :, s:s + step], k)
        first = 1 if s == 0 else 0  # the CLS query row
        total[:, s + first - 1:s + probs.shape[-2] - 1] += probs[:, :, first:, 1:].mean(dim=1)
    return total


def attention(attn: nn.MultiheadAttention, x: Tensor, need_weights: bool) -> tuple[Tensor, Tensor | None]:
    """Multi-head self-attention on (B, L, D); with ``need_weights`` also the head-averaged weights.

    Without weights this is fused attention (SDPA). With them, each chunk of query rows' softmax gives
    both its output rows (probabilities @ v, as nn.MultiheadAttention computes them) and its rows of
    the head average: the weights cost no second softmax, no (B, H, L, L) tensor is ever whole, and
    the residual stream keeps the reference's rounding, which the knife-edge attention votes of
    TagCLIP need (the fused kernel's sums move them on some CPUs).
    """
    q, k, v = project_heads(attn, x)
    if not need_weights:
        return merge_heads(attn, F.scaled_dot_product_attention(q, k, v)), None
    k, v = k.contiguous(), v.contiguous()  # once, not per chunk
    step = row_chunk(q, k.shape[-2])
    outs, weights = [], []
    for s in range(0, q.shape[-2], step):
        probs = _attention_probs(q[:, :, s:s + step], k)
        outs.append(probs.to(v.dtype) @ v)
        weights.append(probs.mean(dim=1))
    return merge_heads(attn, torch.cat(outs, dim=2)), torch.cat(weights, dim=1)


def block_forward(block: nn.Module, x: Tensor, need_weights: bool = False,
                  patch_attention: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """One residual attention block of open_clip (pre-norm, optional layer scale).

    With ``need_weights`` it also returns the head-averaged attention weights (B, L, L); with
    ``patch_attention`` (B, L - 1, L - 1) it adds the patch-to-patch part of them into that tensor.
    """
    if need_weights:  # the outputs from the same probabilities (see ``attention``)
        out, weights = attention(block.attn, block.ln_1(x), True)
        if patch_attention is not None:
            patch_attention += weights[:, 1:, 1:].float()
    else:
        q, k, v = project_heads(block.attn, block.ln_1(x))
        out, weights = merge_heads(block.attn, F.scaled_dot_product_attention(q, k, v)), None
        if patch_attention is not None:
            add_patch_attention(q, k, patch_attention)
    x = x + block.ls_1(out)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, weights


def encode_trunk(visual: nn.Module, images: Tensor, attn_blocks: int | range = 8, stop: int | None = None,
                 positions: PositionFn | None = None) -> tuple[Tensor, Tensor]:
    """Run the blocks before block ``stop`` (None: the last one); return its input tokens and the
    summed attention for CAA.

    The sum covers the head-averaged patch-to-patch attention (CLS row and column dropped) of the
    blocks among the last ``attn_blocks`` (or the block indices of a range) that precede block
    ``stop``: ``attn_blocks - 1`` maps for the default. A CAM method that needs the later blocks
    with gradients (GETAM) runs them itself from these tokens. Every block runs fused attention;
    those in the sum also add their head-mean patch map into it, chunk by chunk. ``positions`` as in
    ``embed``.
    """
    x = embed(visual, images, positions)
    blocks = visual.transformer.resblocks
    kept = attn_blocks if isinstance(attn_blocks, range) else range(len(blocks) - attn_blocks, len(blocks))
    n = x.shape[1] - 1
    attn_sum = x.new_zeros((x.shape[0], n, n), dtype=torch.float32)
    for i, block in enumerate(blocks[:len(blocks) - 1 if stop is None else stop]):
        x, _ = block_forward(block, x, patch_attention=attn_sum if i in kept else None)
    return x, attn_sum


def cls_embedding(visual: nn.Module, trunk: Tensor) -> Tensor:
    """CLIP's image embedding from the trunk's tokens (B, L, D): the last block, ``ln_post`` on the CLS
    token, then ``proj``; (B, E), not normalised. At the image's own resolution, as ``trunk`` is."""
    y, _ = block_forward(visual.transformer.resblocks[-1], trunk)
    feats = visual.ln_post(y[:, 0])
    return feats @ visual.proj if visual.proj is not None else feats
