"""``clipes train-seg``: fit a segmenter on pseudo masks with the confidence-guided loss (CGL).

Cross-entropy with 255 ignored (CLIP-ES's CGL), optionally weighted per pixel by the saved CRF
confidence. Single process, CPU or GPU, or one process per GPU under ``torchrun`` (DDP).
"""

from __future__ import annotations

import io
import json
import math
import os
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..distributed import DistInfo, process_group
from ..errors import ClipesError
from ..evaluate import confusion, scores
from ..masks import IGNORE, class_argmax
from ..model import DEFAULT_MODEL, MODEL_ENV, resolve_device
from ..output import atomic_write
from ..prompts import load_class_set
from .data import PositionSampler, SegDataset, SegItem, pair_folders
from .models import SEGMENTERS, build_segmenter

__all__ = ["PRESETS", "TrainConfig", "cgl_loss", "load_checkpoint", "load_config", "train"]


# The reference's DeepLab schedule (SGD, poly 0.9, wd 5e-4, crop 321, batch 10, 20k steps; 10x lr for
# the head as DeepLab does), and AdamW for the ViT heads (Segmenter's recipe).
PRESETS: dict[str, dict[str, Any]] = {
    "deeplab": {"optimizer": "sgd", "lr": 2e-4, "weight_decay": 5e-4, "momentum": 0.9, "crop": 321,
                "batch_size": 10, "steps": 20000, "head_lr_mult": 10.0},
    "vit": {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.01, "momentum": 0.9, "crop": 448,
            "batch_size": 16, "steps": 20000, "head_lr_mult": 1.0},
}


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
    freeze_backbone: bool = True
    backbone_weights: str | None = None
    optimizer: str | None = None
    lr: float | None = None
    head_lr_mult: float | None = None
    weight_decay: float | None = None
    momentum: float | None = None
    poly_power: float = 0.9
    steps: int | None = None
    batch_size: int | None = None
    crop: int | None = None
    scale_min: float = 0.5
    scale_max: float = 1.5
    bf16: bool = False
    seed: int = 0
    val_every: int = 500
    log_every: int = 10
    workers: int = 2
    device: str = "auto"
    resume: bool = False
    stop_at: int | None = None

    def resolved(self) -> TrainConfig:
        """A copy with the preset filled in where a field is None."""
        if self.model not in SEGMENTERS:
            raise ClipesError(f"unknown model {self.model!r}; choose one of {', '.join(SEGMENTERS)}")
        preset = PRESETS[SEGMENTERS[self.model].preset]
        return TrainConfig(**{f.name: preset.get(f.name) if getattr(self, f.name) is None and f.name in preset
                              else getattr(self, f.name) for f in fields(self)})


def load_config(path: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """A YAML file's settings, overridden by the flags given on the command line (non-None)."""
    data: dict[str, Any] = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ClipesError(f"{path}: cannot read config ({e})") from None
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ClipesError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**data).resolved()


def cgl_loss(logits: Tensor, labels: Tensor, weights: Tensor, norm: Tensor | float) -> Tensor:
    """Sum of weighted per-pixel cross-entropy over pixels whose label is not 255, divided by ``norm``."""
    ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="none")
    return (ce * weights * (labels != IGNORE)).sum() / norm


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _items(cfg: TrainConfig, val: bool) -> list[SegItem]:
    """Training items (images with pseudo masks) or validation items (images with ground truth)."""
    if cfg.dataset:
        from ..datasets import load_split

        split = load_split(cfg.dataset, cfg.root or "", cfg.val_split if val else cfg.split)
        if val:
            if split.gt_dir is None:
                return []
            return [SegItem(stem, path, split.gt_dir / f"{stem}.png") for stem, path in split.items]
        if not cfg.masks:
            raise ClipesError("train-seg --dataset needs --masks, the pseudo masks of that split")
        conf = Path(cfg.confidence) / "cams" if cfg.confidence else None
        return [SegItem(stem, path, Path(cfg.masks) / f"{stem}.png",
                        conf / f"{stem}.npz" if conf and (conf / f"{stem}.npz").is_file() else None)
                for stem, path in split.items]
    images, masks = (cfg.val_images, cfg.val_masks) if val else (cfg.images, cfg.masks)
    if not images:
        return []
    if not masks:
        raise ClipesError(f"--{'val-' if val else ''}images needs --{'val-' if val else ''}masks")
    conf = Path(cfg.confidence) / "cams" if cfg.confidence and not val else None
    return pair_folders(Path(images), Path(masks), conf)


def _param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    head, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if name.startswith(("head.", "model.classifier.")) else rest).append(p)
    groups = [{"params": rest, "lr": cfg.lr}] if rest else []
    return [*groups, {"params": head, "lr": cfg.lr * cfg.head_lr_mult}]


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ClipesError(f"--optimizer {cfg.optimizer!r}: choose sgd or adamw")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _save(path: Path, model: nn.Module, opt, sched, step: int, best: float, cfg: TrainConfig, classes) -> None:
    buf = io.BytesIO()
    torch.save({"model": _unwrap(model).state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "step": step, "best_miou": best, "config": asdict(cfg), "classes": list(classes)}, buf)
    atomic_write(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise ClipesError(f"{path}: cannot read checkpoint ({e})") from None


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor, stride: int) -> Tensor:
    """Logits for whole images: pad to a multiple of the model's stride, then crop back."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % stride, (-w) % stride
    logits = model(F.pad(x, (0, pw, 0, ph)))
    return logits[..., :h, :w]


@torch.no_grad()
def validate(model: nn.Module, dataset: SegDataset, num_classes: int, device: torch.device, stride: int,
             bf16: bool) -> float:
    """mIoU over a validation set, one whole image at a time."""
    model.eval()
    hist = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    for i in range(len(dataset)):
        x, labels, _ = dataset[i]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = predict_logits(model, x[None].to(device), stride)
        hist += confusion(class_argmax(logits[0]).cpu().numpy(), labels.numpy(), num_classes)
    model.train()
    return scores(hist).miou


def train(cfg: TrainConfig, console: Console | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns the final step, loss and best validation mIoU."""
    console = console or Console(stderr=True)
    cfg = cfg.resolved()
    if cfg.model.startswith("clip") and cfg.clip_model is None:  # record what was used, for `clipes segment`
        cfg.clip_model = os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    device = resolve_device(cfg.device)
    with process_group(device) as (device, info):
        return _train(cfg, console, device, info)


def _train(cfg: TrainConfig, console: Console, device: torch.device, info: DistInfo) -> dict[str, Any]:
    out = Path(cfg.out)
    class_set = load_class_set(cfg.classes)
    num_classes = len(class_set) + 1
    spec = SEGMENTERS[cfg.model]
    items = _items(cfg, val=False)
    if not items:
        raise ClipesError("no training images: give --images and --masks, or --dataset with --root")
    val_items = _items(cfg, val=True)

    _seed_everything(cfg.seed)
    model = build_segmenter(cfg.model, num_classes, clip_model=cfg.clip_model, freeze_backbone=cfg.freeze_backbone,
                            backbone_weights=cfg.backbone_weights).to(device)
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / cfg.steps) ** cfg.poly_power)
    start, best = 0, float("-inf")
    last = out / "last.pt"
    if cfg.resume and last.is_file():
        ckpt = load_checkpoint(last)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start, best = int(ckpt["step"]), float(ckpt["best_miou"])
        if info.is_main:
            console.print(f"resumed from {escape(str(last))} at step {start}")
    if info.world > 1:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    train_set = SegDataset(items, spec.mean, spec.std, train=True, crop=cfg.crop, scale=(cfg.scale_min, cfg.scale_max),
                           seed=cfg.seed)
    stop = min(cfg.steps, cfg.stop_at or cfg.steps)
    sampler = PositionSampler(len(train_set), cfg.batch_size, stop, start, cfg.seed, info.rank, info.world)
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.workers, pin_memory=device.type == "cuda")
    val_set = SegDataset(val_items, spec.mean, spec.std, train=False) if val_items else None

    log_path = out / "log.jsonl"
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False).encode())
    history: list[dict[str, Any]] = []
    model.train()
    loss_value = float("nan")
    columns = (TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TextColumn("val mIoU {task.fields[miou]}"),
               TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not info.is_main) as progress:
        task = progress.add_task("train", total=cfg.steps, completed=start, loss="-",
                                 miou="-" if best == float("-inf") else f"{100 * best:.1f}")
        step = start
        unread: list[Tensor] = []
        records: list[dict[str, Any]] = []
        for x, labels, weights in loader:
            x, labels, weights = (t.to(device, non_blocking=True) for t in (x, labels, weights))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = model(x)
            valid = ((labels != IGNORE) * weights).sum()
            if info.world > 1:
                dist.all_reduce(valid)
            norm = valid.clamp_min(1e-6) / info.world  # DDP averages gradients over ranks
            loss = cgl_loss(logits, labels, weights, norm)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            total = loss.detach() / info.world
            if info.world > 1:
                dist.all_reduce(total)
            # losses stay on the device until a step that logs, validates or saves reads them all:
            # reading one every step would make the host wait for the GPU every step
            unread.append(total)
            record: dict[str, Any] = {"step": step, "loss": None, "lr": sched.get_last_lr()[0]}  # loss: below
            records.append(record)
            if step % cfg.log_every == 0 or step % cfg.val_every == 0 or step in (stop, cfg.steps):
                for r, value in zip(records, torch.stack(unread).tolist(), strict=True):
                    if not math.isfinite(value):
                        raise ClipesError(f"loss became {value} at step {r['step']}; lower --lr")
                    r["loss"] = loss_value = value
                unread.clear()
                records.clear()
                progress.update(task, loss=f"{loss_value:.4f}")
            if val_set is not None and (step % cfg.val_every == 0 or step == cfg.steps) and info.is_main:
                miou = validate(_unwrap(model), val_set, num_classes, device, spec.stride, cfg.bf16)
                record["val_miou"] = miou
                progress.update(task, miou=f"{100 * miou:.1f}")
                if miou > best:
                    best = miou
                    _save(out / "best.pt", model, opt, sched, step, best, cfg, class_set.classes)
            if info.is_main:
                history.append(record)
                if step % cfg.log_every == 0 or "val_miou" in record or step == stop:
                    with log_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                if step % cfg.val_every == 0 or step == stop:
                    _save(last, model, opt, sched, step, best, cfg, class_set.classes)
            progress.update(task, advance=1)
    if info.world > 1:
        dist.barrier()
    return {"step": step, "loss": loss_value, "best_miou": best if best > float("-inf") else None,
            "history": history}
