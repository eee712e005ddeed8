"""Sharpness-based prompt selection (CLIP-ES): rank prompt templates on a user's own labelled images.

The definition used here (issue 12, written from the paper's description), made explicit:

- **Image embedding**: CLIP's own image embedding, as the zero-shot path of ``clipes.labeler``
  computes it: the CLS token after the last block, ``ln_post`` and ``proj``, L2-normalised, with the
  image at its own network input size (sides rounded up to the patch size, positional embedding
  interpolated; ``max_side`` as in ``clipes label``). It is computed once per image and reused for
  every template.
- **Softmax set**: the C foreground classes of the class set, each embedded with the one template
  from its synonym-fused prompt (``clipes.text.encode_prompts``); no background prompts.
  ``probs = softmax(logit_scale * cos(image, class))`` over those C classes, in float64 (with the
  logit scale at most 100 no score underflows to zero).
- **Sharpness**: on each image with two or more labels, the scores ``s_i`` of its labelled classes
  give ``var(s) / mean(s)`` with the population variance (divide by the number of labels). It is 0
  when every present class gets the same share and grows as one class takes the mass from the
  others. A template's sharpness is the mean over those images.
- **Direction**: lower is better (every present class keeps a share, so each gets a usable CAM);
  templates are ranked by increasing sharpness, ties in candidate order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from .cams import CamMethod
from .data import ImageFolderDataset, Sample, collate_samples, probe_input_size, size_batches
from .errors import ClipesError
from .evaluate import evaluate, scores
from .labeler import Labeler
from .model import ClipModel
from .prompts import ClassSet
from .templates import (  # re-exported: the text side of prompt selection, without torch
    TemplateError,
    candidate_templates,
    class_set_yaml,
    imagenet_templates,
    parse_templates,
    read_templates,
    with_template,
)
from .text import encode_prompts
from .vit import cls_embedding, encode_trunk

__all__ = ["Embedded", "TemplateError", "TemplateScore", "candidate_templates", "class_probs", "class_set_yaml",
           "embed_images", "image_embeddings", "image_sharpness", "imagenet_templates", "label_matrix",
           "parse_templates", "rank", "read_templates", "score_templates", "sharpness", "validate_templates",
           "with_template"]

@torch.no_grad()
def image_embeddings(clip: ClipModel, images: Tensor) -> Tensor:
    """(B, E) unit-norm CLIP image embeddings of equal-size normalised images (B, 3, H, W) at that size.

    The CLS token after the last block, ``ln_post`` and ``proj``: the embedding the zero-shot path
    of ``clipes.labeler`` scores, without the attention maps CAA needs (``attn_blocks=1``).
    """
    visual = clip.visual
    tokens, _ = encode_trunk(visual, images, attn_blocks=1)
    return F.normalize(cls_embedding(visual, tokens).float(), dim=-1)


def class_probs(image_emb: Tensor, text_emb: Tensor, logit_scale: float) -> Tensor:
    """(N, C) softmax over the classes of ``logit_scale * cos(image, class)``, float64 on the CPU."""
    logits = logit_scale * image_emb.detach().cpu().double() @ text_emb.detach().cpu().double().T
    return logits.softmax(dim=-1)


def label_matrix(labels: Sequence[Sequence[int]], num_classes: int) -> Tensor:
    """(N, C) bool: ``True`` where class c is among image n's labels."""
    out = torch.zeros(len(labels), num_classes, dtype=torch.bool)
    for i, lab in enumerate(labels):
        out[i, list(lab)] = True
    return out


def image_sharpness(probs: Tensor, labels: Tensor) -> Tensor:
    """Per image ``var(s) / mean(s)`` of the labelled classes' scores s, population variance.

    ``probs`` (..., N, C) softmax scores, ``labels`` (N, C) bool; returns (..., N), NaN for images
    with fewer than two labels.
    """
    mask = labels.to(probs.dtype)
    k = mask.sum(dim=-1)
    mean = (probs * mask).sum(dim=-1) / k
    var = ((probs - mean.unsqueeze(-1)) ** 2 * mask).sum(dim=-1) / k
    return torch.where(k >= 2, var / mean, torch.full_like(mean, float("nan")))


def sharpness(probs: Tensor, labels: Tensor) -> Tensor:
    """A template's sharpness: the mean of ``image_sharpness`` over the images with two or more labels.

    ``probs`` (..., N, C), ``labels`` (N, C) bool; returns (...). Lower is better.
    """
    multi = labels.sum(dim=-1) >= 2
    if not bool(multi.any()):
        raise ValueError("sharpness needs images with two or more labels")
    return image_sharpness(probs[..., multi, :], labels[multi]).mean(dim=-1)


@dataclass
class TemplateScore:
    """One candidate: its sharpness on ``images`` multi-label images, and mIoU once validated."""

    template: str
    sharpness: float
    images: int
    miou: float | None = None
    miou_images: int | None = None

    def to_dict(self) -> dict:
        out = {"template": self.template, "sharpness": self.sharpness, "images": self.images}
        if self.miou is not None:
            out.update(miou=self.miou, miou_images=self.miou_images)
        return out


def score_templates(clip: ClipModel, class_set: ClassSet, embeddings: Tensor, labels: Tensor,
                    templates: Sequence[str], advance: Callable[[], None] | None = None) -> list[TemplateScore]:
    """Sharpness of each template, in the given order: one text batch (the C classes) per template.

    ``embeddings`` (N, E) from ``image_embeddings``, ``labels`` (N, C) bool.
    """
    logit_scale = float(clip.model.logit_scale.exp())
    used = int((labels.sum(dim=-1) >= 2).sum())
    out = []
    for template in templates:
        text = encode_prompts(clip, class_set.prompts, (template,))
        value = sharpness(class_probs(embeddings, text, logit_scale), labels)
        out.append(TemplateScore(template, float(value), used))
        if advance is not None:
            advance()
    return out


def rank(results: Sequence[TemplateScore]) -> list[TemplateScore]:
    """Best first: increasing sharpness; equal values keep their candidate order (stable sort)."""
    return sorted(results, key=lambda r: r.sharpness)


@dataclass
class Embedded:
    """Image embeddings (N, E) on the CPU with their stems and labels; files that could not be read."""

    stems: list[str]
    embeddings: Tensor
    labels: list[list[int]]
    failed: list[str]


def _batches(clip: ClipModel, items: Sequence[tuple[str, Path, list[int]]], max_side: int | None,
             batch_size: int, workers: int, exif_transpose: bool):
    """Decoded, resized images in batches of equal input size (DataLoader workers, as ``clipes label``)."""
    sizes = [probe_input_size(p, clip.patch_size, max_side, exif_transpose) for _, p, _ in items]
    dataset = ImageFolderDataset(items, clip.patch_size, max_side, exif_transpose)
    return DataLoader(dataset, batch_sampler=size_batches(sizes, batch_size), collate_fn=collate_samples,
                      num_workers=workers, pin_memory=clip.device.type == "cuda")


def embed_images(clip: ClipModel, items: Sequence[tuple[str, Path, list[int]]], *, max_side: int | None,
                 batch_size: int, workers: int = 0, exif_transpose: bool = True,
                 advance: Callable[[int], None] | None = None) -> Embedded:
    """One forward per image: ``image_embeddings`` of every readable image of ``items`` (stem, path, labels)."""
    stems, chunks, labels, failed = [], [], [], []
    batch: list[Sample]
    for batch in _batches(clip, items, max_side, batch_size, workers, exif_transpose):
        good = [s for s in batch if s.prepared is not None]
        failed += [s.error for s in batch if s.error is not None]
        if good:
            images = torch.stack([s.prepared.tensor for s in good]).to(clip.device, clip.dtype)
            chunks.append(image_embeddings(clip, images).cpu())
            stems += [s.stem for s in good]
            labels += [list(s.prepared.labels) for s in good]
        if advance is not None:
            advance(len(batch))
    return Embedded(stems, torch.cat(chunks) if chunks else torch.zeros(0, 0), labels, failed)


def validate_templates(clip: ClipModel, class_set: ClassSet, templates: Sequence[str],
                       items: Sequence[tuple[str, Path, list[int]]], gt, *, max_side: int | None, batch_size: int,
                       workers: int = 0, exif_transpose: bool = True, cam: CamMethod | str = "gradcam",
                       advance: Callable[[int], None] | None = None) -> list[tuple[float, int]]:
    """Label ``items`` with each template (``clipes.labeler.Labeler``, its defaults, the CAM method
    ``cam``) and score the pseudo masks against ``gt`` (``gt.mask(stem)``, as ``clipes eval``): (mIoU,
    images) per template."""
    out = []
    num_classes = len(class_set) + 1
    for template in templates:
        labeler = Labeler(clip, with_template(class_set, template), max_side=max_side, cam=cam)
        hist, count = None, 0
        for batch in _batches(clip, items, max_side, batch_size, workers, exif_transpose):
            good = [s for s in batch if s.prepared is not None]
            masks = {s.stem: r.mask for s, r in zip(good, labeler.label_prepared([s.prepared for s in good]),
                                                     strict=True)}
            try:
                ev = evaluate(masks.get, gt, list(masks), num_classes)
            except ValueError as e:  # a mask and its ground truth of different sizes
                raise ClipesError(f"ground truth does not match the images ({e})") from None
            hist = ev.hist if hist is None else hist + ev.hist
            count += len(ev.per_image)
            if advance is not None:
                advance(len(batch))
        out.append((scores(hist).miou if count else float("nan"), count))
    return out
