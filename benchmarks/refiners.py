"""Pixel refiners side by side: images/s and the share of pixels each leaves ignored (255).

    python benchmarks/refiners.py                                  # CPU, the golden photos
    python benchmarks/refiners.py --device cuda --copies 32        # PAR batched on a GPU

Inputs are the golden photos and the CLIP-ES reference's refined CAMs of them (``expected/``), so
only the refiner is timed, not the network. Each refiner runs as ``clipes label`` runs it: a
device refiner (PAR) on ``--device`` over batches of equal-size images (``--copies`` copies of
each photo make a batch), a host refiner (the pydensecrf CRF) on the CPU one image at a time in
this process (``clipes label`` spreads it over a process pool of the spare cores). Settings:
``crf`` (plain), ``crf@0.95`` (CLIP-ES's confidence threshold for train-seg), ``par`` (AFA's
background thresholds 0.55 / 0.35). After one warm-up pass, ``--repeat`` passes are timed: wall
time, and the CPU time of this process (all its threads), which other work on a shared machine
does not inflate. Prints a table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from clipes.masks import IGNORE
from clipes.refiners import HostRefiner, Refiner, make_refiner

from _common import GOLDEN, hardware

SETTINGS = {"crf": ("crf", {}), "crf@0.95": ("crf", {"confidence": 0.95}), "par": ("par", {})}


def load_inputs(golden: Path) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(stem, RGB (H, W, 3) uint8, refined CAMs (k, H, W) float32, labels (k,)) of every golden photo."""
    out = []
    for path in sorted((golden / "images").glob("*.png")):
        exp = np.load(golden / "expected" / f"{path.stem}.npz")
        out.append((path.stem, np.array(Image.open(path).convert("RGB")), exp["cam_refined"], exp["labels"]))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(refiner: Refiner, inputs, copies: int, device: torch.device) -> list[np.ndarray]:
    """One pass over the inputs (each photo ``copies`` times, a batch per photo); the masks."""
    masks = []
    for _, rgb, cams, labels in inputs:
        if isinstance(refiner, HostRefiner):
            masks += [refiner.refine_image(rgb, cams, labels)[0] for _ in range(copies)]
            continue
        res = refiner.refine([torch.from_numpy(rgb).to(device)] * copies, [torch.from_numpy(cams).to(device)] * copies,
                             [torch.from_numpy(labels).to(device)] * copies)
        masks += [r.mask.cpu().numpy() for r in res]
    _sync(device)
    return masks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where device refiners (PAR) run; the pydensecrf CRF always runs on the CPU")
    ap.add_argument("--golden", type=Path, default=GOLDEN, help=f"default: {GOLDEN}")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, of: " + ", ".join(SETTINGS))
    ap.add_argument("--copies", type=int, default=1, help="copies of each photo in a device refiner's batch")
    ap.add_argument("--repeat", type=int, default=2, help="timed passes after the warm-up")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    inputs = load_inputs(args.golden)
    pixels = sum(rgb.shape[0] * rgb.shape[1] for _, rgb, _, _ in inputs) * args.copies
    rows = []
    for setting in args.settings.split(","):
        name, options = SETTINGS[setting]
        refiner = make_refiner(name, **options)
        refiner.check()
        run_once(refiner, inputs, args.copies, device)  # warm-up: allocations, kernels
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(args.repeat):
            masks = run_once(refiner, inputs, args.copies, device)
        seconds = (time.perf_counter() - start) / args.repeat
        cpu_seconds = (time.process_time() - cpu_start) / args.repeat
        ignored = sum(int((m == IGNORE).sum()) for m in masks) / pixels
        where = "cpu" if isinstance(refiner, HostRefiner) else args.device
        rows.append({"setting": setting, "runs_on": where, "hardware": hardware(where),
                     "images": len(masks), "seconds_per_pass": seconds, "images_per_second": len(masks) / seconds,
                     "cpu_ms_per_image": 1000 * cpu_seconds / len(masks),
                     "ignored_share": ignored, "settings": refiner.settings()})
    result = {"device": args.device, "threads": torch.get_num_threads(), "copies": args.copies,
              "repeat": args.repeat, "photos": [s for s, *_ in inputs], "rows": rows}
    table = Table(title=f"pixel refiners on the {len(inputs)} golden photos ({torch.get_num_threads()} CPU threads)")
    for col in ("setting", "runs on", "images", "img/s", "ms / image", "CPU ms / image", "ignored"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["setting"], f"{r['runs_on']} ({r['hardware']})", str(r["images"]),
                      f"{r['images_per_second']:.2f}", f"{1000 / r['images_per_second']:.0f}",
                      f"{r['cpu_ms_per_image']:.0f}",
                      f"{100 * r['ignored_share']:.1f}%")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
