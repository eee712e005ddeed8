"""The CLIP ViT as a segmentation encoder: patch features after every block, or the tokens of chosen blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ...vit import block_forward, embed

__all__ = ["ClipBlockEncoder", "ClipDenseEncoder", "clip_visual"]

_VIT_INPUT = ("conv1.", "class_embedding", "positional_embedding", "ln_pre.")  # what ``vit.embed`` reads


def clip_visual(clip_model: str | None, clip_vision: dict | None = None) -> nn.Module:
    """The CLIP ViT of a clip-* model: loaded from ``clip_model``, or of the layout ``clip_vision`` that a
    checkpoint recorded (random weights: the checkpoint's replace them)."""
    if clip_vision is not None:
        from ..checkpoint import rebuild_vision

        return rebuild_vision(clip_vision)
    from ...model import load_clip

    return load_clip(clip_model, flag="--clip-model").model.visual


class ClipDenseEncoder(nn.Module):
    """Patch features of a CLIP ViT: every block, then ``ln_post``; (B, D, H/p, W/p).

    Of the ViT, only what the forward reads trains (the first ``depth`` blocks, ``ln_post`` if read): the
    rest (``proj``, ...) would get no gradient, which DDP without ``find_unused_parameters`` rejects."""

    def __init__(self, visual: nn.Module, frozen: bool = True, depth: int | None = None,
                 ln_post: bool = True) -> None:
        super().__init__()
        self.visual = visual
        self.frozen = frozen
        self.visual.requires_grad_(not frozen)
        depth = len(visual.transformer.resblocks) if depth is None else depth
        blocks = tuple(f"transformer.resblocks.{i}." for i in range(depth))
        read = _VIT_INPUT + blocks + (("ln_post.",) if ln_post else ())
        for name, p in visual.named_parameters():
            if not name.startswith(read):
                p.requires_grad_(False)
        self.dim = int(visual.ln_post.weight.shape[0])
        self.patch = int(visual.conv1.kernel_size[0])

    def forward(self, x: Tensor) -> Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            t = embed(self.visual, x)
            for blk in self.visual.transformer.resblocks:
                t, _ = block_forward(blk, t)
            t = self.visual.ln_post(t[:, 1:])
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        return t.transpose(1, 2).reshape(x.shape[0], self.dim, h, w)


class ClipBlockEncoder(ClipDenseEncoder):
    """Patch tokens of a CLIP ViT after the chosen blocks, raw (no ``ln_post``: SETR's heads and neck norm
    what they read), as ``{block: (B, H/p, W/p, D)}``; blocks after the last one chosen are not run."""

    def __init__(self, visual: nn.Module, blocks: Sequence[int], frozen: bool = True) -> None:
        depth = len(visual.transformer.resblocks)
        if not blocks or not all(0 <= b < depth for b in blocks):
            raise ValueError(f"blocks {tuple(blocks)} are not among the encoder's {depth}")
        blocks = tuple(sorted(set(blocks)))
        super().__init__(visual, frozen=frozen, depth=blocks[-1] + 1, ln_post=False)
        self.blocks = blocks

    def forward(self, x: Tensor) -> dict[int, Tensor]:  # type: ignore[override]
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        out = {}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            t = embed(self.visual, x)
            for i, blk in enumerate(self.visual.transformer.resblocks[: self.blocks[-1] + 1]):
                t, _ = block_forward(blk, t)
                if i in self.blocks:
                    out[i] = t[:, 1:].reshape(x.shape[0], h, w, self.dim)
        return out
