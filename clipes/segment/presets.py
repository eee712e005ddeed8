"""The training presets of each segmenter family, as data, without torch: ``train-seg`` fills unset settings
from them, and its ``--help`` prints them (``preset_help``), so that what help says is what a run takes."""

from __future__ import annotations

from typing import Any

__all__ = ["MODEL_PRESETS", "PRESETS", "SETR_PRESETS", "preset_help"]

# configs/SETR/*_DeiT_480x480_80k_pascal_context_bs_16.py (Pascal Context, the nearest to VOC; the naive
# decoder has no ViT-B config there, its ViT-L one is used: lr 0.01 as in every naive config) over mmseg's
# schedule_80k: SGD momentum 0.9, weight decay 0, lr x10 on every parameter named "head" (the decode and
# auxiliary heads; the MLA neck is part of their backbone and trains at 1x), poly 0.9 per iteration down to
# min_lr 1e-4, 80k iterations of 16 crops of 480. Whether the CLIP encoder trains stays --finetune's.
# The loss is mmseg's CrossEntropyLoss (avg_non_ignore off): averaged over every pixel of the crops. The data
# pipeline is configs/_base_/datasets/pascal_context.py's (segment/augment.py): Resize of the 520 base by a
# ratio in [0.5, 2.0] (keep_ratio), RandomCrop 480 with cat_max_ratio 0.75, RandomFlip 0.5,
# PhotoMetricDistortion, Pad with 0 / 255; test: the short side resized to 520 (their Resize with
# dataset='pascal_context'), then mmseg's sliding window, 480 every 320.
_SETR_SGD: dict[str, Any] = {
    "optimizer": "sgd", "lr": 1e-3, "weight_decay": 0.0, "momentum": 0.9, "min_lr": 1e-4, "crop": 480,
    "batch_size": 16, "accumulate": 1, "steps": 80000, "head_lr_mult": 10.0, "head_bias_lr_mult": 10.0,
    "head_bias_decay": True, "freeze_bn": False, "freeze_backbone": True, "loss_norm": "all",
    "augment": "mmseg", "base_size": 520, "scale_min": 0.5, "scale_max": 2.0, "cat_max_ratio": 0.75,
    "photometric": True, "test_size": 520, "test_crop": 480, "test_stride": 320}
SETR_PRESETS: dict[str, dict[str, Any]] = {"setr": _SETR_SGD, "setr-naive": {**_SETR_SGD, "lr": 1e-2}}

# clipes' own data recipe and loss averaging (the SETR presets take mmseg's, above)
_CLIPES_DATA: dict[str, Any] = {"loss_norm": "labelled", "augment": "clipes", "scale_min": 0.5, "scale_max": 1.5,
                                "photometric": False}

# DeepLab (deeplab-pytorch's VOC config as CLIP-ES used it, ../shared/clipes-reference.md section 6): SGD
# momentum 0.9, poly 0.9, lr 2e-4 (ImageNet initialisation), 10x lr on the head's weights and 20x on its
# biases (no weight decay on those), wd 5e-4, batch 10 (5 x 2 accumulated), crop 321, 20k steps, scales
# {0.5, 0.75, 1, 1.25, 1.5}, backbone BatchNorm frozen. "deeplabv2" is the same recipe as deeplab-pytorch's
# main.py runs it (the poly rate stepped every 10 iterations, `libs/utils/lr_scheduler.py`); the torchvision
# DeepLabs step it every iteration. AdamW for the ViT heads (Segmenter's recipe).
PRESETS: dict[str, dict[str, Any]] = {
    "deeplab": {"optimizer": "sgd", "lr": 2e-4, "weight_decay": 5e-4, "momentum": 0.9, "crop": 321,
                "batch_size": 10, "accumulate": 2, "steps": 20000, "head_lr_mult": 10.0, "head_bias_lr_mult": 20.0,
                "head_bias_decay": False, "freeze_bn": True, "freeze_backbone": False,
                "scales": [0.5, 0.75, 1.0, 1.25, 1.5], "poly_step": 1, **_CLIPES_DATA},
    "vit": {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.01, "momentum": 0.9, "crop": 448,
            "batch_size": 16, "accumulate": 1, "steps": 20000, "head_lr_mult": 1.0, "head_bias_lr_mult": 1.0,
            "head_bias_decay": True, "freeze_bn": False, "freeze_backbone": True, "poly_step": 1, **_CLIPES_DATA},
}
PRESETS.update(SETR_PRESETS)  # clip-setr-*: SETR's SGD recipe
PRESETS["deeplabv2"] = {**PRESETS["deeplab"], "poly_step": 10}

# the preset family of each segmenter (SEGMENTERS[name].preset, which a test keeps equal), for --help
MODEL_PRESETS: dict[str, str] = {
    "clip-linear": "vit", "clip-segmenter": "vit", "clip-setr-naive": "setr-naive", "clip-setr-pup": "setr",
    "clip-setr-mla": "setr", "deeplabv3-resnet50": "deeplab", "deeplabv3-resnet101": "deeplab",
    "deeplabv2-resnet101": "deeplabv2", "deeplabv2-resnet101-torchvision": "deeplab", "tiny": "vit"}
# how --help names each family
FAMILY_NAMES = {"deeplab": "DeepLab", "deeplabv2": "DeepLab", "vit": "clip-linear/segmenter", "setr": "SETR PUP/MLA",
                "setr-naive": "SETR naive"}


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        text = f"{value:g}"
        return f"{value:.0e}".replace("e-0", "e-") if value and abs(value) < 1e-2 and "e" not in text else text
    return str(value)


def preset_help(key: str) -> str:
    """``key``'s value in each family's preset, families with one value together: "2e-4 DeepLab, ..."."""
    by_value: dict[str, list[str]] = {}
    for family, preset in PRESETS.items():
        if key in preset:
            names = by_value.setdefault(_text(preset[key]), [])
            name = FAMILY_NAMES.get(family, family)
            if name not in names:
                names.append(name)
    return ", ".join(f"{value} {' & '.join(names)}" for value, names in by_value.items())
