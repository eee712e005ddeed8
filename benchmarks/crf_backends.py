"""The dense CRF's two backends side by side: pydensecrf (C++, host CPU) and torch (clipes.lattice).

    python benchmarks/crf_backends.py --threads 1                 # CPU: images/s per core, both backends
    python benchmarks/crf_backends.py --device cuda --copies 16   # torch on a GPU, batches of 16 images

Inputs are the golden photos (seven 513x513 VOC crops, two scikit-image photos) with the CLIP-ES
reference's refined CAMs (``expected/``); where ``expected/`` is absent (the copy gpu_check.sh
carries) the CAMs are smooth random fields, 1 or 2 classes an image, which cost the CRF the same.
Settings are CLIP-ES's training labels: ``--crf --confidence 0.95``. pydensecrf runs as ``clipes
label`` runs it in each worker process: one image at a time, one core. torch runs on ``--device``
as the Labeler calls it: each photo ``--copies`` times in one batch (one lattice per kernel). After
a warm-up pass, ``--repeat`` passes are timed: wall time, and this process's CPU time (all its
threads), which other work on a shared machine does not inflate. The share of pixels on which the
torch labels equal pydensecrf's is printed too. Prints a table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console
from rich.table import Table

from clipes.refiners.crf import CrfRefiner, CrfUnavailableError, require_pydensecrf
from clipes.refiners.crf_torch import CrfTorchRefiner

from _common import GOLDEN, hardware

CONFIDENCE = 0.95


def load_inputs(golden: Path, seed: int = 0) -> tuple[list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], str]:
    """(stem, RGB uint8, refined CAMs (k, H, W) float32, labels (k,)) of every golden photo, and the CAMs' source."""
    rng = np.random.default_rng(seed)
    out, source = [], "reference"
    for path in sorted((golden / "images").glob("*.png")):
        rgb = np.array(Image.open(path).convert("RGB"))
        npz = golden / "expected" / f"{path.stem}.npz"
        if npz.is_file():
            exp = np.load(npz)
            out.append((path.stem, rgb, exp["cam_refined"], exp["labels"]))
            continue
        source = "random"
        k = int(rng.integers(1, 3))
        coarse = torch.from_numpy(rng.random((1, k, 8, 8), dtype=np.float32))
        cams = F.interpolate(coarse, size=rgb.shape[:2], mode="bilinear")[0].numpy()
        out.append((path.stem, rgb, cams, rng.choice(20, size=k, replace=False)))
    if not out:
        raise SystemExit(f"no golden photos in {golden / 'images'}")
    return out, source


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_pydensecrf(inputs, copies: int) -> list[np.ndarray]:
    refiner = CrfRefiner(CONFIDENCE)
    return [refiner.refine_image(rgb, cams, labels)[0] for _, rgb, cams, labels in inputs for _ in range(copies)]


def run_torch(inputs, copies: int, device: torch.device) -> list[np.ndarray]:
    """Each photo ``copies`` times in one batch; masks back on the host (as ``clipes label`` writes them)."""
    refiner = CrfTorchRefiner(CONFIDENCE)
    masks = []
    for _, rgb, cams, labels in inputs:
        image, cam, lab = (torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in (rgb, cams, labels))
        res = refiner.refine([image] * copies, [cam] * copies, [lab] * copies)
        masks += [r.mask.cpu().numpy() for r in res]
    _sync(device)
    return masks


def timed(run, repeat: int) -> tuple[list[np.ndarray], float, float]:
    """The masks of the last of ``repeat`` passes after a warm-up, wall and CPU seconds a pass."""
    run()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(repeat):
        masks = run()
    return masks, (time.perf_counter() - start) / repeat, (time.process_time() - cpu_start) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="where the torch backend runs (pydensecrf: always the CPU)")
    ap.add_argument("--golden", type=Path, default=GOLDEN, help=f"default: {GOLDEN}")
    ap.add_argument("--copies", type=int, default=1, help="copies of each photo in a torch batch")
    ap.add_argument("--repeat", type=int, default=2, help="timed passes after the warm-up")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--backends", default="pydensecrf,torch", help="comma-separated: pydensecrf, torch")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    inputs, source = load_inputs(args.golden)
    backends = args.backends.split(",")
    if "pydensecrf" in backends:
        try:
            require_pydensecrf()
        except CrfUnavailableError:
            print("pydensecrf is not installed here: timing the torch backend only")
            backends.remove("pydensecrf")
    rows, masks = [], {}
    for backend in backends:
        if backend == "pydensecrf":
            out, seconds, cpu = timed(lambda: run_pydensecrf(inputs, args.copies), args.repeat)
            where = "cpu"
        else:
            out, seconds, cpu = timed(lambda: run_torch(inputs, args.copies, device), args.repeat)
            where = args.device
        masks[backend] = out
        rows.append({"backend": backend, "runs_on": where, "hardware": hardware(where), "images": len(out),
                     "seconds_per_pass": seconds, "images_per_second": len(out) / seconds,
                     "cpu_seconds_per_image": cpu / len(out)})
    agreement = None
    if len(masks) == 2:
        agreement = {stem: float((masks["torch"][i * args.copies] == masks["pydensecrf"][i * args.copies]).mean())
                     for i, (stem, *_) in enumerate(inputs)}
    result = {"device": args.device, "threads": torch.get_num_threads(), "copies": args.copies,
              "repeat": args.repeat, "cams": source, "confidence": CONFIDENCE,
              "photos": [(s, list(rgb.shape[:2]), len(lab)) for s, rgb, _, lab in inputs], "rows": rows,
              "torch_vs_pydensecrf_agreement": agreement}
    table = Table(title=f"dense CRF (--confidence {CONFIDENCE}) on the {len(inputs)} golden photos, {source} CAMs, "
                        f"{torch.get_num_threads()} torch thread(s)")
    for col in ("backend", "runs on", "images", "img/s", "ms / image", "CPU s / image"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["backend"], f"{r['runs_on']} ({r['hardware']})", str(r["images"]),
                      f"{r['images_per_second']:.2f}", f"{1000 / r['images_per_second']:.0f}",
                      f"{r['cpu_seconds_per_image']:.2f}")
    Console().print(table)
    if agreement:
        print("torch = pydensecrf on " + ", ".join(f"{s} {a:.6f}" for s, a in agreement.items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
