"""Images per second of the CLIP-ES engine (CAM + CAA + mask, no disk writes) on a folder of images.

    python benchmarks/label_speed.py --model ../shared/golden/tiny-clip-vit-b16-random.pt
    python benchmarks/label_speed.py --model ViT-B-16          # random full-size ViT-B/16

Images and labels default to ../shared/golden; prints a table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from clipes import Labeler, load_class_set, load_clip
from clipes.images import read_image
from clipes.labels import read_labels

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(GOLDEN / "tiny-clip-vit-b16-random.pt"))
    ap.add_argument("--images", type=Path, default=GOLDEN / "images")
    ap.add_argument("--labels", type=Path, default=GOLDEN / "labels.json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes over the images")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    class_set = load_class_set("voc")
    labels = read_labels(args.labels, class_set)
    paths = sorted(p for p in args.images.iterdir() if p.stem in labels)
    images = [read_image(p) for p in paths]
    clip = load_clip(args.model, device=args.device)
    labeler = Labeler(clip, class_set)
    labeler.label(images[0], labels[paths[0].stem])  # warm-up

    times = []
    for _ in range(args.repeats):
        for path, image in zip(paths, images, strict=True):
            start = time.perf_counter()
            labeler.label(image, labels[path.stem])
            if clip.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    result = {
        "model": args.model, "device": str(clip.device), "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "images": len(paths), "repeats": args.repeats,
        "mean_pixels": sum(i.width * i.height for i in images) / len(images),
        "classes_per_image": sum(len(labels[p.stem]) for p in paths) / len(paths),
        "seconds_per_image": sum(times) / len(times), "images_per_second": len(times) / sum(times),
    }
    table = Table(title="clipes label engine (CAM + CAA + mask, no I/O)")
    for key in ("model", "device", "threads", "images", "classes_per_image", "seconds_per_image",
                "images_per_second"):
        value = result[key]
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
