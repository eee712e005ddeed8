"""The batched labelling pipeline: decoding in DataLoader workers, the engine on the main thread, writing on
background threads, a host refiner (the dense CRF) in a process pool."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from functools import partial

import torch
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from .batching import HalvingBatches
from .data import Sample
from .distributed import DistInfo
from .label_plan import Item, RunSummary
from .labeler import Labeler, LabelResult, PreparedImage
from .output import RunOutput
from .refiners import HostRefiner, Refiner

__all__ = ["batch_sizer", "crf_pool", "decode_workers", "progress_bar", "progress_label", "run_batches"]


def progress_label(dist_info: DistInfo) -> str:
    """The name of a rank's progress bar: under torchrun each rank counts its own share, and says so."""
    return "labelling" if dist_info.world == 1 else f"labelling, rank {dist_info.rank} of {dist_info.world}"


def progress_bar(console: Console, dist_info: DistInfo) -> Progress:
    return Progress(TextColumn(f"[bold]{progress_label(dist_info)}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn(), console=console)


def batch_sizer(labeler: Labeler, batch_size: int) -> HalvingBatches[PreparedImage, LabelResult]:
    """The engine over a batch, halved for good on out-of-memory; an image too large alone is skipped."""
    return HalvingBatches(partial(labeler.label_prepared, skip_unusable=True), batch_size,
                          lambda p: tuple(p.tensor.shape[-2:]))


def _write_one(out: RunOutput, item: Item, result: LabelResult | Future, class_names: tuple[str, ...],
           image: Image.Image | None, crf: Future | None = None) -> None:
    if crf is not None:
        mask, confidence = crf.result()
        result = replace(result, mask=mask, confidence=confidence)
    out.write(item.stem, result, class_names, item.stamp, item.given, image)


def run_batches(loader: DataLoader, items: dict[str, Item], sizer: HalvingBatches, out: RunOutput,
                 class_names: tuple[str, ...], summary: RunSummary, progress: Progress, flush, crf=None) -> None:
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
                pending.append(writer.submit(_write_one, out, items[s.stem], res, class_names, image,
                                             None if crf is None else crf(s.prepared.rgb, res)))
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
def crf_pool(refiner: Refiner | None, crf_workers: int, decoders: int) -> Iterator[ProcessPoolExecutor | None]:
    """Processes for a host refiner such as the dense CRF (CPU-bound, one image each), else None."""
    workers = crf_workers or (os.cpu_count() or 1) - decoders - 1
    if not isinstance(refiner, HostRefiner) or workers < (1 if crf_workers else 2):
        yield None  # none, on the device, or too few spare cores for a pool to pay off: the engine runs it
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool
