"""How far low precision moves the pseudo masks: fp32 against bf16 / fp16 autocast, pixel by pixel.

    python benchmarks/dtype_agreement.py                                  # golden images, tiny model
    python benchmarks/dtype_agreement.py --device cuda --model ViT-B-16 --dtype bfloat16

Labels every image with the exact fp32 engine and with ``--dtype`` on the same device, and prints
per image and over all pixels the share of pseudo-mask pixels that agree (the issue's bar is 99%).
``--images`` and ``--labels`` default to ../shared/golden; pass copies where that folder is absent.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from clipes import Labeler, load_class_set, load_clip
from clipes.run import DTYPES

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(GOLDEN / "tiny-clip-vit-b16-random.pt"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--images", type=Path, default=GOLDEN / "images")
    ap.add_argument("--labels", type=Path, default=GOLDEN / "labels.json", help="JSON map: file name -> classes")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    clip = load_clip(args.model, device=torch.device(args.device))
    voc = load_class_set("voc")
    exact, low = Labeler(clip, voc), Labeler(clip, voc, autocast=DTYPES[args.dtype])
    labels = json.loads(args.labels.read_text())
    rows, same, total = [], 0, 0
    for name in sorted(labels):
        image = Image.open(args.images / name)
        a, b = exact.label(image, labels[name]), low.label(image, labels[name])
        agree = int((a.mask == b.mask).sum())
        rows.append({"image": name, "agreement": agree / a.mask.size})
        same, total = same + agree, total + a.mask.size
    hardware = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    table = Table(title=f"pseudo masks, float32 vs {args.dtype}: {Path(args.model).name}, {hardware}")
    table.add_column("image")
    table.add_column("pixels agreeing", justify="right")
    for r in rows:
        table.add_row(r["image"], f"{100 * r['agreement']:.2f}%")
    table.add_row("[b]all[/b]", f"[b]{100 * same / total:.2f}%[/b]")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "device": args.device, "hardware": hardware,
                                         "dtype": args.dtype, "agreement": same / total, "images": rows},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
