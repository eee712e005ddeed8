"""``clipes segment``: predictions of a trained segmenter as palette PNGs (multi-scale, flip)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..batching import is_out_of_memory
from ..errors import ClipesError
from ..images import ImageError, find_images, read_image
from ..masks import class_argmax, mask_to_png
from ..output import atomic_write, check_not_inputs, check_writable, encode_image, folder_lock
from ..provenance import file_digest, input_stamp
from ..splits import read_split_file
from .augment import short_side_size
from .checkpoint import CheckpointError, read_checkpoint
from .config import TrainConfig
from .crf import DEEPLAB_CRF, crf_probabilities
from .registry import SEGMENTERS, build_segmenter
from .slide import slide_logits
from .train import predict_logits

__all__ = ["RECORD", "load_segmenter", "segment_folder", "segment_image"]

RECORD = "segment.json"  # what made each prediction of an output folder


def _skeleton_clip_spec(spec: str | None) -> str | None:
    """Format 1 checkpoints only: the CLIP spec that rebuilds the architecture without downloading.

    ``ARCH/TAG`` becomes ``ARCH`` (random init), or ``ARCH-quickgelu`` where the tag's weights use
    QuickGELU (OpenAI's), so the activation matches the trained model.
    """
    import open_clip

    from ..model import DEFAULT_MODEL

    spec = spec or DEFAULT_MODEL
    if "/" not in spec or Path(spec).expanduser().exists() or spec.startswith("hf-hub:"):
        return spec
    arch, tag = spec.split("/", 1)
    if open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu") and f"{arch}-quickgelu" in open_clip.list_models():
        return f"{arch}-quickgelu"
    return arch


def _config(ckpt: dict[str, Any], checkpoint: Path) -> TrainConfig:
    known = set(TrainConfig.__dataclass_fields__)
    try:
        return TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
    except TypeError as e:
        raise CheckpointError(f"{checkpoint}: unreadable training config ({e})") from None


def load_segmenter(checkpoint: str | Path, device: torch.device) -> tuple[nn.Module, TrainConfig, list[str]]:
    """A trained segmenter from a ``train-seg`` checkpoint, in eval mode; needs no file but the checkpoint
    (format 2; format 1 rebuilds a CLIP encoder from the CLIP spec recorded at training time)."""
    checkpoint = Path(checkpoint)
    ckpt = read_checkpoint(checkpoint)
    cfg = _config(ckpt, checkpoint)
    classes = list(ckpt["classes"])
    if cfg.model not in SEGMENTERS:
        raise CheckpointError(f"{checkpoint}: model {cfg.model!r} is unknown to this clipes")
    if cfg.model == "deeplabv2-resnet101" and any(k.startswith("backbone.") for k in ckpt["model"]):
        cfg.model = "deeplabv2-resnet101-torchvision"  # trained by a clipes whose deeplabv2 was torchvision's
    arch = ckpt.get("arch") or {}
    vision = arch.get("clip_vision")
    clip_model = None if vision else _skeleton_clip_spec(cfg.clip_model) if cfg.model.startswith("clip") else None
    model = build_segmenter(cfg.model, len(classes) + 1, clip_model=clip_model, clip_vision=vision,
                            freeze_backbone=True, backbone_weights="random", freeze_bn=bool(cfg.freeze_bn))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint}: weights do not fit a {cfg.model} with {len(classes)} classes "
                              f"({' '.join(str(e).split())[:200]})") from None
    return model.to(device).eval(), cfg, classes


def _rescaled(x: Tensor, s: float) -> Tensor:
    """``x`` at test scale ``s``; a side that would shrink under one pixel is predicted at one (a 1x1 image at
    0.5, or any image at 0.01: interpolation to zero pixels aborted the run)."""
    h, w = x.shape[-2:]
    if math.floor(h * s) >= 1 and math.floor(w * s) >= 1:
        return F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
    size = (max(1, math.floor(h * s)), max(1, math.floor(w * s)))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _test_input(x: Tensor, s: float, cfg: TrainConfig) -> Tensor:
    """The input at test scale ``s``: with the run's ``test_size`` (SETR's test pipeline) the image resized so
    that its short side is ``test_size * s`` (mmcv's rounding), else ``x`` scaled by ``s``."""
    size = getattr(cfg, "test_size", None)
    if not size:
        return x if s == 1.0 else _rescaled(x, s)
    h, w = short_side_size(*x.shape[-2:], int(size * s))
    return x if (h, w) == tuple(x.shape[-2:]) else F.interpolate(x, size=(h, w), mode="bilinear",
                                                                 align_corners=False)


def _logits(model: nn.Module, cfg: TrainConfig, x: Tensor, stride: int) -> Tensor:
    """Whole-image logits, or mmseg's sliding window where the run's preset tests so (SETR: 480 / 320)."""
    crop, step = getattr(cfg, "test_crop", None), getattr(cfg, "test_stride", None)
    if crop and step:
        return slide_logits(lambda window: predict_logits(model, window, stride), x, crop, step)
    return predict_logits(model, x, stride)


@torch.no_grad()
def segment_image(model: nn.Module, cfg: TrainConfig, rgb: np.ndarray, device: torch.device,
                  scales: tuple[float, ...] = (1.0,), flip: bool = False, crf: str | None = None) -> np.ndarray:
    """Label map (H, W) uint8: softmax averaged over scales (and horizontal flips), refined by deeplab-pytorch's
    dense CRF on backend ``crf`` (pydensecrf or torch) when given, then argmax."""
    spec = SEGMENTERS[cfg.model]
    x = torch.from_numpy(spec.normalize(rgb)).permute(2, 0, 1)[None].to(device)
    h, w = x.shape[-2:]
    total, count = None, 0
    for s in scales:
        xs = _test_input(x, s, cfg)
        variants = [xs, xs.flip(-1)] if flip else [xs]
        for k, v in enumerate(variants):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = _logits(model, cfg, v, spec.stride).float()
            if k:
                logits = logits.flip(-1)
            probs = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).softmax(1)
            total = probs if total is None else total + probs
            count += 1
    if crf is not None:
        return class_argmax(crf_probabilities(rgb, total[0] / count, crf)).to(torch.uint8).cpu().numpy()
    return class_argmax(total[0]).to(torch.uint8).cpu().numpy()


def listed_items(items: list[tuple[str, Path]], split_file: Path, images: Path) -> list[tuple[str, Path]]:
    """The images of ``items`` that ``split_file`` names (by file stem, as the authors' lists); a listed name
    without an image is refused."""
    listed, _ = read_split_file(split_file)
    by_name = {stem.rsplit("/", 1)[-1]: (stem, path) for stem, path in items}
    unknown = [name for name in listed if name not in by_name]
    if unknown:
        raise ClipesError(f"--split-file {split_file}: {len(unknown)} of {len(listed)} listed image(s) are not in "
                          f"{images}, e.g. {unknown[0]}")
    return [by_name[name] for name in listed]


def _read_record(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ClipesError(f"{path}: unreadable record of this folder's predictions ({e}); use --overwrite or "
                          "another --out") from None
    if not isinstance(record, dict) or not isinstance(record.get("images"), dict):
        raise ClipesError(f"{path}: not a record of clipes segment; use --overwrite or another --out")
    return record


def _write_record(path: Path, settings: dict[str, Any], images: dict[str, Any]) -> None:
    atomic_write(path, json.dumps({"settings": settings, "images": images}, indent=1, sort_keys=True).encode())


def segment_folder(checkpoint: Path, images: Path, out: Path, device: torch.device, scales: tuple[float, ...],
                   flip: bool, overwrite: bool, progress, save_every: float = 2.0, crf: str | None = None,
                   exif: bool = True, split_file: Path | None = None) -> tuple[int, int, list[str]]:
    """Predict every image under ``images`` into ``out/<stem>.png``; returns done, skipped, failures.

    ``crf``: the dense CRF's backend (None: no CRF); ``exif``: turn photos by their EXIF orientation (False:
    the pixels as stored, as dataset annotations are); ``split_file``: only the images it lists (by stem).
    ``out/segment.json`` records what made the predictions (the checkpoint's content hash, scales, flip, CRF,
    EXIF) and each input's file, size and modification time.
    A rerun skips only images whose input and settings are unchanged; a folder made with other settings is
    refused unless ``overwrite``, which also removes the predictions of images no longer in the input.
    """
    if not images.is_dir():
        raise ClipesError(f"{images}: not a folder of images")
    check_not_inputs({"--out": out}, {"the input folder": images, "--checkpoint": checkpoint})
    check_writable(out)  # a file, a file above it or a read-only place, before the model loads
    items = find_images(images)
    if split_file is not None:
        items = listed_items(items, split_file, images)
    settings = {"checkpoint": file_digest(checkpoint) if checkpoint.is_file() else str(checkpoint),
                "scales": list(scales), "flip": flip}
    if crf is not None:  # recorded only when on: folders made before these options compare equal without them
        settings["crf"] = {"backend": crf, **asdict(DEEPLAB_CRF)}
    if not exif:
        settings["ignore_exif"] = True
    record_path = out / RECORD
    previous = _read_record(record_path)
    if previous is None and not overwrite and any(out.glob("*.png")):
        raise ClipesError(f"--out {out} holds PNGs without a {RECORD} saying what made them; use --overwrite or "
                          "another --out")
    if previous is not None and previous.get("settings") != settings and not overwrite:
        changed = sorted(k for k in settings if settings[k] != (previous.get("settings") or {}).get(k))
        raise ClipesError(f"--out {out} holds predictions made with other settings ({', '.join(changed) or 'all'}); "
                          "use --overwrite to redo them or choose another --out")
    model, cfg, _ = load_segmenter(checkpoint, device)
    with folder_lock(out):
        return _segment_all(model, cfg, items, images, out, device, scales, flip, overwrite, progress, save_every,
                            settings, previous, crf, exif)


def _segment_all(model, cfg, items, images: Path, out: Path, device: torch.device, scales: tuple[float, ...],
                 flip: bool, overwrite: bool, progress, save_every: float, settings: dict[str, Any],
                 previous: dict[str, Any] | None, crf: str | None = None, exif: bool = True
                 ) -> tuple[int, int, list[str]]:
    record_path = out / RECORD
    done_before: dict[str, Any] = {} if overwrite or previous is None else dict(previous["images"])
    if overwrite and previous is not None:  # predictions of images that are gone from the input go too
        current = {stem for stem, _ in items}
        for stem in set(previous["images"]) - current:
            (out / f"{stem}.png").unlink(missing_ok=True)
    record = dict(done_before)
    _write_record(record_path, settings, record)  # the settings first: no prediction is ever unaccounted for
    done, skipped, failed = 0, 0, []
    last_save = time.monotonic()
    for stem, path in progress.track(items, description="segmenting"):
        target = out / f"{stem}.png"
        stamp = input_stamp(path, path.relative_to(images).as_posix())
        if done_before.get(stem) == stamp and target.is_file():
            skipped += 1
            continue
        record.pop(stem, None)
        try:
            rgb = np.asarray(read_image(path, exif_transpose=exif).convert("RGB"))
        except ImageError as e:
            failed.append(str(e))
            continue
        try:
            labels = segment_image(model, cfg, rgb, device, scales, flip, crf)
        except (RuntimeError, MemoryError) as e:
            if not is_out_of_memory(e):
                raise
            raise ClipesError(f"{path}: out of memory at {rgb.shape[1]}x{rgb.shape[0]} pixels and --scales "
                              f"{','.join(f'{v:g}' for v in scales)}; use smaller --scales") from None
        atomic_write(target, encode_image(mask_to_png(labels)))
        record[stem] = stamp
        done += 1
        if time.monotonic() - last_save > save_every:
            _write_record(record_path, settings, record)
            last_save = time.monotonic()
    _write_record(record_path, settings, record)
    return done, skipped, failed
