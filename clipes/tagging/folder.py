"""Tagging many images: decoding in DataLoader workers, batches of one input size, a labels file out."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..batching import HalvingBatches
from ..data import ImageFolderDataset, Sample, collate_samples, probe_input_size, size_batches
from .base import Tagger

__all__ = ["TagRun", "TaggedImage", "labels_file_bytes", "tag_images"]


@dataclass
class TaggedImage:
    """One image's tags: its file name (relative to the input), every class's score, its labels."""

    file: str
    scores: torch.Tensor
    labels: list[int]
    threshold: float


@dataclass
class TagRun:
    """Tags by image stem, and the images that could not be tagged with why."""

    tagged: dict[str, TaggedImage] = field(default_factory=dict)
    failed: list[tuple[str, str]] = field(default_factory=list)


def tag_images(tagger: Tagger, items: list[tuple[str, Path]], *, batch_size: int, max_side: int | None,
               exif_transpose: bool = True, workers: int = 1,
               advance: Callable[[int], None] | None = None) -> TagRun:
    """Tag ``items`` (stem, path) in batches of one input size; ``advance(n)`` reports progress.

    Unreadable images and images the tagger cannot take are listed in ``failed``; a batch that runs
    out of memory is halved for good, and an image that does not fit alone is listed too.
    """
    clip = tagger.clip
    sizes = [probe_input_size(path, clip.patch_size, max_side, exif_transpose) for _, path in items]
    dataset = ImageFolderDataset([(stem, path, None) for stem, path in items], clip.patch_size, max_side,
                                 exif_transpose)
    loader = DataLoader(dataset, batch_sampler=size_batches(sizes, batch_size), collate_fn=collate_samples,
                        num_workers=workers, pin_memory=clip.device.type == "cuda")
    files = {stem: f"{stem}{path.suffix}" for stem, path in items}
    run = TagRun()

    def tag(chunk: list[Sample]) -> list[tuple[torch.Tensor, list[int], float]]:
        tags = tagger.tag(torch.stack([s.prepared.tensor.to(clip.device, clip.dtype, non_blocking=True)
                                       for s in chunk]))
        return list(zip(tags.scores, tags.labels, tags.thresholds, strict=True))

    sizer = HalvingBatches(tag, batch_size, lambda s: tuple(s.prepared.tensor.shape[-2:]))
    for batch in loader:
        batch: list[Sample]
        good = []
        for s in batch:
            reason = s.error if s.prepared is None else tagger.unusable(*s.prepared.tensor.shape[-2:])
            if reason is None:
                good.append(s)
            else:
                run.failed.append((s.path, reason if s.prepared is None else f"{s.path}: {reason}"))
        for s, tags in zip(good, sizer(good), strict=True):
            if isinstance(tags, str):
                run.failed.append((s.path, f"{s.path}: {tags}"))
            else:
                run.tagged[s.stem] = TaggedImage(files[s.stem], *tags)
        if advance is not None:
            advance(len(batch))
    return run


def labels_file_bytes(run: TagRun, classes: tuple[str, ...]) -> bytes:
    """``{"<file name>": {"labels": [...], "scores": {class: score}, "threshold": t}}``, sorted by name.

    Scores keep 8 significant digits (float32 holds about 7), so rankings and thresholds read back
    as computed; ``clipes label --labels`` reads the ``labels`` of each entry.
    """
    out = {}
    for tagged in sorted(run.tagged.values(), key=lambda t: t.file):
        out[tagged.file] = {
            "labels": [classes[i] for i in tagged.labels],
            "scores": {c: float(f"{v:.8g}") for c, v in zip(classes, tagged.scores.tolist(), strict=True)},
            "threshold": float(f"{tagged.threshold:.8g}"),
        }
    return (json.dumps(out, indent=1) + "\n").encode()
