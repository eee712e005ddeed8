"""Softmax-GradCAM on the last CLIP ViT block: every class of every image in one backward pass."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .vit import head_mean_attention, merge_heads, project_heads

__all__ = ["CamPairs", "first_pair_of_each_image", "image_features", "minmax_normalize", "one_pair_at_a_time",
           "pair_probabilities", "softmax_gradcam", "softmax_gradcam_per_pair"]


@dataclass(frozen=True)
class CamPairs:
    """Which (image, class) pairs to explain.

    ``image[p]`` is the batch index of pair ``p`` and ``target[p]`` the column of its class in that
    image's text set; ``text`` is (B, K, E) with each image's present classes first, then the
    background prompts, and ``valid`` (B, K) masks the padding of images with fewer classes.
    """

    image: Tensor
    target: Tensor
    text: Tensor
    valid: Tensor


def minmax_normalize(x: Tensor, eps: float = 1e-7) -> Tensor:
    """Per-map ``x - min`` then ``/ (max + eps)`` over all but the first dimension."""
    flat = x.flatten(1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    flat = flat / (flat.max(dim=1, keepdim=True).values + eps)
    return flat.view_as(x)


def image_features(visual: nn.Module, tokens: Tensor) -> Tensor:
    """CLIP-ES image embedding: mean of the patch tokens (not CLS) after ``ln_post``, projected, unit norm."""
    x = visual.ln_post(tokens)[:, 1:].mean(dim=1)
    if visual.proj is not None:
        x = x @ visual.proj
    return F.normalize(x, dim=-1)


def pair_probabilities(visual: nn.Module, tokens: Tensor, pairs: CamPairs, logit_scale: float) -> Tensor:
    """CLIP-ES's target: per pair, the softmax over its image's text set of ``logit_scale * cos(image,
    text)``, from the pair's tokens after the last block (P, L, D); (P, K) float32, padding at 0."""
    feats = image_features(visual, tokens).float()
    with torch.autocast(feats.device.type, enabled=False):  # fp32 logits whatever the blocks ran in
        logits = logit_scale * torch.einsum("pe,pke->pk", feats, pairs.text[pairs.image].float())
    logits = logits.masked_fill(~pairs.valid[pairs.image], float("-inf"))
    return logits.softmax(dim=-1)


def first_pair_of_each_image(image: Tensor) -> Tensor:
    """Indices of the first pair of each image in ``image`` (pairs are grouped by image)."""
    change = torch.ones_like(image, dtype=torch.bool)
    change[1:] = image[1:] != image[:-1]
    return torch.nonzero(change).flatten()


def softmax_gradcam(visual: nn.Module, tokens: Tensor, pairs: CamPairs, logit_scale: float,
                    grid: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax-GradCAM for every pair, from the tokens entering the last block.

    The target of a pair is its class's softmax probability over [present classes] + [background
    prompts]; the CAM weights are its gradient with respect to the last block's ``ln_1`` output,
    averaged over the patch tokens. Each pair runs the last block on its own copy of the tokens, so
    one backward of the summed targets yields every pair's own gradient. The attention inside runs
    as SDPA; its head-averaged weights, which CAA needs but the gradient does not, are computed
    apart, once per image.

    Returns the CAMs (P, h, w), normalised twice as the reference does, the probabilities (P, K)
    and the last block's head-averaged attention (I, n + 1, n + 1) for the I images that have
    pairs, in the order of ``pairs.image``.
    """
    block = visual.transformer.resblocks[-1]
    x = tokens[pairs.image]
    with torch.enable_grad():
        a = block.ln_1(x).detach().requires_grad_(True)
        q, k, v = project_heads(block.attn, a)
        y = x + block.ls_1(merge_heads(block.attn, F.scaled_dot_product_attention(q, k, v)))
        y = y + block.ls_2(block.mlp(block.ln_2(y)))
        probs = pair_probabilities(visual, y, pairs, logit_scale)
        target = probs.gather(1, pairs.target[:, None]).sum()
        (grad,) = torch.autograd.grad(target, a)
    first = first_pair_of_each_image(pairs.image)
    last_attn = head_mean_attention(q.detach()[first], k.detach()[first])
    weights = grad[:, 1:].float().mean(dim=1)
    cam = torch.relu((a.detach()[:, 1:].float() * weights[:, None, :]).sum(dim=-1))
    cam = minmax_normalize(minmax_normalize(cam))
    return cam.view(-1, *grid), probs.detach(), last_attn


def one_pair_at_a_time(cam: Callable[..., tuple[Tensor, Tensor, Tensor]], visual: nn.Module, tokens: Tensor,
                       pairs: CamPairs, *args: Any) -> tuple[Tensor, Tensor, Tensor]:
    """A batched CAM function ``cam(visual, tokens, pairs, *args)`` run on one pair at a time: the
    reference's cost, one forward and one backward per pair. Returns what ``cam`` does for all the
    pairs, its third output (per image) taken from the first pair of each image."""
    outs = [cam(visual, tokens, CamPairs(pairs.image[p:p + 1], pairs.target[p:p + 1], pairs.text, pairs.valid),
                *args) for p in range(pairs.image.numel())]
    cams, probs, attn = (torch.cat(parts) for parts in zip(*outs, strict=True))
    return cams, probs, attn[first_pair_of_each_image(pairs.image)]


def softmax_gradcam_per_pair(visual: nn.Module, tokens: Tensor, pairs: CamPairs, logit_scale: float,
                             grid: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Baseline with the reference's cost: one forward and one backward of the last block per pair."""
    return one_pair_at_a_time(softmax_gradcam, visual, tokens, pairs, logit_scale, grid)
