"""`clipes label` end to end on a folder: decoding, batching, the engine, PNG writes, all included.

    python benchmarks/label_folder.py                                   # CPU, --dtype auto, 16 images
    python benchmarks/label_folder.py --device cuda --dtype bfloat16 --images 1024 --workers 8

Writes a VOC-like folder of JPEGs (the common VOC sizes in VOC's rough proportions, 1.37 classes an
image) and a labels file into a temporary folder, then runs ``label_folder`` twice, on a small
warm-up folder and on the whole one. The difference of the two wall times over the difference of
the image counts is the steady rate, free of model loading and start-up; the whole run's own rate
is printed beside it. Prints a table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from clipes import load_class_set
from clipes.images import find_images
from clipes.run import LabelConfig, label_folder

from _common import hardware, parser

# (width, height) and share among VOC 2012 images, roughly
VOC_SIZES = [((500, 375), 0.5), ((375, 500), 0.2), ((500, 333), 0.15), ((333, 500), 0.05), ((500, 500), 0.1)]


def make_folder(root: Path, n: int, seed: int = 0, photos: list[Path] | None = None) -> Path:
    """``n`` JPEGs in VOC's sizes, and ``labels.json`` beside them.

    The pictures are smooth random colour fields, or ``photos`` resized (mirrored every other
    round): the dense CRF's cost depends on the content (random colours make it 4x larger).
    """
    rng = np.random.default_rng(seed)
    sizes, weights = zip(*VOC_SIZES, strict=True)
    images = root / "images"
    images.mkdir(parents=True)
    labels = {}
    for i in range(n):
        w, h = sizes[rng.choice(len(sizes), p=weights)]
        if photos:
            picture = Image.open(photos[i % len(photos)]).convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
            if (i // len(photos)) % 2:
                picture = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            small = rng.integers(0, 255, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
            picture = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        picture.save(images / f"{i:06d}.jpg", quality=90)
        k = 2 if rng.random() < 0.37 else 1
        labels[f"{i:06d}"] = [int(c) for c in rng.choice(20, size=k, replace=False)]
    names = load_class_set("voc").classes
    (root / "labels.json").write_text(json.dumps({s: [names[c] for c in v] for s, v in labels.items()}))
    return images


def timed_run(images: Path, labels: Path, out: Path, args: argparse.Namespace) -> tuple[float, float]:
    """Wall seconds of one ``label_folder`` call, and the rate it reports itself."""
    cfg = LabelConfig(images=images, out=out, labels=labels, model=args.model, device=args.device,
                      dtype=args.dtype, batch_size=args.batch_size, workers=args.workers,
                      refine="crf" if args.crf_backend else None, crf_backend=args.crf_backend,
                      confidence=args.confidence)
    start = time.perf_counter()
    summary = label_folder(cfg, Console(stderr=True, quiet=True))
    if summary.failed:
        raise SystemExit(f"{len(summary.failed)} images failed: {summary.failed[:3]}")
    return time.perf_counter() - start, summary.images_per_second


def main() -> None:
    ap = parser(__doc__, dtypes=("auto", "float32", "bfloat16", "float16"))
    ap.add_argument("--images", type=int, default=16, help="images in the timed folder")
    ap.add_argument("--warmup", type=int, default=4, help="images in the warm-up folder")
    ap.add_argument("--batch-size", type=int, default=None, help="default: clipes label's auto")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--crf-backend", choices=["torch", "pydensecrf"], default=None,
                    help="label with --crf on this backend (default: no CRF)")
    ap.add_argument("--confidence", type=float, default=None, help="with --crf-backend: CLIP-ES's 0.95")
    ap.add_argument("--photos", type=Path, default=None,
                    help="a folder of photos to make the JPEGs from (default: random colour fields)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # the warm-up folder is the first images of the same sequence: same sizes, same labels
        photos = [path for _, path in find_images(args.photos)] if args.photos else None
        warm = make_folder(root / "warm", args.warmup, photos=photos)
        full = make_folder(root / "full", args.images, photos=photos)
        t_warm, _ = timed_run(warm, root / "warm" / "labels.json", root / "out_warm", args)
        t_full, own_rate = timed_run(full, root / "full" / "labels.json", root / "out_full", args)
        taken = json.loads((root / "out_full" / "manifest.json").read_text())["settings"]["dtype"]
    steady = (args.images - args.warmup) / (t_full - t_warm)
    machine = hardware(args.device)
    result = {"model": args.model, "device": args.device, "hardware": machine, "dtype": args.dtype,
              "dtype_taken": taken,
              "batch_size": args.batch_size or "auto", "workers": args.workers, "images": args.images,
              "warmup_images": args.warmup, "seconds": t_full, "warmup_seconds": t_warm,
              "images_per_second_steady": steady, "images_per_second_run": own_rate,
              "threads": torch.get_num_threads(), "crf_backend": args.crf_backend, "confidence": args.confidence,
              "photos": str(args.photos) if args.photos else None}
    table = Table(title=f"clipes label on a folder: {args.model}, --dtype {args.dtype} ({taken}), VOC-sized JPEGs, "
                        f"{machine}")
    for col in ("images", "seconds", "img/s (whole run)", "img/s (steady)"):
        table.add_column(col, justify="right")
    table.add_row(str(args.warmup), f"{t_warm:.1f}", "", "")
    table.add_row(str(args.images), f"{t_full:.1f}", f"{own_rate:.3f}", f"{steady:.3f}")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
