"""``clipes export``: seconds to export a run of N masks in each format, side by side.

    python benchmarks/export.py                      # 1,000 VOC-sized masks (513 x 513)
    python benchmarks/export.py --masks 10000 --json benchmarks/results/export.json

The run is made up, not labelled: the golden VOC ground-truth masks (513 x 513, several classes and
255 borders, so the RLE is as busy as real pseudo masks) repeated under N stems, each with a record
in ``labels.json``, and the golden photos linked as its input folder. Each format is timed as the
command runs it, from ``open_run`` (reading ``labels.json``, checking every mask exists) to the
export in place: wall time and this process's CPU time (other work on a shared machine inflates
the first only). Python start-up and imports are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from clipes.export import export_run, open_run
from clipes.prompts import load_class_set

from _common import GOLDEN, hardware

# (name, format, options, suffix of --out)
CASES = [
    ("coco", "coco", {}, ".json"),
    ("coco --instances --ignore-category", "coco", {"instances": True, "ignore_category": True}, ".json"),
    ("cvat (folder)", "cvat", {}, ""),
    ("cvat (.zip)", "cvat", {}, ".zip"),
    ("cvat --images copy", "cvat", {"images": "copy"}, ""),
    ("hf (photo paths)", "hf", {}, ""),
    ("hf --images copy", "hf", {"images": "copy"}, ""),
]


def make_run(root: Path, n: int, golden: Path) -> Path:
    """A run folder of ``n`` masks (the golden ground truth, cycled) and a photo folder of links."""
    voc = load_class_set("voc")
    stems = sorted(p.stem for p in (golden / "gt").glob("*.png"))
    photos, run = root / "photos", root / "run"
    (run / "masks").mkdir(parents=True)
    photos.mkdir()
    records = {}
    for i in range(n):
        src = stems[i % len(stems)]
        stem = f"{i:06d}_{src}"
        shutil.copyfile(golden / "gt" / f"{src}.png", run / "masks" / f"{stem}.png")
        os.symlink((golden / "images" / f"{src}.png").resolve(), photos / f"{stem}.png")
        values = np.unique(np.asarray(Image.open(golden / "gt" / f"{src}.png")))
        records[stem] = {"labels": [voc.classes[v - 1] for v in values if 0 < v < 255], "source": "given",
                         "file": f"{stem}.png"}
    (run / "labels.json").write_text(json.dumps(records, indent=1))
    (run / "manifest.json").write_text(json.dumps({"tool": "clipes label", "input": str(photos),
                                                   "settings": {"classes": voc.to_dict()}}))
    return run


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() or p.is_symlink())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--masks", type=int, default=1000, help="masks in the run (default: 1000)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    console = Console()
    results = []
    with tempfile.TemporaryDirectory(prefix="clipes-export-bench-") as tmp:
        root = Path(tmp)
        run = make_run(root, args.masks, GOLDEN)
        voc = load_class_set("voc")
        for name, fmt, options, suffix in CASES:
            out = root / f"out{len(results)}{suffix}"
            wall, cpu = time.perf_counter(), time.process_time()
            export_run(open_run(run, voc), fmt, out, **options)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            results.append({"case": name, "seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
                            "masks_per_second": round(args.masks / wall, 1), "bytes": size_of(out)})
    cpu_name = hardware("cpu")
    table = Table(title=f"clipes export, {args.masks} masks of 513 x 513 on {cpu_name} ({os.cpu_count()} cores)")
    for col in ("format", "wall s", "CPU s", "masks/s", "output MB"):
        table.add_column(col, justify="left" if col == "format" else "right")
    for r in results:
        table.add_row(r["case"], f"{r['seconds']:.2f}", f"{r['cpu_seconds']:.2f}", f"{r['masks_per_second']:.0f}",
                      f"{r['bytes'] / 1e6:.1f}")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name, "cores": os.cpu_count(), "masks": args.masks,
                                         "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
