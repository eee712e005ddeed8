"""``clipes label`` as a function: a folder of images in, pseudo masks out, resumable."""

from __future__ import annotations

import multiprocessing
import os
import platform
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from .crf import crf_labels, require_pydensecrf
from .data import ImageFolderDataset, Sample, collate_samples, probe_input_size, size_batches
from .datasets import load_split
from .distributed import DistInfo, gather_to_rank0, process_group
from .errors import ClipesError
from .images import find_images
from .labeler import Labeler, LabelResult, PreparedImage
from .labels import read_labels
from .model import cpu_has_fast_bf16, load_clip, resolve_device
from .output import RunOutput, check_outside
from .prompts import load_class_set

__all__ = ["LabelConfig", "RunSummary", "label_folder"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LabelConfig:
    """Options of a labelling run (the CLI flags of ``clipes label``).

    ``batch_size`` None is automatic: 32 on a GPU, 4 on the CPU, halved on out-of-memory.
    ``workers`` None is automatic: up to 8 DataLoader processes per GPU, 1 on the CPU (see
    ``decode_workers``). ``crf_workers`` 0 is automatic: a process pool on the CPU cores that the
    DataLoader and the main process leave, when at least two are left; else the CRF runs in the
    main process.
    """

    images: Path | None
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
    batch_size: int | None = None
    workers: int | None = None
    crf: bool = False
    confidence: float | None = None
    crf_workers: int = 0
    dataset: str | None = None
    split: str = "train"
    per_pair_backward: bool = False


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


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]labelling"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn(), console=console,
                    disable=not enabled)


class _BatchSizer:
    """Runs the engine on a batch, halving the batch size for good after an out-of-memory error."""

    def __init__(self, labeler: Labeler, batch_size: int) -> None:
        self.labeler = labeler
        self.batch_size = batch_size

    def __call__(self, prepared: list[PreparedImage]) -> list[LabelResult | str]:
        """Results in order; for an image that does not fit even alone, the reason as a string."""
        out: list[LabelResult | str] = []
        start = 0
        while start < len(prepared):
            chunk = prepared[start:start + self.batch_size]
            try:
                out += self.labeler.label_prepared(chunk)
            except torch.OutOfMemoryError:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if len(chunk) == 1:
                    h, w = chunk[0].tensor.shape[-2:]
                    out.append(f"out of memory at input size {h}x{w}; lower --max-side")
                    start += 1
                else:
                    self.batch_size = max(1, len(chunk) // 2)
                continue
            start += len(chunk)
        return out


def _crf_then_write(out: RunOutput, crf: Future, stem: str, result: LabelResult, class_names: tuple[str, ...],
                    image: Image.Image | None, file: str | None) -> None:
    mask, confidence = crf.result()
    out.write(stem, replace(result, mask=mask, confidence=confidence), class_names, image, file)


def _run_batches(loader: DataLoader, sizer: _BatchSizer, out: RunOutput, class_names: tuple[str, ...],
                 summary: RunSummary, progress: Progress, flush, crf=None) -> None:
    """Engine on the main thread, decoding in DataLoader workers, writing on background threads.

    ``crf(rgb, result)``, when given, returns a future of (mask, confidence) computed in a process
    pool; the writer waits for it, so the dense CRF never holds up the network.
    """
    task = progress.add_task("label", total=len(loader.dataset), rate="-")
    start, done, last_flush = time.perf_counter(), 0, time.perf_counter()
    # progress is saved every 10 s, or less often once labels.json is large (about 1 s for COCO's
    # 118k images): at most 2% of the time goes to it
    flush_every = 10.0
    pending: list[Future] = []
    # PIL lets go of the GIL while it compresses, so a few threads write PNGs in parallel
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="clipes-writer") as writer:
        for batch in loader:
            batch: list[Sample]
            good = [s for s in batch if s.prepared is not None]
            for s in batch:
                if s.error is not None:
                    summary.failed.append((s.path, s.error))
                    progress.console.print(f"[yellow]skipped[/] {escape(s.error)}", highlight=False)
            for s, res in zip(good, sizer([s.prepared for s in good]), strict=True):
                if isinstance(res, str):
                    summary.failed.append((s.path, f"{s.path}: {res}"))
                    continue
                image = None if s.prepared.rgb is None or not out.overlays else Image.fromarray(s.prepared.rgb)
                if crf is None:
                    pending.append(writer.submit(out.write, s.stem, res, class_names, image, s.file))
                else:
                    pending.append(writer.submit(_crf_then_write, out, crf(s.prepared.rgb, res), s.stem, res,
                                                 class_names, image, s.file))
                summary.labelled += 1
            while len(pending) > 4 * max(1, len(batch)):  # bound memory held by queued writes
                pending.pop(0).result()
            done += len(batch)
            progress.update(task, advance=len(batch), rate=f"{done / max(time.perf_counter() - start, 1e-9):.2f}")
            if time.perf_counter() - last_flush > flush_every:
                for f in pending:
                    f.result()
                pending.clear()
                began = time.perf_counter()
                flush()
                last_flush = time.perf_counter()
                flush_every = max(10.0, 50 * (last_flush - began))
        for f in pending:
            f.result()


def decode_workers(requested: int | None, device: torch.device, world: int = 1) -> int:
    """DataLoader processes: as requested, else up to 8 per GPU process, 1 on the CPU.

    Decoding and resizing take about 10 ms an image on one core, so two workers would hold a GPU
    to some 200 images/s; on the CPU the engine needs the cores and takes a second an image.
    """
    if requested is not None:
        return requested
    if device.type != "cuda":
        return 1
    return max(1, min(8, (os.cpu_count() or 1) // world - 1))


@contextmanager
def _crf_pool(cfg: LabelConfig, decoders: int) -> Iterator[ProcessPoolExecutor | None]:
    """Processes for the dense CRF (CPU-bound, one image each), or None without ``--crf``."""
    workers = cfg.crf_workers or (os.cpu_count() or 1) - decoders - 1
    if not cfg.crf or workers < (1 if cfg.crf_workers else 2):
        yield None  # no CRF, or too few spare cores for a pool to pay off: the engine runs it in-process
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def _label_todo(cfg: LabelConfig, console: Console, todo, class_set, dtype_name: str, device: torch.device,
                dist_info: DistInfo, out: RunOutput, manifest: dict, summary: RunSummary) -> None:
    """Load the model and run the batched engine over ``todo``, the CRF in a process pool if it pays."""
    clip = load_clip(cfg.model, device=device)
    manifest["model"] = {"spec": clip.spec, "arch": clip.arch}
    batch_size = cfg.batch_size or (32 if device.type == "cuda" else 4)
    decoders = decode_workers(cfg.workers, device, dist_info.world)
    sizes = [probe_input_size(p, clip.patch_size, cfg.max_side, cfg.exif_transpose) for _, p, _ in todo]
    dataset = ImageFolderDataset(todo, clip.patch_size, cfg.max_side, cfg.exif_transpose,
                                 keep_image=cfg.overlays or cfg.crf, root=cfg.images.resolve())
    loader = DataLoader(dataset, batch_sampler=size_batches(sizes, batch_size), collate_fn=collate_samples,
                        num_workers=decoders, pin_memory=device.type == "cuda")
    with _crf_pool(cfg, decoders) as pool, _progress(console, dist_info.is_main) as progress:
        labeler = Labeler(clip, class_set, bg_power=cfg.bg_power, box_threshold=cfg.box_threshold,
                          zero_shot_threshold=cfg.zero_shot_threshold, max_side=cfg.max_side,
                          per_pair_backward=cfg.per_pair_backward, crf=cfg.crf and pool is None,
                          confidence=cfg.confidence if pool is None else None,
                          autocast=None if dtype_name == "float32" else DTYPES[dtype_name])

        def crf(rgb, result: LabelResult) -> Future:
            return pool.submit(crf_labels, rgb, result.cam_refined, result.labels, cfg.bg_power, cfg.confidence)

        _run_batches(loader, _BatchSizer(labeler, batch_size), out, class_set.classes, summary, progress,
                     lambda: out.flush(manifest), None if pool is None else crf)


def label_folder(cfg: LabelConfig, console: Console | None = None) -> RunSummary:
    """Label every image of ``cfg.images`` into ``cfg.out``; images already done are skipped.

    Under ``torchrun`` each rank takes every world-th image and rank 0 merges the records, so the
    output folder is the same as one process would write.
    """
    console = console or Console(stderr=True)
    if cfg.images is None:
        raise ClipesError("give a folder of images, or --dataset voc|coco with its root folder")
    if cfg.dataset:
        if cfg.classes not in ("voc", cfg.dataset):
            raise ClipesError(f"--dataset {cfg.dataset} comes with its own class set; drop --classes {cfg.classes}")
        split = load_split(cfg.dataset, cfg.images, cfg.split)
        items, class_set = split.items, split.class_set
        given = read_labels(cfg.labels, class_set) if cfg.labels else split.labels
    else:
        items = find_images(cfg.images)
        class_set = load_class_set(cfg.classes)
        given = read_labels(cfg.labels, class_set) if cfg.labels else None
    check_outside(cfg.images, cfg.out)
    dtype_name = cfg.dtype or "float32"
    if cfg.confidence is not None and not cfg.crf:
        raise ClipesError("--confidence needs --crf (it thresholds the CRF's probabilities)")
    if cfg.crf:
        require_pydensecrf()
    if dtype_name not in DTYPES:
        raise ClipesError(f"--dtype {dtype_name!r}: choose one of {', '.join(DTYPES)}")
    device = resolve_device(cfg.device)
    if device.type == "cpu" and dtype_name != "float32" and cpu_has_fast_bf16() is False:
        console.print(f"[yellow]warning:[/] this CPU has no low-precision matrix units (AMX / AVX512-BF16): "
                      f"--dtype {dtype_name} will run far slower than float32 here")
    with process_group(device) as (device, dist_info):
        return _label_folder(cfg, console, items, class_set, given, dtype_name, device, dist_info)


def _label_folder(cfg: LabelConfig, console: Console, items, class_set, given, dtype_name: str,
                  device: torch.device, dist_info: DistInfo) -> RunSummary:
    labels_source = str(cfg.labels) if cfg.labels else (f"{cfg.dataset}/{cfg.split}" if cfg.dataset else None)
    settings = {"model": cfg.model or "default", "classes": class_set.to_dict(), "labels": labels_source,
                "dtype": dtype_name, "bg_power": cfg.bg_power, "zero_shot_threshold": cfg.zero_shot_threshold,
                "box_threshold": cfg.box_threshold if cfg.box_threshold is not None else class_set.box_threshold,
                "max_side": cfg.max_side, "exif_transpose": cfg.exif_transpose, "crf": cfg.crf,
                "confidence": cfg.confidence}
    out = RunOutput(cfg.out, settings, save_cams=cfg.save_cams, overlays=cfg.overlays, overwrite=cfg.overwrite,
                    rank=dist_info.rank, world=dist_info.world)
    summary = RunSummary()
    todo = []
    for stem, path in items:
        if out.is_done(stem):
            summary.skipped += 1
        elif given is not None and _lookup(given, stem) is None:
            summary.unlabelled.append(stem)
        else:
            todo.append((stem, path, None if given is None else _lookup(given, stem)))
    todo = todo[dist_info.rank::dist_info.world]
    manifest = {"tool": "clipes label", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "input": str(cfg.images.resolve()), "options": {k: str(v) if isinstance(v, Path) else v
                                                               for k, v in asdict(cfg).items()},
                "versions": _versions(), "device": str(device), "world_size": dist_info.world}

    start = time.perf_counter()
    try:
        if todo:
            _label_todo(cfg, console, todo, class_set, dtype_name, device, dist_info, out, manifest, summary)
    finally:
        summary.seconds = time.perf_counter() - start
        out.flush(manifest)
        parts = gather_to_rank0((out.labels, summary), dist_info)
        if parts is not None:
            total = RunSummary(seconds=max(p[1].seconds for p in parts), unlabelled=summary.unlabelled,
                               skipped=summary.skipped)
            for _, part in parts:
                total.labelled += part.labelled
                total.failed += part.failed
            manifest["summary"] = {"labelled": total.labelled, "skipped": total.skipped,
                                   "failed": total.failed, "unlabelled": total.unlabelled}
            out.finalize([p[0] for p in parts], manifest)
            summary = total
    return summary
