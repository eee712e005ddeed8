"""The settings of a ``train-seg`` run: presets, a YAML file and flags, each value checked before any work.

A value that cannot mean anything (``--steps 0``, ``--lr nan``, ``lr: fast`` in a config file) is a
one-line error naming the flag or the file and key it came from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import ClipesError
from .losses import LOSS_NORMS, LOSSES
from .presets import PRESETS
from .registry import SEGMENTERS

__all__ = ["PRESETS", "ConfigError", "TrainConfig", "check_settings", "load_config"]


class ConfigError(ClipesError):
    """A training setting has the wrong type or a value that cannot mean anything."""




@dataclass
class TrainConfig:
    """Every setting of a training run; ``None`` fields take the model's preset."""

    out: str = "clipes_seg"
    images: str | None = None
    masks: str | None = None
    val_images: str | None = None
    val_masks: str | None = None
    confidence: str | None = None
    dataset: str | None = None
    root: str | None = None
    split: str = "train"
    val_split: str = "val"
    classes: str = "voc"
    model: str = "clip-linear"
    clip_model: str | None = None
    freeze_backbone: bool | None = None
    freeze_bn: bool | None = None
    backbone_weights: str | None = None
    optimizer: str | None = None
    lr: float | None = None
    head_lr_mult: float | None = None
    head_bias_lr_mult: float | None = None
    head_bias_decay: bool | None = None
    weight_decay: float | None = None
    momentum: float | None = None
    poly_power: float = 0.9
    min_lr: float | None = None  # the poly schedule's floor (mmseg's, SETR: 1e-4); None: the preset's, else 0
    poly_step: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    accumulate: int | None = None
    crop: int | None = None
    scale_min: float | None = None  # random scale range (mmseg augmentation: ratio range of base_size)
    scale_max: float | None = None
    scales: list[float] | None = None
    augment: str | None = None  # "clipes" (scale of the image) or "mmseg" (SETR's pipeline, segment/augment.py)
    base_size: int | None = None  # mmseg: the Resize img_scale the ratio multiplies
    cat_max_ratio: float | None = None  # mmseg RandomCrop: retry crops where one class covers more than this
    photometric: bool | None = None  # mmseg PhotoMetricDistortion
    test_size: int | None = None  # segment: resize the image's short side to this first (SETR's test Resize)
    test_crop: int | None = None  # segment: sliding-window crop (None: the whole image at once)
    test_stride: int | None = None
    loss: str = "ce"  # losses.LOSSES: the authors' plain CE, or AdvCAM's class-balanced CE
    loss_norm: str | None = None  # losses.LOSS_NORMS: what the loss is averaged over; None: the preset's
    bf16: bool = False
    seed: int = 0
    val_every: int = 500
    log_every: int = 10
    workers: int = 2
    device: str = "auto"
    resume: bool = False
    allow_changes: bool = False
    overwrite: bool = False
    stop_at: int | None = None

    def resolved(self) -> TrainConfig:
        """A checked copy with the preset filled in where a field is None."""
        if self.model not in SEGMENTERS:
            hint = (" (CLIP weights for the clip-* models go to --clip-model)"
                    if any(c in self.model for c in "/:.") else "")
            raise ConfigError(f"unknown model {self.model!r}; choose one of {', '.join(SEGMENTERS)}{hint}")
        preset = PRESETS[SEGMENTERS[self.model].preset]
        cfg = TrainConfig(**{f.name: preset.get(f.name) if getattr(self, f.name) is None and f.name in preset
                             else getattr(self, f.name) for f in fields(self)})
        check_settings(vars(cfg), lambda key: f"{key} (preset or default)")
        for key, (kind, _, _) in _NUMBERS.items():  # `steps: 2.0` passes the check as a whole number: make it one
            if getattr(cfg, key) is not None:
                setattr(cfg, key, kind(getattr(cfg, key)))
        _check_together(cfg)
        return cfg


def _positive(v: float) -> bool:
    return math.isfinite(v) and v > 0


def _non_negative(v: float) -> bool:
    return math.isfinite(v) and v >= 0


# field -> (type, test, what a valid value is)
_NUMBERS: dict[str, tuple[type, Callable[[Any], bool], str]] = {
    "lr": (float, _positive, "a positive number"),
    "head_lr_mult": (float, _positive, "a positive number"),
    "head_bias_lr_mult": (float, _positive, "a positive number"),
    "weight_decay": (float, _non_negative, "a number >= 0"),
    "momentum": (float, lambda v: math.isfinite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "poly_power": (float, _non_negative, "a number >= 0"),
    "min_lr": (float, _non_negative, "a number >= 0"),
    "cat_max_ratio": (float, lambda v: math.isfinite(v) and 0 < v <= 1, "a number in (0, 1]"),
    "base_size": (int, lambda v: v >= 1, "a whole number >= 1"),
    "test_size": (int, lambda v: v >= 1, "a whole number >= 1"),
    "test_crop": (int, lambda v: v >= 1, "a whole number >= 1"),
    "test_stride": (int, lambda v: v >= 1, "a whole number >= 1"),
    "scale_min": (float, _positive, "a positive number"),
    "scale_max": (float, _positive, "a positive number"),
    "steps": (int, lambda v: v >= 1, "a whole number >= 1"),
    "poly_step": (int, lambda v: v >= 1, "a whole number >= 1"),
    "batch_size": (int, lambda v: v >= 1, "a whole number >= 1"),
    "accumulate": (int, lambda v: v >= 1, "a whole number >= 1"),
    "crop": (int, lambda v: v >= 1, "a whole number >= 1"),
    "seed": (int, lambda v: 0 <= v < 2**32, "a whole number in [0, 2**32)"),  # numpy's seeds
    "val_every": (int, lambda v: v >= 1, "a whole number >= 1"),
    "log_every": (int, lambda v: v >= 1, "a whole number >= 1"),
    "workers": (int, lambda v: v >= 0, "a whole number >= 0"),
    "stop_at": (int, lambda v: v >= 1, "a whole number >= 1"),
}
_FLAGS = ("freeze_backbone", "freeze_bn", "head_bias_decay", "bf16", "resume", "allow_changes", "overwrite",
          "photometric")
_CHOICES = {"optimizer": ("sgd", "adamw"), "loss": LOSSES, "loss_norm": LOSS_NORMS,
            "augment": ("clipes", "mmseg")}


def _check_value(key: str, value: Any, name: str) -> None:
    if value is None:
        return
    if key in _NUMBERS:
        kind, test, what = _NUMBERS[key]
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int:
            ok_type = ok_type and float(value).is_integer() if isinstance(value, float) else ok_type
        if not ok_type or not test(kind(value)):
            raise ConfigError(f"{name}: {value!r} is not {what}")
    elif key == "scales":
        if not isinstance(value, (list, tuple)) or not value or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) and _positive(float(s)) for s in value):
            raise ConfigError(f"{name}: {value!r} is not a list of positive numbers")
    elif key in _FLAGS:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: {value!r} is not true or false")
    elif key in _CHOICES:
        if value not in _CHOICES[key]:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(_CHOICES[key])}")
    elif not isinstance(value, str):
        raise ConfigError(f"{name}: {value!r} is not a string")


def check_settings(data: dict[str, Any], name: Callable[[str], str]) -> None:
    """Each value's type and range; ``name(key)`` says where a value came from in the message."""
    for key, value in data.items():
        _check_value(key, value, name(key))


def _check_together(cfg: TrainConfig) -> None:
    """Settings that are valid alone but not together."""
    if (cfg.test_crop is None) != (cfg.test_stride is None):
        raise ConfigError("test_crop and test_stride make the sliding window together; give both or neither")
    if cfg.augment == "mmseg" and cfg.base_size is None:
        raise ConfigError("augment: mmseg needs base_size (the size the ratio range multiplies)")
    if cfg.scale_min > cfg.scale_max:
        raise ConfigError(f"scale_min {cfg.scale_min} is larger than scale_max {cfg.scale_max}")
    if cfg.batch_size % cfg.accumulate:
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by --accumulate {cfg.accumulate}")
    if SEGMENTERS[cfg.model].recipe == "deeplab-pytorch" and (cfg.loss_norm, cfg.augment) != ("labelled", "clipes"):
        raise ConfigError(f"{cfg.model} trains as deeplab-pytorch: each output's loss averaged over its labelled "
                          "pixels and its own augmentation; loss_norm all and augment mmseg do not apply")
    stride = SEGMENTERS[cfg.model].stride
    if cfg.crop < stride:
        raise ConfigError(f"--crop {cfg.crop} is smaller than the model's stride {stride}")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; give one")
    if cfg.allow_changes and not cfg.resume:
        raise ConfigError("--allow-changes goes with --resume (settings of a run being continued)")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def load_config(path: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """A YAML file's settings, overridden by the flags given on the command line (non-None); every
    value checked and named by where it came from (the flag, or the file and key)."""
    data: dict[str, Any] = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read config ({' '.join(str(e).split())})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings (key: value), got {type(data).__name__}")
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}")
        check_settings(data, lambda key: f"{path}: {key}")
    given = {k: v for k, v in overrides.items() if v is not None}
    check_settings(given, _flag)
    data.update(given)
    return TrainConfig(**data).resolved()
