"""The folder of a train-seg run: refusing to start over an earlier run unless asked, claiming it, and
checking that a checkpoint continues this run (--resume) with its log cut back to the checkpoint."""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..distributed import DistInfo
from ..errors import ClipesError
from ..output import atomic_write, check_not_inputs, check_writable, folder_lock, named_file
from .config import TrainConfig

__all__ = ["RUN_FILES", "check_resumable", "check_run_folder", "claim_run_folder", "resumed_log", "settings_changed"]

RUN_FILES = ("last.pt", "best.pt", "log.jsonl", "config.yaml")


def check_run_folder(out: Path, cfg: TrainConfig, config_file: Path | None) -> None:
    """Refuse to restart over an earlier run unless asked (--resume continues it, --overwrite replaces it),
    an --out that is or holds an input, and one that cannot be written; writes nothing."""
    conf = Path(cfg.confidence) / "cams" if cfg.confidence else None
    check_not_inputs({"--out": out}, {"--config": config_file, "--images": cfg.images, "--masks": cfg.masks,
                                      "--val-images": cfg.val_images, "--val-masks": cfg.val_masks,
                                      "--confidence": conf, "--root": cfg.root, "--classes": named_file(cfg.classes),
                                      "--clip-model": named_file(cfg.clip_model),
                                      "--backbone-weights": named_file(cfg.backbone_weights)})
    check_writable(out)  # a file, a file above it or a read-only place
    found = [name for name in RUN_FILES if (out / name).exists()]
    if cfg.resume:
        if not (out / "last.pt").is_file():
            raise ClipesError(f"--resume: {out / 'last.pt'} not found, nothing to continue; drop --resume to start "
                              "a new run")
    elif found and not cfg.overwrite:
        raise ClipesError(f"--out {out} already holds a training run ({', '.join(found)}); use --resume to continue "
                          "it, --overwrite to replace it, or another --out")


def claim_run_folder(out: Path, cfg: TrainConfig, info: DistInfo, held: ExitStack) -> None:
    """Once the inputs and the model have checked out: rank 0 locks the folder for the rest of the run
    (``held``; one run writes into it at a time) and, for --overwrite, removes the earlier run's files."""
    if info.is_main:
        held.enter_context(folder_lock(out))
    if info.world > 1:
        dist.barrier()  # every rank has looked before rank 0 removes or writes anything
    if cfg.overwrite and info.is_main:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)


# settings a resumed run takes up as given: where it writes, how it runs, when it stops, logs and validates
_RESUME_FREE = {"out", "resume", "allow_changes", "overwrite", "stop_at", "workers", "device", "log_every",
                "val_every", "val_images", "val_masks", "val_split"}


def _same_setting(a: Any, b: Any) -> bool:
    """Equal, or two spellings of one existing path."""
    if a == b:
        return True
    return isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(b).exists() and \
        os.path.samefile(a, b)


def settings_changed(ckpt: dict[str, Any], cfg: TrainConfig) -> dict[str, list[Any]]:
    """The settings that shape the weights and differ from the checkpoint's run: name -> [then, now]."""
    now = asdict(cfg)
    return {k: [v, now[k]] for k, v in ckpt["config"].items()
            if k in now and k not in _RESUME_FREE and not _same_setting(v, now[k])}


def check_resumable(ckpt: dict[str, Any], path: Path, cfg: TrainConfig, classes: list[str]) -> None:
    """The checkpoint continues this run: same model and class set, and the same settings unless
    ``allow_changes``."""
    if ckpt["config"].get("model") != cfg.model:
        raise ClipesError(f"--resume: {path} is a {ckpt['config'].get('model')} run, not --model {cfg.model}")
    if list(ckpt["classes"]) != list(classes):
        raise ClipesError(f"--resume: {path} was trained on another class set ({len(ckpt['classes'])} classes: "
                          f"{', '.join(ckpt['classes'][:4])}{' ...' if len(ckpt['classes']) > 4 else ''}) than "
                          f"--classes {cfg.classes} ({len(classes)} classes)")
    for key in ("optimizer", "scheduler", "step", "best_miou"):
        if key not in ckpt:
            raise ClipesError(f"--resume: {path} holds no {key}, it is not a last.pt of train-seg")
    changed = settings_changed(ckpt, cfg)
    if changed and not cfg.allow_changes:
        said = ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in changed.items())
        raise ClipesError(f"--resume: {path} was trained with other settings ({said}); give the run's settings, or "
                          "--allow-changes to continue with these (log.jsonl records the change)")


def resumed_log(path: Path, step: int) -> float:
    """Cut ``log.jsonl`` back to the checkpoint's ``step`` (a killed run logged steps that it did not save and
    the resumed run redoes); returns the last loss logged by then (NaN if none)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return float("nan")
    except (OSError, UnicodeDecodeError) as e:
        raise ClipesError(f"--resume: cannot read {path} ({e})") from None
    kept, loss = [], float("nan")
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            kept.append(line + "\n")
            loss = rec["loss"] if isinstance(rec.get("loss"), float) else loss
    atomic_write(path, "".join(kept).encode())
    return loss
