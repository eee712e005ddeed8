"""What a CAM method costs: softmax-GradCAM against GETAM (from block 6 and from block 0) and the
forward-only dense methods (MaskCLIP, SCLIP, ClearCLIP, NACLIP), side by side.

    python benchmarks/cam_methods.py                                # CPU, fp32, random ViT-B/16, 513x513
    python benchmarks/cam_methods.py --device cuda --dtype bfloat16 --images 256 --batch-size 32

The batched engine in memory (trunk, CAM, CAA, mask; no CRF, no disk) on the same VOC-sized images
as ``label_throughput.py`` (1.37 classes an image), once per method, each in its own process so that
peak memory is its own: images/s, peak memory (the GPU's allocator on CUDA, the process's resident
set on the CPU, model included) and CPU seconds per image (user + system, all threads), with the
ratio to GradCAM beside each. GradCAM runs the last block with gradients; GETAM runs every block
from ``start`` on with gradients, once per (image, class) pair. A dense method runs its authors'
protocol on the same images and labels (the label-restricted masks; NACLIP with its PAMR), no
gradient; its query features are random unit vectors (``--real-queries`` embeds the 56 or 21 words
with 80 templates, minutes on a CPU): their values do not change the cost. Prints a table and writes
JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from label_throughput import _images, _peak_bytes
from rich.console import Console
from rich.table import Table

from _common import hardware, parser, run_modes


def _cpu_seconds() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def run_mode(args: argparse.Namespace) -> dict:
    import clipes.labeler
    from clipes import Labeler, load_class_set, load_clip
    from clipes.cams import DenseCam, make_cam
    from clipes.cams.dense_queries import Queries
    from clipes.precision import torch_dtype
    from clipes.refiners import PamrRefiner

    name, _, start = args.mode.partition(":")
    device = torch.device(args.device)
    clip = load_clip(args.model, device=device, dtype=torch_dtype(args.dtype))  # vision weights cast once
    cam = make_cam(name, start=int(start) if start else None)
    if isinstance(cam, DenseCam) and not args.real_queries:
        def random_queries(clip, lines) -> Queries:
            g = torch.Generator().manual_seed(0)
            line = torch.tensor([i for i, ws in enumerate(lines) for _ in ws])
            feats = torch.nn.functional.normalize(torch.randn(len(line), clip.visual.proj.shape[1], generator=g),
                                                  dim=-1)  # as many queries as the real lines hold
            return Queries(feats.to(clip.device), line.to(clip.device))
        clipes.labeler.encode_queries = random_queries
    refiner = PamrRefiner() if isinstance(cam, DenseCam) and cam.protocol.pamr_steps else None
    labeler = Labeler(clip, load_class_set("voc"), cam=cam, refiner=refiner)
    images, labels = _images(args.images + args.warmup, args.size)
    prepared = [labeler.prepare(img, lab) for img, lab in zip(images, labels, strict=True)]

    def run(items) -> None:
        for i in range(0, len(items), args.batch_size):
            labeler.label_prepared(items[i:i + args.batch_size])
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run(prepared[: args.warmup])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cpu, start_s = _cpu_seconds(), time.perf_counter()
    run(prepared[args.warmup:])
    seconds, cpu = time.perf_counter() - start_s, _cpu_seconds() - cpu
    return {"mode": args.mode, "cam": cam.settings(), "images": args.images, "batch_size": args.batch_size,
            "seconds": seconds, "images_per_second": args.images / seconds, "cpu_seconds_per_image": cpu / args.images,
            "peak_memory_mib": _peak_bytes(device) / 2**20}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--images", type=int, default=8, help="timed images per method")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--size", type=int, default=513)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--modes", default="gradcam,getam:6,getam:0,maskclip,sclip,clearclip,naclip",
                    help="methods, getam:START for GETAM's start")
    ap.add_argument("--real-queries", action="store_true", help="dense methods: embed their words (slow on a CPU)")
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.mode:  # child process: one method, JSON on stdout
        print(json.dumps(run_mode(args)))
        return

    rows = run_modes(__file__, args.modes.split(","), args.json)
    machine = hardware(args.device)
    result = {"model": args.model, "device": args.device, "hardware": machine, "dtype": args.dtype,
              "size": args.size, "threads": torch.get_num_threads(), "results": rows}
    base = rows[0]
    table = Table(title=f"CAM methods: {args.model}, {args.dtype}, {args.size}x{args.size}, batch {args.batch_size}, "
                        f"{machine}")
    for col in ("method", "img/s", "vs first", "peak MiB", "vs first", "CPU s/img"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["mode"], f"{r['images_per_second']:.3f}",
                      f"{r['images_per_second'] / base['images_per_second']:.2f}x", f"{r['peak_memory_mib']:.0f}",
                      f"{r['peak_memory_mib'] / base['peak_memory_mib']:.2f}x", f"{r['cpu_seconds_per_image']:.2f}")
    Console().print(table)
    if args.device == "cpu":
        print("CPU figures: wall-clock rates depend on what else the machine runs; compare rows of one run only.")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
