"""``clipes segment``: predictions of a trained segmenter as palette PNGs (multi-scale, flip)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ClipesError
from ..images import ImageError, find_images, read_image
from ..masks import class_argmax, mask_to_png
from ..output import atomic_write, check_outside, encode_image
from .models import SEGMENTERS, build_segmenter
from .train import TrainConfig, load_checkpoint, predict_logits

__all__ = ["load_segmenter", "segment_image"]


def _skeleton_clip_spec(spec: str | None) -> str | None:
    """The CLIP spec that rebuilds the architecture without downloading: the checkpoint has the weights.

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


def load_segmenter(checkpoint: str | Path, device: torch.device) -> tuple[nn.Module, TrainConfig, list[str]]:
    """A trained segmenter from a ``train-seg`` checkpoint, in eval mode."""
    ckpt = load_checkpoint(checkpoint)
    if "model" not in ckpt or "config" not in ckpt:
        raise ClipesError(f"{checkpoint}: not a clipes train-seg checkpoint")
    cfg = TrainConfig(**ckpt["config"])
    classes = ckpt["classes"]
    backbone = "random" if cfg.model.startswith("deeplab") else cfg.backbone_weights
    model = build_segmenter(cfg.model, len(classes) + 1, clip_model=_skeleton_clip_spec(cfg.clip_model),
                            freeze_backbone=True, backbone_weights=backbone)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg, classes


@torch.no_grad()
def segment_image(model: nn.Module, cfg: TrainConfig, rgb: np.ndarray, device: torch.device,
                  scales: tuple[float, ...] = (1.0,), flip: bool = False) -> np.ndarray:
    """Label map (H, W) uint8: softmax averaged over scales (and horizontal flips), then argmax."""
    spec = SEGMENTERS[cfg.model]
    x = (torch.tensor(rgb, dtype=torch.float32).div(255) - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    x = x.permute(2, 0, 1)[None].to(device)
    h, w = x.shape[-2:]
    total = None
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        variants = [xs, xs.flip(-1)] if flip else [xs]
        for k, v in enumerate(variants):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = predict_logits(model, v, spec.stride).float()
            if k:
                logits = logits.flip(-1)
            probs = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).softmax(1)
            total = probs if total is None else total + probs
    return class_argmax(total[0]).to(torch.uint8).cpu().numpy()


def segment_folder(checkpoint: Path, images: Path, out: Path, device: torch.device, scales: tuple[float, ...],
                   flip: bool, overwrite: bool, progress) -> tuple[int, int, list[str]]:
    """Predict every image under ``images`` into ``out/<stem>.png``; returns done, skipped, failures."""
    items = find_images(images)
    check_outside(images, out)
    model, cfg, _ = load_segmenter(checkpoint, device)
    done, skipped, failed = 0, 0, []
    for stem, path in progress.track(items, description="segmenting"):
        target = out / f"{stem}.png"
        if target.exists() and not overwrite:
            skipped += 1
            continue
        try:
            rgb = np.asarray(read_image(path).convert("RGB"))
        except ImageError as e:
            failed.append(str(e))
            continue
        atomic_write(target, encode_image(mask_to_png(segment_image(model, cfg, rgb, device, scales, flip))))
        done += 1
    return done, skipped, failed
