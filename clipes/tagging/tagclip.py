"""``--tagger tagclip``: TagCLIP's local-to-global multi-label classification, exact to the authors' code.

TagCLIP (Lin et al., AAAI 2024; github.com/linyq2117/TagCLIP, commit c32b640) is training-free:

1. coarse: every patch token, with the last block's attention turned into self-attention, is
   classified against the class and background names (softmax over all of them);
2. refine: the patch scores are smoothed by the ViT's own attention (mean of blocks 8..10, kept
   where at least 4 of all blocks attend above their mean), then re-propagated inside the boxes of
   each class's high-scoring regions; a class's score is its best patch;
3. class-wise reidentification (cwr): each strong class's region is cropped, encoded at 224 x 224
   with the CLS token restricted to the region, and its softmax score mixed 50/50 into the score.

Labels are the classes above min + 0.5 (max - min) of an image's scores. Every constant and
quirk below is the authors' (see ``tagclip-reference.md``): the fp16-rounded interpolated
positional table, -100 (self-attention) and -1000 (CLS restriction) additive masks, pre-mask
attention for the vote, eps-free min-max normalisations, uint8 / int truncation of the box
threshold, box ends clipped to the grid's last row and column with exclusive slicing, and the
early return of cwr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from ..model import ClipModel
from ..prompts import DEFAULT_BACKGROUND, ClassSet, load_class_set
from ..text import encode_prompts
from ..vit import block_forward, head_mean_attention, interpolate_pos_embed, merge_heads, project_heads
from .base import Tagger, TaggerError, Tags
from .tagclip_regions import (
    RELATIVE_THRESHOLD,
    BoxRefinement,
    CropRegions,
    component_box_mask,
    crop_regions,
    refine_in_boxes,
)

__all__ = ["TagCLIP", "TagCLIPOutput", "attention_vote", "component_box_mask", "crop_regions", "refine_in_boxes",
           "relative_labels", "tagclip_names", "tagclip_text_features"]

VOTE_MIN = 4              # blocks whose attention must be above their mean for an entry to count
AVG_BLOCKS = slice(8, -1)  # blocks averaged into the refinement attention: 8, 9, 10 of 12
SELF_MASK = -100.0        # additive mask off the diagonal in the last block of the main pass
CLS_MASK = -1000.0        # additive mask on the CLS query for patches outside a cwr region
MIX = 0.5                 # weight of the coarse-to-fine score against the crop's score


@cache
def _data() -> dict[str, Any]:
    return yaml.safe_load(resources.files(__package__).joinpath("data", "tagclip.yaml").read_text(encoding="utf-8"))


def tagclip_templates() -> tuple[str, ...]:
    """TagCLIP's 85 prompt templates: CLIP's 80 ImageNet ones and 5 scene templates."""
    return tuple(_data()["templates"])


def tagclip_names(class_set: ClassSet) -> tuple[list[str], list[str]]:
    """The class and background names TagCLIP scores for a class set.

    The built-in ``voc`` and ``coco`` sets use the authors' lists (plain names, VOC spellings, their
    25 / 23 background names). Other sets use their class names (not fused synonym prompts) and
    their own background names; a set that names none (clipes then fills in COCO's 23 defaults)
    gets the authors' 25 VOC background names.
    """
    data = _data()
    if class_set.name in ("voc", "coco") and class_set.classes == load_class_set(class_set.name).classes:
        own = data[class_set.name]
        return list(own["classes"]), list(own["background"])
    background = data["voc"]["background"] if class_set.background == DEFAULT_BACKGROUND else class_set.background
    return list(class_set.classes), list(background)


@torch.no_grad()
def tagclip_text_features(clip: ClipModel, names: list[str], templates: tuple[str, ...], chunk: int = 8) -> Tensor:
    """(C, E) prompt-ensemble embeddings, normalised once more as ``classify()`` does (a no-op to 1 ulp).

    ``chunk`` names at a time bound the text tower's memory (85 prompts a name).
    """
    feats = torch.cat([encode_prompts(clip, names[i:i + chunk], templates) for i in range(0, len(names), chunk)])
    return feats / feats.norm(dim=-1, keepdim=True)


def embed_rounded(visual: nn.Module, images: Tensor) -> Tensor:
    """``vit.embed`` with the authors' positional table: an interpolated table is rounded to fp16."""
    x = visual.conv1(images)
    grid = (x.shape[-2], x.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    pos = interpolate_pos_embed(visual.positional_embedding, grid)
    if pos is not visual.positional_embedding:
        pos = pos.half().float()
    return visual.ln_pre(torch.cat([cls, x], dim=1) + pos.to(x.dtype))


def masked_block(block: nn.Module, x: Tensor, mask: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
    """``vit.block_forward`` with an additive attention mask; the weights, if asked for, are pre-mask."""
    q, k, v = project_heads(block.attn, block.ln_1(x))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))
    weights = head_mean_attention(q, k) if need_weights else None
    x = x + block.ls_1(merge_heads(block.attn, out))
    return x + block.ls_2(block.mlp(block.ln_2(x))), weights


def project_tokens(visual: nn.Module, x: Tensor) -> Tensor:
    """ln_post and the projection on every token, then L2 normalisation (no eps), in float32."""
    x = visual.ln_post(x)
    if visual.proj is not None:
        x = x @ visual.proj
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True)


def attention_vote(maps: list[Tensor], votes: Tensor, vote_min: int = VOTE_MIN) -> Tensor:
    """(B, N, N) mean of ``maps``, zeroed where fewer than ``vote_min`` blocks attend above their mean.

    ``votes`` counts, per entry, the blocks (all of them) whose map exceeds that map's mean.
    """
    return torch.stack(maps).mean(dim=0) * (votes >= vote_min).float()


def encode_voted(visual: nn.Module, images: Tensor, avg_blocks: slice = AVG_BLOCKS) -> tuple[Tensor, Tensor]:
    """One pass over all tokens: (B, 1 + N, E) unit features and the (B, N, N) voted attention.

    Blocks run as CLIP's, except the last, whose tokens attend only to themselves (additive -100
    off the diagonal). Every block's head-averaged attention before any mask, CLS dropped, votes
    as it comes; only the ``avg_blocks`` maps are kept for the average.
    """
    x = embed_rounded(visual, images)
    blocks = visual.transformer.resblocks
    length = x.shape[1]
    self_mask = torch.full((length, length), SELF_MASK, device=x.device).fill_diagonal_(0.0)
    averaged = set(range(len(blocks))[avg_blocks])
    votes = torch.zeros((x.shape[0], length - 1, length - 1), dtype=torch.int16, device=x.device)
    kept = []
    for i, block in enumerate(blocks):
        if i < len(blocks) - 1:
            x, w = block_forward(block, x, need_weights=True)
        else:
            x, w = masked_block(block, x, self_mask, need_weights=True)
        a = w[:, 1:, 1:].float()
        votes += a > a.reshape(a.shape[0], -1).mean(dim=-1).view(-1, 1, 1)
        if i in averaged:
            kept.append(a)
    return project_tokens(visual, x), attention_vote(kept, votes)


def relative_labels(scores: Tensor, rel: float = RELATIVE_THRESHOLD) -> tuple[list[list[int]], Tensor]:
    """Classes above min + rel (max - min) of each row, ascending; the best class if none. And the thresholds."""
    lo, hi = scores.amin(dim=1), scores.amax(dim=1)
    thr = lo + rel * (hi - lo)
    labels = [[int(k) for k in (row > t).nonzero().flatten()] or [int(row.argmax())]
              for row, t in zip(scores, thr, strict=True)]
    return labels, thr


@dataclass
class TagCLIPOutput:
    """A batch through TagCLIP, with the intermediates the parity tests compare (names as the golden's)."""

    image_features: Tensor       # (B, 1 + N, E) unit token features, row 0 = CLS
    logits_coarse: Tensor        # (B, N, C) per-patch softmax over classes and background names
    attn_weight: Tensor          # (B, N, N) voted mean attention of blocks 8..10
    logits_attn: Tensor          # (B, N, C) attention-smoothed coarse scores
    boxes: BoxRefinement         # logits_refined = boxes.refined
    logits_max_before_cwr: Tensor  # (B, C_fg) best patch per class
    crops: CropRegions
    cwr_keep: list[Tensor]       # per image (K, n0 * n0) patches of a crop its CLS query sees
    cwr_probs: list[Tensor]      # per image (K, C) the crops' CLS softmax
    logits_max: Tensor           # (B, C_fg) final scores
    labels: list[list[int]]
    thresholds: Tensor           # (B,) the final relative thresholds


class TagCLIP(Tagger):
    """TagCLIP on the class set's TagCLIP names (``tagclip_names``), with the authors' constants.

    Needs a class set of at least two classes (its thresholds are relative to the image's best and
    worst class) and network inputs of at least 2 x 2 patches (box ends are clipped to the grid's
    last row and column). ``crop_batch`` crops are encoded at a time.
    """

    name = "tagclip"
    source = "tagclip"

    def __init__(self, clip: ClipModel, class_set: ClassSet, crop_batch: int = 64) -> None:
        super().__init__(clip, class_set)
        blocks = len(clip.visual.transformer.resblocks)
        if not range(blocks)[AVG_BLOCKS]:
            raise TaggerError(f"TagCLIP averages the attention of blocks 8-10 of a 12-block ViT; {clip.spec} has "
                              f"{blocks} vision blocks (give --labels, or --tagger global)")
        names, background = tagclip_names(class_set)
        self.num_fg = len(names)
        self.names = names + background
        self.text = tagclip_text_features(clip, self.names, tagclip_templates())
        self.logit_scale = clip.model.logit_scale.detach().exp().float()
        self.crop_batch = crop_batch
        self.crop_grid = math.isqrt(clip.visual.positional_embedding.shape[0] - 1)  # crops at the native size

    @classmethod
    def check_class_set(cls, class_set: ClassSet) -> None:
        if len(class_set) < 2:
            raise TaggerError(f"class set {class_set.name!r} has {len(class_set)} class: TagCLIP ranks classes "
                              "against each other and needs at least 2 (give --labels, or --tagger global)")

    @classmethod
    def settings(cls, **_: Any) -> dict[str, Any]:
        return {"name": cls.name, "relative_threshold": RELATIVE_THRESHOLD}

    def unusable(self, height: int, width: int) -> str | None:
        p = self.clip.patch_size
        if height < 2 * p or width < 2 * p:
            return (f"image too small for TagCLIP: its network input is {width}x{height} px, under 2x2 patches "
                    f"of {p} px (each side must be larger than {p} px)")
        return None

    @torch.no_grad()
    def tag(self, images: Tensor, trunk: Tensor | None = None) -> Tags:
        out = self.run(images)
        return Tags(scores=out.logits_max.cpu(), labels=out.labels, thresholds=out.thresholds.cpu().tolist())

    @torch.no_grad()
    def run(self, images: Tensor) -> TagCLIPOutput:
        """The whole method on a (B, 3, H, W) batch of one size, with its intermediates."""
        visual, p = self.clip.visual, self.clip.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        for_reason = self.unusable(images.shape[-2], images.shape[-1])
        if for_reason:
            raise TaggerError(for_reason)
        text = self.text.to(images.device)
        features, attn = encode_voted(visual, images)
        # the patch-level maths stays float32 under autocast or cast weights (only the transformers run low)
        with torch.autocast(images.device.type, enabled=False):
            coarse = ((self.logit_scale * features.float()) @ text.T)[:, 1:].softmax(dim=-1)
            smoothed = attn @ coarse
            boxes = refine_in_boxes(smoothed, coarse, attn, grid)
            best = boxes.refined.amax(dim=1)[:, : self.num_fg]
            crops = crop_regions(boxes.refined, best, grid)
        final = best.clone()
        keeps, probs = self._reidentify(images, crops, final)
        labels, thresholds = relative_labels(final)
        return TagCLIPOutput(features, coarse, attn, smoothed, boxes, best, crops, keeps, probs, final, labels,
                             thresholds)

    def _reidentify(self, images: Tensor, crops: CropRegions, scores: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """cwr: encode every processed candidate's crop (all images' crops batched) and mix its score in."""
        visual, p, side = self.clip.visual, self.clip.patch_size, self.crop_grid
        size = side * p
        jobs, pixels, keeps = [], [], []
        for i, boxes in enumerate(crops.boxes):
            for k, (y1, y2, x1, x2) in zip(crops.candidates[i], boxes, strict=False):
                keep = F.interpolate(crops.region[i, k, y1:y2, x1:x2][None, None].float(), size=(side, side),
                                     mode="nearest")
                keeps.append(keep.flatten() > 0.5)
                crop = images[i:i + 1, :, y1 * p:y2 * p, x1 * p:x2 * p].float()
                pixels.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False))
                jobs.append((i, k))
        per_image_keep = [[] for _ in crops.boxes]
        per_image_probs = [[] for _ in crops.boxes]
        text = self.text.to(images.device)
        for s in range(0, len(jobs), self.crop_batch):
            keep = torch.stack(keeps[s:s + self.crop_batch])
            batch = torch.cat(pixels[s:s + self.crop_batch]).to(images.dtype)
            mask = torch.zeros((len(keep), 1, side * side + 1, side * side + 1), device=images.device)
            mask[:, 0, 0, 1:] = torch.where(keep, 0.0, CLS_MASK)
            x = embed_rounded(visual, batch)
            for block in visual.transformer.resblocks:
                x, _ = masked_block(block, x, mask)
            cls = project_tokens(visual, x[:, :1])[:, 0]
            with torch.autocast(images.device.type, enabled=False):
                prob = ((self.logit_scale * cls.float()) @ text.T).softmax(dim=-1)
            for (i, k), kp, pr in zip(jobs[s:s + self.crop_batch], keep, prob, strict=True):
                scores[i, k] = MIX * scores[i, k] + (1 - MIX) * pr[k]
                per_image_keep[i].append(kp)
                per_image_probs[i].append(pr)
        empty_keep = torch.zeros((0, side * side), dtype=torch.bool, device=images.device)
        empty_prob = torch.zeros((0, text.shape[0]), device=images.device)
        return ([torch.stack(k) if k else empty_keep for k in per_image_keep],
                [torch.stack(q) if q else empty_prob for q in per_image_probs])
