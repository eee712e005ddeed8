"""CLIP-ES end to end on images in memory: class maps (softmax-GradCAM or GETAM), CAA refinement, pseudo masks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .caa import box_mask, refine_pairs, sinkhorn_affinity, upsample_batch
from .cam import CamPairs
from .cams import CamMethod, DenseCam, make_cam
from .cams.dense_protocol import dense_segment, rescale_size
from .cams.dense_queries import encode_queries, query_lines
from .images import preprocess, to_rgb_or_gray
from .masks import pseudo_masks
from .model import ClipModel
from .prompts import ClassSet
from .refiners import CrfRefiner, DeviceRefiner, HostRefiner, PamrRefiner, Refined, Refiner
from .refiners.crf import CrfParams
from .tagging import GlobalTagger, Tagger, TaggerError, make_tagger, tagger_class
from .text import TextFeatures, encode_class_set
from .transfer import to_host
from .vit import encode_trunk

__all__ = ["LabelResult", "Labeler", "PreparedImage"]


@dataclass
class LabelResult:
    """Everything CLIP-ES computes for one image (arrays on the CPU, float32 unless noted).

    ``labels`` are 0-based class indices in the order given; ``cam`` is (k, h, w) on the patch
    grid, ``cam_refined`` (k, H, W) at the original size, ``mask`` (H, W) uint8 with 0 =
    background and c + 1 = class c. ``probs`` is the softmax over [labels] + [background prompts];
    ``attention`` (n, n) the head- and block-averaged patch attention CAA starts from (None unless
    the Labeler keeps it: 4.6 MB an image at 513 x 513); ``box_mask``
    (k, n) the class boxes. With a pixel refiner, ``mask`` is its label map (255 where it ignores
    a pixel, e.g. the CRF's probability below the confidence threshold, or PAR's two runs
    disagreeing) and ``confidence`` (H, W) its per-pixel probability, if it has one (the CRF).
    Labels found by a tagger have ``label_source`` its source (``tagclip``, ``zero-shot``),
    ``scores`` the scores it keeps and ``threshold`` the score they had to pass.
    """

    labels: np.ndarray
    mask: np.ndarray
    cam: np.ndarray
    cam_refined: np.ndarray
    cam_refined_lowres: np.ndarray
    box_mask: np.ndarray
    attention: np.ndarray | None
    probs: np.ndarray
    input_size: tuple[int, int]
    label_source: str = "given"
    scores: dict[str, float] = field(default_factory=dict)
    confidence: np.ndarray | None = None
    threshold: float | None = None


@dataclass
class PreparedImage:
    """A network-ready image: normalised (3, H', W') tensor, original (H, W), class indices or None.

    ``rgb`` keeps the original pixels (H, W, 3) uint8 when a pixel refiner or an overlay needs them.
    """

    tensor: Tensor
    size: tuple[int, int]
    labels: list[int] | None
    rgb: np.ndarray | None = None


class Labeler:
    """Load once, label many: holds the model, the class set and its text embeddings.

    ``bg_power`` is t in the background score (1 - max)^t; ``box_threshold`` defaults to the class
    set's (0.4 VOC, 0.7 COCO). Images without labels are tagged by ``tagger``: a ``Tagger`` or the
    name of one (``global``, the default here, or ``tagclip``; built when first needed);
    ``zero_shot_threshold`` is the global tagger's threshold, the softmax score over all classes
    plus background prompts above which a class counts as present.
    ``cam`` makes the class maps (``clipes.cams``): a ``CamMethod`` or the name of one (``gradcam``,
    CLIP-ES's softmax-GradCAM, the default; ``getam``, GETAM from block 6 on).
    ``per_pair_backward`` runs one backward per (image, class), the reference's cost: a baseline
    for benchmarks, with the same results. ``refiner`` turns the refined CAMs into the mask at
    pixel level (``clipes.refiners``: the dense CRF, PAR); ``crf=True`` is ``CrfRefiner(confidence,
    crf_params)``, the reference's dense CRF, with ``confidence`` marking pixels whose CRF
    probability is below it as 255. The vision transformer runs in the dtype of ``clip``'s vision
    weights (``load_clip(dtype=)`` casts them once): in bf16 or fp16 its matrix products run in that
    dtype (under ``torch.autocast``, which then casts no weights, only mixed inputs) while the
    residual stream, layer norms, softmaxes, the CAM's logits and CAA stay fp32. ``keep_attention``
    returns the attention CAA starts from in every result.

    A dense method (``DenseCam``: maskclip, sclip, clearclip, naclip) makes the masks itself under its
    authors' protocol, from the original pixels: images without labels get the open-vocabulary mask
    (no tagger), images with labels the mask restricted to background and those classes. Its refiner
    is PAMR or none: a ``PamrRefiner`` runs on its logits (where NACLIP puts it), replacing the
    method's own PAMR steps. See ``_label_dense`` for what its results hold.
    """

    def __init__(self, clip: ClipModel, class_set: ClassSet, *, bg_power: float = 1.0,
                 box_threshold: float | None = None, zero_shot_threshold: float = 0.1,
                 attn_blocks: int | range = 8, max_side: int | None = None, per_pair_backward: bool = False,
                 refiner: Refiner | None = None, crf: bool = False, confidence: float | None = None,
                 crf_params: CrfParams | None = None, keep_attention: bool = False,
                 tagger: Tagger | str = "global", cam: CamMethod | str = "gradcam") -> None:
        depth = len(clip.visual.transformer.resblocks)
        if isinstance(attn_blocks, range):  # block indices, e.g. TagCLIP's VOC blocks [-8:-1]
            if attn_blocks.step != 1 or not attn_blocks or not 0 <= attn_blocks[0] <= attn_blocks[-1] < depth:
                raise ValueError(f"attn_blocks must be a non-empty range of block indices in [0, {depth})")
        elif not 1 <= attn_blocks <= depth:
            raise ValueError(f"attn_blocks must be in [1, {depth}]")
        self.attn_range = attn_blocks if isinstance(attn_blocks, range) else range(depth - attn_blocks, depth)
        self.clip = clip
        self.class_set = class_set
        self.bg_power = bg_power
        self.box_threshold = class_set.box_threshold if box_threshold is None else box_threshold
        self.zero_shot_threshold = zero_shot_threshold
        self.attn_blocks = len(self.attn_range)
        self.max_side = max_side
        if not isinstance(cam, str) and per_pair_backward:
            raise ValueError("give per_pair to the CAM method itself")
        self.cam = make_cam(cam, per_pair=per_pair_backward) if isinstance(cam, str) else cam
        self._cam_from = self.cam.first_block(depth)  # the trunk runs the blocks before it
        if confidence is not None and not crf:
            raise ValueError("a confidence threshold needs the CRF (crf=True)")
        if crf and refiner is not None:
            raise ValueError("give either crf=True or a refiner, not both")
        self.refiner = CrfRefiner(confidence, crf_params) if crf else refiner
        self.queries = None
        if isinstance(self.cam, DenseCam):
            if self.refiner is not None and not isinstance(self.refiner, PamrRefiner):
                raise ValueError(f"{self.cam.spelling()} makes its own masks: its refiner is pamr or none, "
                                 f"not {self.refiner.name}")
            self.queries = encode_queries(clip, query_lines(self.cam.query_style, class_set))
        self.keep_attention = keep_attention
        self.text: TextFeatures = encode_class_set(clip, class_set)
        self.logit_scale = float(clip.model.logit_scale.exp())
        if isinstance(tagger, str):
            tagger_class(tagger)  # an unknown name fails here, not at the first unlabelled image
        self._tagger = tagger

    @property
    def tagger(self) -> Tagger:
        """The tagger for images without labels, built on first use (TagCLIP embeds 85 prompts a class)."""
        if isinstance(self._tagger, str):
            extra = {"text": self.text} if tagger_class(self._tagger) is GlobalTagger else {}
            self._tagger = make_tagger(self._tagger, self.clip, self.class_set, self.zero_shot_threshold, **extra)
        return self._tagger

    def unusable(self, p: PreparedImage) -> str | None:
        """Why a prepared image cannot be labelled (too small for the tagger it needs), or None."""
        if p.labels is not None or self.queries is not None:
            return None
        return self.tagger.unusable(p.tensor.shape[-2], p.tensor.shape[-1])

    def class_indices(self, labels: Sequence[int | str]) -> list[int]:
        """Class names or indices -> unique indices, first appearance kept."""
        out: list[int] = []
        for lab in labels:
            i = self.class_set.index(lab) if isinstance(lab, str) else int(lab)
            if not 0 <= i < len(self.class_set):
                raise ValueError(f"class index {i} out of range for {len(self.class_set)} classes")
            if i not in out:
                out.append(i)
        return out

    def prepare(self, image: Image.Image | np.ndarray, labels: Sequence[int | str] | None = None) -> PreparedImage:
        """Resize and normalise one image (PIL image or HxW[x3] uint8 array) for the network."""
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        image = to_rgb_or_gray(image)
        tensor = preprocess(image, self.clip.patch_size, self.max_side)
        indices = None if labels is None else self.class_indices(labels)
        keep = self.refiner is not None or self.queries is not None
        rgb = np.asarray(image.convert("RGB")) if keep else None
        return PreparedImage(tensor, (image.height, image.width), indices, rgb)

    def label(self, image: Image.Image | np.ndarray, labels: Sequence[int | str] | None = None) -> LabelResult:
        """Label one image; ``labels`` None infers the classes with the tagger."""
        return self.label_batch([image], [labels])[0]

    def label_batch(self, images: Sequence[Image.Image | np.ndarray],
                    labels: Sequence[Sequence[int | str] | None]) -> list[LabelResult]:
        """Label several images; those of equal input size share forward and backward passes."""
        prepared = [self.prepare(img, lab) for img, lab in zip(images, labels, strict=True)]
        return self.label_prepared(prepared)

    @torch.no_grad()
    def label_prepared(self, prepared: Sequence[PreparedImage], skip_unusable: bool = False
                       ) -> list[LabelResult | str]:
        """Label already prepared images, grouped by input size.

        An image the tagger cannot take (``unusable``) raises a ``TaggerError``, or with
        ``skip_unusable`` gets the reason as a string in its place while the others are labelled.
        """
        results: list[LabelResult | str | None] = [None] * len(prepared)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(prepared):
            reason = self.unusable(p)
            if reason is not None:
                if not skip_unusable:
                    raise TaggerError(reason)
                results[i] = reason
                continue
            groups.setdefault(tuple(p.tensor.shape), []).append(i)
        for idx in groups.values():
            for i, res in zip(idx, self._label_group([prepared[i] for i in idx]), strict=True):
                results[i] = res
        return results  # type: ignore[return-value]

    def _label_group(self, group: list[PreparedImage]) -> list[LabelResult]:
        if self.queries is not None:
            return self._label_dense(group)
        clip, visual = self.clip, self.clip.visual
        # each image on its own: from the DataLoader's pinned memory the copies are asynchronous
        images = torch.stack([p.tensor.to(clip.device, clip.dtype, non_blocking=True) for p in group])
        grid = (images.shape[-2] // clip.patch_size, images.shape[-1] // clip.patch_size)
        low = torch.autocast(clip.device.type, dtype=clip.dtype, enabled=clip.dtype != torch.float32)
        with low:
            tokens, attn_sum = encode_trunk(visual, images, self.attn_range, stop=self._cam_from)
        depth = len(visual.transformer.resblocks)

        labels = [p.labels for p in group]
        sources = ["given"] * len(group)
        scores: list[dict[str, float]] = [{} for _ in group]
        thresholds: list[float | None] = [None] * len(group)
        todo = [i for i, lab in enumerate(labels) if lab is None]
        if todo:
            tagger = self.tagger
            with low:
                tags = tagger.tag(images[todo], trunk=tokens[todo] if self._cam_from == depth - 1 else None)
            for j, i in enumerate(todo):
                labels[i], thresholds[i], sources[i] = tags.labels[j], tags.thresholds[j], tagger.source
                scores[i] = tagger.record(tags.scores[j], tags.labels[j])

        pairs = self._pairs(labels)
        attn = attn_sum
        n = grid[0] * grid[1]
        cams = torch.zeros((0, *grid), device=clip.device)
        probs = torch.zeros((0, 0), device=clip.device)
        if pairs is not None:
            with low:
                maps = self.cam(visual, tokens, pairs, self.logit_scale, grid, self.attn_range)
            cams, probs = maps.cams.float(), maps.probs
            with_classes = torch.tensor([i for i, lab in enumerate(labels) if lab], device=clip.device)
            attn = attn.index_add(0, with_classes, maps.attention)
        attn = attn / self.attn_blocks
        affinity = sinkhorn_affinity(attn)
        boxes = box_mask(cams, self.box_threshold) if len(cams) else cams.new_zeros((0, n))

        # the group's post-processing as batched tensor ops over all its (image, class) pairs
        counts = [len(lab) for lab in labels]
        spans = np.cumsum([0, *counts])
        class_ids = torch.tensor([c for lab in labels for c in lab], dtype=torch.long).to(clip.device)
        pair_image = torch.repeat_interleave(torch.arange(len(group)), torch.tensor(counts)).to(clip.device)
        refined_low = refine_pairs(affinity, cams, boxes, pair_image)
        refined = upsample_batch(refined_low, counts, [p.size for p in group])
        masks = self._pseudo_masks(group, refined, class_ids, counts) if self.refiner is None else None
        pixel = self._refine_on_device(group, refined, [class_ids[spans[i]:spans[i + 1]] for i in range(len(group))])

        # one copy to the host for the whole group (on a GPU: asynchronous, into pinned memory)
        extra = [] if pixel is None else [t for r in pixel for t in (r.mask, r.confidence) if t is not None]
        host = iter(to_host([cams, probs, boxes, refined_low, *refined, *(masks or []), *extra,
                             *([attn] if self.keep_attention else [])]))
        cams_np, probs_np, boxes_np, refined_low_np = (next(host) for _ in range(4))
        refined_np = [next(host) for _ in group]
        masks_np = [next(host) for _ in group] if masks is not None else None
        pixel_np = [(next(host), None if r.confidence is None else next(host)) for r in pixel] if pixel else None
        attn_np = next(host) if self.keep_attention else None

        out = []
        for i, (p, lab) in enumerate(zip(group, labels, strict=True)):
            span, k = slice(spans[i], spans[i + 1]), len(lab)
            confidence = None
            if isinstance(self.refiner, HostRefiner):
                mask_np, confidence = self.refiner.refine_image(self._rgb(p), refined_np[i],
                                                                np.asarray(lab, dtype=np.int64), self.bg_power)
            elif pixel_np is not None:
                mask_np, confidence = pixel_np[i]
            else:
                mask_np = masks_np[i]
            prob = probs_np[spans[i], : k + len(self.text.bg)] if k else np.zeros(0, dtype=np.float32)
            out.append(LabelResult(
                labels=np.asarray(lab, dtype=np.int64), mask=mask_np, cam=cams_np[span],
                cam_refined=refined_np[i], confidence=confidence, cam_refined_lowres=refined_low_np[span],
                box_mask=boxes_np[span], attention=None if attn_np is None else attn_np[i],
                probs=prob, input_size=(images.shape[-2], images.shape[-1]),
                label_source=sources[i], scores=scores[i], threshold=thresholds[i]))
        return out

    def _label_dense(self, group: list[PreparedImage]) -> list[LabelResult]:
        """A dense method's masks, the images of each original size in one batch.

        ``mask`` holds 0 (background) or c + 1; ``labels`` the classes given, or those in the mask;
        ``cam``, ``cam_refined`` and ``cam_refined_lowres`` each label's class probability (k, H, W)
        at the original size; ``confidence`` the winning probability; ``probs`` each label's highest
        probability in the image; no boxes, no attention.
        """
        clip = self.clip
        low = torch.autocast(clip.device.type, dtype=clip.dtype, enabled=clip.dtype != torch.float32)
        pamr = self.refiner if isinstance(self.refiner, PamrRefiner) else None
        steps = pamr.iterations if pamr else self.cam.protocol.pamr_steps
        dilations = pamr.dilations if pamr else PamrRefiner().dilations
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(group):
            by_size.setdefault(p.size, []).append(i)
        out: list[LabelResult] = [None] * len(group)  # type: ignore[list-item]
        for members in by_size.values():
            rgb = torch.stack([torch.from_numpy(np.array(self._rgb(group[i]))) for i in members])
            given = [group[i].labels for i in members]
            with low:
                segs = dense_segment(self.cam, clip.visual, self.queries, rgb.to(clip.device), given, steps, dilations)
            for i, lab, (pred, top, probs, classes) in zip(members, given, segs, strict=True):
                if lab is None:
                    lab = [int(c) - 1 for c in torch.unique(pred).tolist() if c > 0]
                rows = [classes.index(c) + 1 for c in lab]
                mask, maps, conf = to_host([pred.to(torch.uint8), probs[rows].float(), top.float()])
                out[i] = LabelResult(
                    labels=np.asarray(lab, dtype=np.int64), mask=mask, cam=maps, cam_refined=maps,
                    cam_refined_lowres=maps, box_mask=np.zeros((len(lab), 0), dtype=np.float32), attention=None,
                    probs=maps.max(axis=(1, 2), initial=0.0), confidence=conf,
                    input_size=rescale_size(*group[i].size, self.cam.protocol.scale),
                    label_source="given" if group[i].labels is not None else "open-vocabulary")
        return out

    def _pseudo_masks(self, group: list[PreparedImage], refined: list[Tensor], class_ids: Tensor,
                      counts: list[int]) -> list[Tensor]:
        """Each image's pseudo mask, one batched argmax for the images of each original size."""
        starts = np.cumsum([0, *counts])
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(group):
            by_size.setdefault(p.size, []).append(i)
        masks: list[Tensor] = [None] * len(group)  # type: ignore[list-item]
        for members in by_size.values():
            maps = torch.cat([refined[i] for i in members])
            ids = torch.cat([class_ids[starts[i]:starts[i + 1]] for i in members])
            for i, mask in zip(members, pseudo_masks(maps, ids, [counts[i] for i in members], self.bg_power),
                               strict=True):
                masks[i] = mask
        return masks

    @staticmethod
    def _rgb(p: PreparedImage) -> np.ndarray:
        if p.rgb is None:
            raise ValueError("a pixel refiner needs the original pixels: prepare images with this Labeler")
        return p.rgb

    def _refine_on_device(self, group: list[PreparedImage], refined: list[Tensor], class_ids: list[Tensor]
                          ) -> list[Refined] | None:
        """A device refiner's results for the group (queued on the device like the rest), else None."""
        if not isinstance(self.refiner, DeviceRefiner):
            return None
        device = refined[0].device if refined else self.clip.device
        images = [torch.tensor(self._rgb(p), device=device) for p in group]
        return self.refiner.refine(images, [r.float() for r in refined], class_ids, self.bg_power)

    def _pairs(self, labels: list[list[int]]) -> CamPairs | None:
        """The (image, class) pairs of a group and each image's text set: its classes, then background."""
        k_max = max(len(lab) for lab in labels)
        if k_max == 0:
            return None
        bg = self.text.bg
        width = k_max + bg.shape[0]
        text = bg.new_zeros(len(labels), width, bg.shape[1])
        valid = torch.zeros(len(labels), width, dtype=torch.bool, device=bg.device)
        image, target = [], []
        for i, lab in enumerate(labels):
            k = len(lab)
            text[i, :k] = self.text.fg[lab]
            text[i, k:k + bg.shape[0]] = bg
            valid[i, : k + bg.shape[0]] = True
            image += [i] * k
            target += list(range(k))
        dev = bg.device
        return CamPairs(image=torch.tensor(image, device=dev), target=torch.tensor(target, device=dev),
                        text=text, valid=valid)
