"""Training-free dense CLIP maps: MaskCLIP, SCLIP, ClearCLIP, NACLIP, each exact to its authors' code.

Each reads a segmentation straight off the frozen CLIP ViT in one forward pass by changing only the
last block; blocks 0 to L-2 run unchanged through the fused trunk (``clipes.vit.encode_trunk``), with
the authors' bicubic positional embedding. No backward. ``dense-reference.md`` in the shared folder
states every constant; the protocol around the forward (resize, sliding windows, thresholds) is
``clipes.cams.dense_protocol``, the query sets ``clipes.cams.dense_queries``.

Last block, with ``q, k, v`` from ``ln_1(x)`` per head:

- MaskCLIP (ClearCLIP's re-implementation): each token attends to itself, ``out_proj(v)``; no residual, no MLP.
- SCLIP: ``softmax(q q^T) + softmax(k k^T)`` over ``v``, residual and MLP kept.
- ClearCLIP: ``softmax(q q^T)`` over ``v``; no residual, no MLP.
- NACLIP: ``softmax(k k^T + omega)`` over ``v``, ``omega`` a Gaussian (std 5) of the patches' grid
  distance, 0 to and from the CLS token; no residual, no MLP.

The patch tokens then go through ``ln_post`` and ``proj``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cam import CamPairs
from ..method_options import CAM_FLAGS
from ..vit import encode_trunk, merge_heads, project_heads
from .base import CamError, CamMaps, CamMethod

__all__ = ["DENSE_FLAGS", "ClearClip", "DenseCam", "DenseProtocol", "MaskClip", "Naclip", "Sclip", "bicubic_pos_embed",
           "dense_tokens", "gaussian_addition", "last_block"]

DENSE_FLAGS = CAM_FLAGS["naclip"]  # the torch-free table's (method_options), one source


def bicubic_pos_embed(pos: Tensor, grid: tuple[int, int]) -> Tensor:
    """The authors' ``interpolate_pos_encoding``: the (1 + N, D) embedding kept as it is when the token
    count matches, else its patch part resized bicubically with scale factors ``(g + 0.1) / sqrt(N)``
    (the scale factors themselves, as the authors pass them, so that sampling matches theirs)."""
    n = pos.shape[0] - 1
    if grid[0] * grid[1] == n:
        return pos  # the authors compare token counts: a non-square grid of N patches keeps the table
    side = math.sqrt(n)
    patches = pos[1:].reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, scale_factor=((grid[0] + 0.1) / side, (grid[1] + 0.1) / side), mode="bicubic")
    if tuple(patches.shape[-2:]) != tuple(grid):
        raise ValueError(f"positional embedding resized to {tuple(patches.shape[-2:])}, not the grid {grid}")
    return torch.cat([pos[:1], patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])


def gaussian_addition(grid: tuple[int, int], std: float, device: torch.device | None = None) -> Tensor:
    """NACLIP's ``omega`` (1 + n, 1 + n): between patches i and j, exp(-d^2 / (2 std^2)) of their grid
    distance d (the authors' window of 2h-1 x 2w-1 covers every pair); 0 in the CLS row and column."""
    h, w = grid
    c = 1 / (std * math.sqrt(2))
    rows = torch.arange(h, dtype=torch.float32, device=device).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float32, device=device).repeat(h)
    d2 = ((rows[:, None] - rows[None]) * c) ** 2 + ((cols[:, None] - cols[None]) * c) ** 2
    return F.pad(torch.exp(-d2), (1, 0, 1, 0))


def last_block(block: nn.Module, x: Tensor, attention: str, residual: bool, grid: tuple[int, int],
               gaussian_std: float = 5.0) -> Tensor:
    """The last block's output tokens (B, L, D) under one of the dense attentions.

    ``attention``: ``self`` (MaskCLIP), ``qq+kk`` (SCLIP), ``qq`` (ClearCLIP), ``kk+gauss`` (NACLIP).
    The sums of softmaxes run as sums of fused attentions (same values, no (B, H, L, L) tensor).
    """
    q, k, v = project_heads(block.attn, block.ln_1(x))
    if attention == "self":
        out = v
    elif attention == "qq":
        out = F.scaled_dot_product_attention(q, q, v)
    elif attention == "qq+kk":
        out = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
    elif attention == "kk+gauss":
        omega = gaussian_addition(grid, gaussian_std, k.device).to(k.dtype)
        out = F.scaled_dot_product_attention(k, k, v, attn_mask=omega)
    else:
        raise ValueError(f"unknown dense attention {attention!r}")
    out = merge_heads(block.attn, out)
    if not residual:
        return out
    x = x + block.ls_1(out)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def dense_tokens(visual: nn.Module, images: Tensor, attention: str, residual: bool) -> tuple[Tensor, tuple[int, int]]:
    """Projected patch tokens (B, n, E) of normalised images (B, 3, H, W) and their grid (H // p, W // p)."""
    blocks = visual.transformer.resblocks
    tokens, _ = encode_trunk(visual, images, range(0), stop=len(blocks) - 1, positions=bicubic_pos_embed)
    p = visual.conv1.kernel_size
    grid = (images.shape[-2] // p[0], images.shape[-1] // p[1])
    x = last_block(blocks[-1], tokens, attention, residual, grid)
    x = visual.ln_post(x[:, 1:])
    return (x @ visual.proj if visual.proj is not None else x), grid


@dataclass(frozen=True)
class DenseProtocol:
    """How a dense method reads an image (each repository's ``cfg_voc21.py``): resize to short side
    ``scale`` (long side at most 2048), windows of ``window`` (0: the whole image) every ``stride``
    pixels, ``softmax(logit_scale * logits)``, background below ``prob_threshold``, classes under
    ``area_threshold`` of the foreground sent to background (SCLIP; None: off), windows padded to a
    multiple of the patch (``pad_windows``, ClearCLIP), PAMR on the logits (``pamr_steps``, NACLIP), the
    class probabilities divided by their sum once the mask is made (``renormalise``, NACLIP's output)."""

    scale: int
    window: int
    stride: int
    logit_scale: float
    prob_threshold: float
    area_threshold: float | None = None
    pad_windows: bool = False
    pamr_steps: int = 0
    renormalise: bool = False


class DenseCam(CamMethod):
    """A forward-only dense CLIP method: the last block as ``attention`` / ``residual``, queries of
    ``query_style`` (``sclip``: the 56-word VOC list with background words; ``plain``: 21 names), the
    authors' protocol as ``defaults``; the user-tuned settings as constructor keywords (``pamr_steps`` 0
    turns NACLIP's own PAMR off: ``--refine none``)."""

    attention: ClassVar[str]
    residual: ClassVar[bool] = False
    query_style: ClassVar[str] = "sclip"
    defaults: ClassVar[DenseProtocol]
    flags: ClassVar[dict[str, str]] = DENSE_FLAGS

    def __init__(self, per_pair: bool = False, scale: int | None = None, window: int | None = None,
                 stride: int | None = None, logit_scale: float | None = None,
                 prob_threshold: float | None = None, pamr_steps: int | None = None) -> None:
        if per_pair:
            raise CamError(f"--per-pair-backward: {self.spelling()} runs no backward")
        super().__init__(False)
        given = {"scale": scale, "window": window, "stride": stride, "logit_scale": logit_scale,
                 "prob_threshold": prob_threshold, "pamr_steps": pamr_steps}
        p = replace(self.defaults, **{k: v for k, v in given.items() if v is not None})
        if p.scale < 16:
            raise CamError(f"--dense-scale {p.scale}: give the short side in pixels, 16 or more")
        if p.window < 0 or (p.window and p.stride < 1):
            raise CamError(f"--dense-window {p.window} / --dense-stride {p.stride}: a window of 0 (the whole "
                           "image) or more pixels, a stride of 1 or more")
        if not p.logit_scale > 0 or not math.isfinite(p.logit_scale):
            raise CamError(f"--dense-logit-scale {p.logit_scale}: give a positive number")
        if not 0 <= p.prob_threshold <= 1:
            raise CamError(f"--dense-prob {p.prob_threshold}: give a probability in [0, 1]")
        self.protocol = p

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self.protocol)}

    def tokens(self, visual: nn.Module, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Projected patch tokens (B, n, E) of normalised windows and their patch grid."""
        return dense_tokens(visual, images, self.attention, self.residual)

    def __call__(self, visual: nn.Module, tokens: Tensor, pairs: CamPairs, logit_scale: float,
                 grid: tuple[int, int], attn_blocks: range) -> CamMaps:
        raise CamError(f"{self.spelling()} makes its masks itself (clipes.cams.dense_protocol), not CLIP-ES's "
                       "class maps for CAA")


class MaskClip(DenseCam):
    name = "maskclip"
    attention = "self"
    query_style = "plain"
    defaults = DenseProtocol(scale=448, window=448, stride=224, logit_scale=50, prob_threshold=0.5, pad_windows=True)


class Sclip(DenseCam):
    name = "sclip"
    attention = "qq+kk"
    residual = True
    defaults = DenseProtocol(scale=336, window=224, stride=112, logit_scale=65, prob_threshold=0.1, area_threshold=0.1)


class ClearClip(DenseCam):
    name = "clearclip"
    attention = "qq"
    query_style = "plain"
    defaults = DenseProtocol(scale=448, window=448, stride=224, logit_scale=50, prob_threshold=0.5, pad_windows=True)


class Naclip(DenseCam):
    name = "naclip"
    attention = "kk+gauss"
    defaults = DenseProtocol(scale=336, window=0, stride=112, logit_scale=40, prob_threshold=0.1, pamr_steps=10,
                             renormalise=True)
