"""``clipes label`` as a function: a folder of images in, pseudo masks out, resumable."""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .errors import ClipesError
from .images import IMAGE_SUFFIXES, ImageError, read_image
from .labeler import Labeler
from .labels import read_labels
from .model import load_clip, resolve_device
from .output import RunOutput
from .prompts import load_class_set

__all__ = ["LabelConfig", "RunSummary", "find_images", "label_folder"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LabelConfig:
    """Options of a labelling run (the CLI flags of ``clipes label``)."""

    images: Path
    out: Path
    classes: str = "voc"
    labels: Path | None = None
    model: str | None = None
    device: str = "auto"
    dtype: str | None = None
    bg_power: float = 1.0
    box_threshold: float | None = None
    zero_shot_threshold: float = 0.1
    max_side: int | None = 1024
    exif_transpose: bool = True
    save_cams: bool = False
    overlays: bool = False
    overwrite: bool = False


@dataclass
class RunSummary:
    """What a run did: counts, the files it could not use (with why) and the time taken."""

    labelled: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    unlabelled: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.labelled / self.seconds if self.seconds > 0 else 0.0


def find_images(folder: Path) -> list[tuple[str, Path]]:
    """Images under ``folder`` (recursively, sorted) as (stem relative to the folder, path)."""
    if not folder.exists():
        raise ClipesError(f"input folder {folder} does not exist")
    if not folder.is_dir():
        raise ClipesError(f"input {folder} is not a folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file() or path.name.startswith("."):
            continue
        stem = path.relative_to(folder).with_suffix("").as_posix()
        if stem in found:
            raise ClipesError(f"{found[stem]} and {path} would both write masks/{stem}.png; rename one")
        found[stem] = path
    if not found:
        raise ClipesError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {folder}")
    return list(found.items())


def _check_out(images: Path, out: Path) -> None:
    src, dst = images.resolve(), out.resolve()
    if dst == src or src in dst.parents:
        raise ClipesError(f"--out {out} is inside the input folder {images}; clipes never writes there")


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("clipes", "torch", "open_clip_torch", "numpy", "pillow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _lookup(labels: dict[str, list[int]], stem: str) -> list[int] | None:
    """Labels of an image keyed by its relative stem or its bare file stem."""
    if stem in labels:
        return labels[stem]
    return labels.get(stem.rsplit("/", 1)[-1])


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]labelling"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn(), console=console)


def _iterate(todo: list[tuple[str, Path]], progress: Progress) -> Iterator[tuple[str, Path]]:
    task = progress.add_task("label", total=len(todo), rate="-")
    start = time.perf_counter()
    for done, item in enumerate(todo, 1):
        yield item
        progress.update(task, advance=1, rate=f"{done / max(time.perf_counter() - start, 1e-9):.2f}")


def label_folder(cfg: LabelConfig, console: Console | None = None) -> RunSummary:
    """Label every image of ``cfg.images`` into ``cfg.out``; images already done are skipped."""
    console = console or Console(stderr=True)
    items = find_images(cfg.images)
    _check_out(cfg.images, cfg.out)
    class_set = load_class_set(cfg.classes)
    given = read_labels(cfg.labels, class_set) if cfg.labels else None
    device = resolve_device(cfg.device)
    dtype_name = cfg.dtype or "float32"
    if dtype_name not in DTYPES:
        raise ClipesError(f"--dtype {dtype_name!r}: choose one of {', '.join(DTYPES)}")

    settings = {"model": cfg.model or "default", "classes": class_set.to_dict(), "labels": str(cfg.labels),
                "dtype": dtype_name, "bg_power": cfg.bg_power, "zero_shot_threshold": cfg.zero_shot_threshold,
                "box_threshold": cfg.box_threshold if cfg.box_threshold is not None else class_set.box_threshold,
                "max_side": cfg.max_side, "exif_transpose": cfg.exif_transpose}
    out = RunOutput(cfg.out, settings, save_cams=cfg.save_cams, overlays=cfg.overlays, overwrite=cfg.overwrite)
    summary = RunSummary()
    todo = []
    for stem, path in items:
        if out.is_done(stem):
            summary.skipped += 1
        elif given is not None and _lookup(given, stem) is None:
            summary.unlabelled.append(stem)
        else:
            todo.append((stem, path))
    manifest = {"tool": "clipes label", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "input": str(cfg.images.resolve()), "options": {k: str(v) if isinstance(v, Path) else v
                                                               for k, v in asdict(cfg).items()},
                "versions": _versions(), "device": str(device)}
    if not todo:
        out.flush(manifest)
        return summary

    clip = load_clip(cfg.model, device=device, dtype=DTYPES[dtype_name])
    manifest["model"] = {"spec": clip.spec, "arch": clip.arch}
    labeler = Labeler(clip, class_set, bg_power=cfg.bg_power, box_threshold=cfg.box_threshold,
                      zero_shot_threshold=cfg.zero_shot_threshold, max_side=cfg.max_side)
    start = time.perf_counter()
    last_flush = start
    try:
        with _progress(console) as progress:
            for stem, path in _iterate(todo, progress):
                try:
                    image = read_image(path, cfg.exif_transpose)
                except ImageError as e:
                    summary.failed.append((str(path), str(e)))
                    progress.console.print(f"[yellow]skipped[/] {e}")
                    continue
                labels = None if given is None else _lookup(given, stem)
                result = labeler.label(image, labels)
                out.write(stem, result, class_set.classes, image if cfg.overlays else None)
                summary.labelled += 1
                if time.perf_counter() - last_flush > 10:
                    out.flush(manifest)
                    last_flush = time.perf_counter()
    finally:
        summary.seconds = time.perf_counter() - start
        manifest["summary"] = {"labelled": summary.labelled, "skipped": summary.skipped,
                               "failed": summary.failed, "unlabelled": summary.unlabelled}
        out.flush(manifest)
    return summary
