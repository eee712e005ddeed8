"""``clipes train-seg``: fit a segmenter on pseudo masks with the confidence-guided loss (CGL).

Cross-entropy with 255 ignored (CLIP-ES's CGL), optionally weighted per pixel by the saved CRF
confidence. Single process, CPU or GPU, or one process per GPU under ``torchrun`` (DDP).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, nullcontext
from dataclasses import asdict
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

from ..batching import is_out_of_memory
from ..distributed import DistInfo, process_group
from ..errors import ClipesError
from ..evaluate import confusion, scores
from ..masks import class_argmax
from ..model import DEFAULT_MODEL, MODEL_ENV, resolve_device
from ..output import atomic_write
from ..prompts import load_class_set
from .augment import MmsegAugment
from .checkpoint import read_checkpoint, vision_spec, write_checkpoint
from .config import PRESETS, TrainConfig, load_config
from .data import PositionSampler, SegDataset, SegItem, check_training_data, pair_folders
from .deeplabv2 import msc_loss
from .losses import cgl_loss, loss_norm, segmentation_loss
from .optim import build_optimizer, poly_schedule
from .registry import SEGMENTERS, build_segmenter
from .run_folder import check_resumable, check_run_folder, claim_run_folder, resumed_log, settings_changed

__all__ = ["PRESETS", "TrainConfig", "cgl_loss", "load_checkpoint", "load_config", "segmentation_loss", "train"]


def mmseg_settings(cfg: TrainConfig) -> MmsegAugment | None:
    """SETR's training pipeline from the run's settings (``augment: mmseg``), else None (clipes' own)."""
    if cfg.augment != "mmseg":
        return None
    return MmsegAugment(base=cfg.base_size, ratio_range=(cfg.scale_min, cfg.scale_max), crop=cfg.crop,
                        cat_max_ratio=cfg.cat_max_ratio or 1.0, photometric=bool(cfg.photometric))


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


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _arch(model: nn.Module, cfg: TrainConfig, num_classes: int) -> dict[str, Any]:
    """What rebuilds the model without any file but the checkpoint: its name, class count, CLIP layout."""
    visual = getattr(getattr(model, "encoder", None), "visual", None)
    return {"model": cfg.model, "num_classes": num_classes,
            "clip_vision": vision_spec(visual) if visual is not None else None}


def _save(path: Path, model: nn.Module, opt, sched, step: int, best: float, cfg: TrainConfig, classes,
          arch: dict[str, Any]) -> None:
    write_checkpoint(path, {"model": _unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "step": step, "best_miou": best, "config": asdict(cfg),
                            "classes": list(classes), "arch": arch})


def load_checkpoint(path: str | Path) -> dict:
    """A train-seg checkpoint, checked (see ``clipes.segment.checkpoint.read_checkpoint``)."""
    return read_checkpoint(path)


_WORKER_TRACE = re.compile(r"^[\w.]+(?:Error|Exception): (.*)$", re.MULTILINE)


def _clear_errors(batches: Iterable) -> Iterator:
    """The loader's batches; a ``ClipesError`` raised in a DataLoader worker comes back as its own one-line
    message instead of the worker's text traceback that PyTorch puts in the re-raised message."""
    it = iter(batches)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except ClipesError as e:
            found = _WORKER_TRACE.findall(str(e))
            if found:
                raise ClipesError(found[-1]) from None
            raise
        yield batch


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


def train(cfg: TrainConfig, console: Console | None = None, config_file: Path | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns the final step, loss and best validation mIoU. ``config_file``:
    the YAML the settings came from, if any (never written over)."""
    console = console or Console(stderr=True)
    cfg = cfg.resolved()
    if cfg.model.startswith("clip") and cfg.clip_model is None:  # record what was used, for `clipes segment`
        cfg.clip_model = os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    device = resolve_device(cfg.device)
    with process_group(device) as (device, info), ExitStack() as held:
        try:
            return _train(cfg, console, device, info, held, config_file)
        except (RuntimeError, MemoryError) as e:
            if not is_out_of_memory(e):
                raise
            raise ClipesError(_out_of_memory(cfg, device)) from None


def _not_finite(value: float, step: int, cfg: TrainConfig) -> str:
    """What to do when the loss diverges: a lower --lr, or the class-balanced loss (AdvCAM's), which a
    reproduction of CLIP-ES's DeepLab-v2 from the ImageNet init needed at lr 2e-4."""
    fix = "lower --lr" if cfg.loss == "balanced-ce" else (
        "lower --lr, or train with --loss balanced-ce (AdvCAM's class-balanced cross-entropy: a reproduction of "
        "DeepLab-v2 from the ImageNet init needed it at lr 2e-4)")
    return f"loss became {value} at step {step} (--lr {cfg.lr:g}, --loss {cfg.loss}); {fix}"


def _out_of_memory(cfg: TrainConfig, device: torch.device) -> str:
    """What to do when a step does not fit: the batch in more parts (same result), else a smaller crop."""
    where = "GPU" if device.type == "cuda" else "host"
    part = cfg.batch_size // cfg.accumulate
    fix = (f"use --accumulate {2 * cfg.accumulate} (the same --batch-size {cfg.batch_size} in parts of "
           f"{part // 2}: the same result in about half the memory)") if part % 2 == 0 else \
        (f"use --batch-size {cfg.accumulate * (part // 2)}" if part > 1 else f"use a --crop below {cfg.crop}")
    return (f"out of {where} memory training {cfg.model} with --batch-size {cfg.batch_size} (--accumulate "
            f"{cfg.accumulate}: {part} image(s) a pass) at --crop {cfg.crop}; {fix}")


def _check_batch_norm(model: nn.Module, cfg: TrainConfig, per_step: int, synced: bool) -> None:
    """Refuse batches of one image where a training BatchNorm normalises a pooled 1x1 map (the image-pooling
    branch of DeepLabv3's ASPP): one value per channel has no batch statistics, and torch stops at the first
    step with "Expected more than 1 value per channel". SyncBatchNorm over several GPUs sees them all."""
    if per_step > 1 or synced:
        return
    model.train()
    for name, module in model.named_modules():
        children = list(module.children())
        pooled = any(isinstance(c, nn.AdaptiveAvgPool2d) and c.output_size in (1, (1, 1)) for c in children)
        if pooled and any(isinstance(c, nn.modules.batchnorm._BatchNorm) and c.training for c in children):
            raise ClipesError(f"--batch-size {cfg.batch_size}"
                              + (f" (--accumulate {cfg.accumulate})" if cfg.accumulate > 1 else "")
                              + f": {cfg.model} trains a BatchNorm on a pooled 1x1 map ({name}), which needs at "
                              "least 2 images a step; use --batch-size 2 or more")


def _train(cfg: TrainConfig, console: Console, device: torch.device, info: DistInfo, held: ExitStack,
           config_file: Path | None = None) -> dict[str, Any]:
    """``held`` keeps rank 0's lock on the run folder until training ends."""
    out = Path(cfg.out)
    class_set = load_class_set(cfg.classes)
    num_classes = len(class_set) + 1
    spec = SEGMENTERS[cfg.model]
    if cfg.batch_size % info.world or (cfg.batch_size // info.world) % cfg.accumulate:
        raise ClipesError(f"--batch-size {cfg.batch_size} does not split into {info.world} process(es) of "
                          f"--accumulate {cfg.accumulate} equal parts")
    items = _items(cfg, val=False)
    if not items:
        raise ClipesError("no training images: give --images and --masks, or --dataset with --root")
    unweighted = [it.stem for it in items if cfg.confidence and it.confidence is None]
    if unweighted:  # else those images would train unweighted, without a word
        raise ClipesError(f"--confidence {cfg.confidence}: {len(unweighted)} of {len(items)} training image(s) have "
                          f"no saved confidence (cams/<stem>.npz), e.g. {unweighted[0]}; give the clipes label run "
                          "of these images made with --crf --save-cams")
    val_items = _items(cfg, val=True)
    check_training_data(items, num_classes)
    check_run_folder(out, cfg, config_file)
    last = out / "last.pt"
    ckpt = load_checkpoint(last) if cfg.resume else None
    if ckpt is not None:
        check_resumable(ckpt, last, cfg, list(class_set.classes))

    _seed_everything(cfg.seed)
    model = build_segmenter(cfg.model, num_classes, clip_model=cfg.clip_model, freeze_backbone=cfg.freeze_backbone,
                            backbone_weights=cfg.backbone_weights, freeze_bn=cfg.freeze_bn).to(device)
    _check_batch_norm(model, cfg, cfg.batch_size // info.world // cfg.accumulate, info.world > 1 and
                      device.type == "cuda")
    report = getattr(model, "init_report", None)
    if report is not None and info.is_main:  # which keys of a deeplab-pytorch init file were used, which not
        console.print(escape(report.summary()), highlight=False)
    arch = _arch(model, cfg, num_classes)
    opt = build_optimizer(model, cfg)
    sched = poly_schedule(opt, cfg.steps, cfg.poly_power, cfg.min_lr or 0.0, cfg.poly_step or 1)
    start, best = 0, float("-inf")
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ClipesError(f"--resume: {last} does not fit this model or optimiser "
                              f"({' '.join(str(e).split())[:200]}); start a new run with another --out") from None
        start, best = int(ckpt["step"]), float(ckpt["best_miou"])
        if info.is_main:
            console.print(f"resumed from {escape(str(last))} at step {start}")
    claim_run_folder(out, cfg, info, held)
    if info.world > 1:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    msc = spec.recipe == "deeplab-pytorch"
    exif = not cfg.dataset  # a dataset's annotations are of the pixels as stored
    train_set = SegDataset(items, spec.mean, spec.std, train=True, crop=cfg.crop, scale=(cfg.scale_min, cfg.scale_max),
                           scales=cfg.scales, seed=cfg.seed, num_classes=num_classes, recipe=spec.recipe, exif=exif,
                           mmseg=mmseg_settings(cfg))
    stop = min(cfg.steps, cfg.stop_at or cfg.steps)
    sampler = PositionSampler(len(train_set), cfg.batch_size, stop, start, cfg.seed, info.rank, info.world)
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.workers, pin_memory=device.type == "cuda")
    val_set = SegDataset(val_items, spec.mean, spec.std, train=False, num_classes=num_classes, recipe=spec.recipe,
                         exif=exif) if val_items else None

    log_path = out / "log.jsonl"
    loss_value = float("nan")
    changed = settings_changed(ckpt, cfg) if ckpt is not None else {}
    note = {"changed": changed} if changed else {}
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False).encode())
        if ckpt is not None:
            loss_value = resumed_log(log_path, start)
    history: list[dict[str, Any]] = []
    model.train()
    columns = (TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TextColumn("val mIoU {task.fields[miou]}"),
               TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not info.is_main) as progress:
        task = progress.add_task("train", total=cfg.steps, completed=start, loss="-",
                                 miou="-" if best == float("-inf") else f"{100 * best:.1f}%")
        step = start
        unread: list[Tensor] = []
        records: list[dict[str, Any]] = []
        for x, labels, weights in _clear_errors(loader):
            x = x.to(device, non_blocking=True)
            if not msc:  # deeplab-pytorch's loss resizes the labels on the CPU, per output
                labels, weights = labels.to(device, non_blocking=True), weights.to(device, non_blocking=True)
                norm = loss_norm(labels, weights, cfg.loss_norm, info.world)  # DDP averages gradients over ranks
            opt.zero_grad(set_to_none=True)
            total = torch.zeros((), device=device)
            parts = list(zip(x.chunk(cfg.accumulate), labels.chunk(cfg.accumulate), weights.chunk(cfg.accumulate),
                             strict=True))
            for k, (xk, lk, wk) in enumerate(parts):  # gradient accumulation: the sum over parts is the batch loss
                sync = k == len(parts) - 1 or not isinstance(model, nn.parallel.DistributedDataParallel)
                with nullcontext() if sync else model.no_sync():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                        output = model(xk)
                    if msc:  # each part's mean over its own pixels, divided by the parts (main.py's iter_size)
                        loss = msc_loss(output, lk, wk, info.world, cfg.loss)[0] / len(parts)
                    elif cfg.loss == "balanced-ce":  # each part's balanced mean, averaged over the parts
                        loss = segmentation_loss(output, lk, wk, norm, cfg.loss) / len(parts)
                    else:
                        loss = segmentation_loss(output, lk, wk, norm)
                    loss.backward()
                total += loss.detach()
            opt.step()
            sched.step()
            step += 1
            total /= info.world
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
                        raise ClipesError(_not_finite(value, r["step"], cfg))
                    r["loss"] = loss_value = value
                unread.clear()
                records.clear()
                progress.update(task, loss=f"{loss_value:.4f}")
            if val_set is not None and (step % cfg.val_every == 0 or step == cfg.steps) and info.is_main:
                miou = validate(_unwrap(model), val_set, num_classes, device, spec.stride, cfg.bf16)
                record["val_miou"] = miou
                progress.update(task, miou=f"{100 * miou:.1f}%")
                if miou > best:
                    best = miou
                    _save(out / "best.pt", model, opt, sched, step, best, cfg, class_set.classes, arch)
            if info.is_main:
                history.append(record)
                if step % cfg.log_every == 0 or "val_miou" in record or step == stop:
                    with log_path.open("a") as f:  # the first line of a resumed part says what it changed
                        f.write(json.dumps({**record, **note}) + "\n")
                    note = {}
                if step % cfg.val_every == 0 or step == stop:
                    _save(last, model, opt, sched, step, best, cfg, class_set.classes, arch)
            progress.update(task, advance=1)
    if info.world > 1:
        dist.barrier()
    # the checkpoint to report: the last, as deeplab-pytorch reports its final weights; best.pt is chosen by the
    # validation mIoU, so its score on that same set is optimistic
    validated = best > float("-inf")
    return {"step": step, "loss": loss_value, "best_miou": best if validated else None, "checkpoint": str(last),
            "best_checkpoint": str(out / "best.pt") if validated else None, "history": history}
