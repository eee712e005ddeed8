"""How far low precision moves the pseudo masks: fp32 against bf16 / fp16 vision weights, pixel by pixel.

    python benchmarks/dtype_agreement.py                                  # golden images, tiny model
    python benchmarks/dtype_agreement.py --device cuda --model ViT-B-16 --dtype bfloat16
    python benchmarks/dtype_agreement.py --cam getam --getam-start 0     # another CAM method

Labels every image with the exact fp32 engine and with the model loaded in ``--dtype`` (vision
weights cast once, as ``clipes label --dtype``) on the same device, and prints per image and over
all pixels the share of pseudo-mask pixels that agree (issue 22's bar: 99.5%).
``--images`` and ``--labels`` default to ../shared/golden; pass copies where that folder is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from clipes import Labeler, load_class_set, load_clip
from clipes.cams import make_cam
from clipes.precision import torch_dtype

from _common import GOLDEN, hardware, parser


def main() -> None:
    ap = parser(__doc__, str(GOLDEN / "tiny-clip-vit-b16-random.pt"), ("bfloat16", "float16"))
    ap.add_argument("--images", type=Path, default=GOLDEN / "images")
    ap.add_argument("--labels", type=Path, default=GOLDEN / "labels.json", help="JSON map: file name -> classes")
    ap.add_argument("--cam", default="gradcam", help="CAM method (clipes.cams)")
    ap.add_argument("--getam-start", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    device = torch.device(args.device)
    voc = load_class_set("voc")
    cam = make_cam(args.cam, start=args.getam_start)
    models = []
    for dtype in (torch.float32, torch_dtype(args.dtype)):
        torch.manual_seed(0)  # the same weights for an architecture name (random weights)
        models.append(load_clip(args.model, device=device, dtype=dtype))
    exact, low = (Labeler(m, voc, cam=cam) for m in models)
    labels = json.loads(args.labels.read_text())
    rows, same, total = [], 0, 0
    for name in sorted(labels):
        image = Image.open(args.images / name)
        a, b = exact.label(image, labels[name]), low.label(image, labels[name])
        agree = int((a.mask == b.mask).sum())
        rows.append({"image": name, "agreement": agree / a.mask.size})
        same, total = same + agree, total + a.mask.size
    machine = hardware(args.device)
    table = Table(title=f"pseudo masks, float32 vs {args.dtype}, {cam.settings()}: {Path(args.model).name}, {machine}")
    table.add_column("image")
    table.add_column("pixels agreeing", justify="right")
    for r in rows:
        table.add_row(r["image"], f"{100 * r['agreement']:.2f}%")
    table.add_row("[b]all[/b]", f"[b]{100 * same / total:.2f}%[/b]")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "device": args.device, "hardware": machine,
                                         "dtype": args.dtype, "cam": cam.settings(), "agreement": same / total,
                                         "images": rows},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
