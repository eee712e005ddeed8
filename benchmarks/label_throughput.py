"""Labelling throughput: the reference-style loop against the batched engine, side by side.

    python benchmarks/label_throughput.py                        # CPU, fp32, random ViT-B/16
    python benchmarks/label_throughput.py --device cuda --dtype bfloat16 --images 512
    python benchmarks/label_throughput.py --model ../shared/golden/tiny-clip-vit-b16-random.pt

Both modes run the same engine in memory (CAM + CAA + mask; no CRF, no disk) in ``--dtype`` (``auto``:
what ``clipes label`` takes by default), and the trunk alone (blocks 1-11 with the CAA maps) is timed
after, on the same batches, for its share of the whole. ``reference`` labels
one image at a time with one backward pass per class, as the authors' code does; ``batched``
groups images and backpropagates all their classes at once. Each mode runs in its own process so
that peak memory is its own. Images are VOC-sized (513 x 513 by default) with 1.37 classes per
image on average; they are the golden photos when available, else noise. Prints a table and
writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, profile

from _common import GOLDEN, hardware, parser, run_modes


def _images(n: int, size: int, seed: int = 0) -> tuple[list[Image.Image], list[list[int]]]:
    rng = np.random.default_rng(seed)
    photos = sorted((GOLDEN / "images").glob("*.png")) if (GOLDEN / "images").is_dir() else []
    images, labels = [], []
    for i in range(n):
        if photos:
            img = Image.open(photos[i % len(photos)]).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        else:
            img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        images.append(img)
        k = 2 if rng.random() < 0.37 else 1
        labels.append([int(c) for c in rng.choice(20, size=k, replace=False)])
    return images, labels


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _profile(step, device: torch.device, rows: int = 15) -> str:
    """The busiest operators of one more batch, by device time on a GPU, by CPU time otherwise."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def run_mode(args: argparse.Namespace) -> dict:
    from clipes import Labeler, load_class_set, load_clip
    from clipes.precision import resolve_dtype
    from clipes.vit import encode_trunk

    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    clip = load_clip(args.model, device=device, dtype=dtype.dtype)
    reference = args.mode == "reference"
    labeler = Labeler(clip, load_class_set("voc"), per_pair_backward=reference)
    images, labels = _images(args.images + args.warmup, args.size)
    prepared = [labeler.prepare(img, lab) for img, lab in zip(images, labels, strict=True)]
    batch = 1 if reference else args.batch_size

    def run(items) -> None:
        for i in range(0, len(items), batch):
            labeler.label_prepared(items[i:i + batch])
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def trunk(items) -> None:  # blocks 1-11 with the CAA maps, as the Labeler runs them
        low = torch.autocast(device.type, dtype=clip.dtype, enabled=clip.dtype != torch.float32)
        for i in range(0, len(items), batch):
            with torch.no_grad(), low:
                encode_trunk(clip.visual, torch.stack([p.tensor for p in items[i:i + batch]]).to(device, clip.dtype))
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run(prepared[: args.warmup])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    run(prepared[args.warmup:])
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    trunk(prepared[args.warmup:])
    trunk_seconds = time.perf_counter() - start
    profile = _profile(lambda: run(prepared[args.warmup:args.warmup + batch]), device) if args.profile else None
    return {"mode": args.mode, "images": args.images, "batch_size": batch, "seconds": seconds, "profile": profile,
            "dtype": dtype.name, "trunk_seconds": trunk_seconds, "trunk_share": trunk_seconds / seconds,
            "images_per_second": args.images / seconds, "peak_memory_mib": _peak_bytes(device) / 2**20,
            "classes_per_image": float(np.mean([len(lab) for lab in labels[args.warmup:]]))}


def main() -> None:
    ap = parser(__doc__, dtypes=("auto", "float32", "bfloat16", "float16"))
    ap.add_argument("--images", type=int, default=8, help="timed images per mode")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--size", type=int, default=513)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--modes", default="reference,batched")
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", help="also print the busiest operators of one batch")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.mode:  # child process: one mode, JSON on stdout
        print(json.dumps(run_mode(args)))
        return

    rows = run_modes(__file__, args.modes.split(","), args.json)
    gpu = hardware(args.device)
    result = {"model": args.model, "device": args.device, "hardware": gpu, "dtype": args.dtype,
              "size": args.size, "threads": torch.get_num_threads(), "results": rows}
    base = rows[0]["images_per_second"]
    table = Table(title=f"clipes label throughput: {args.model}, {args.dtype}, {args.size}x{args.size}, {gpu}")
    for col in ("mode", "dtype", "batch", "images", "img/s", "speed-up", "trunk share", "peak MiB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["mode"], r["dtype"], str(r["batch_size"]), str(r["images"]), f"{r['images_per_second']:.3f}",
                      f"{r['images_per_second'] / base:.2f}x", f"{100 * r['trunk_share']:.0f}%",
                      f"{r['peak_memory_mib']:.0f}")
    Console().print(table)
    for r in rows:
        if r["profile"]:
            print(f"\n{r['mode']}: one batch, busiest operators\n{r['profile']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
