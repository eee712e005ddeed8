"""``clipes segment --crf``: deeplab-pytorch's test-time CRF on a segmenter's 21-class softmax, both backends.

    python benchmarks/segment_crf.py                  # CPU: torch against pydensecrf, seconds per image
    python benchmarks/segment_crf.py --device cuda    # torch on a GPU against pydensecrf (or CPU torch)

Inputs: the golden photos at full size with a segmenter-like softmax made from their ground truth (or,
without it, from a smooth random field) and seeded noise. The torch CRF runs on ``--device``; the reference
is pydensecrf where installed, else the torch CRF on the CPU. Prints, per image, the share of pixels on which
the labels agree and the seconds of each; writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipes.segment.crf import crf_probabilities

from _common import GOLDEN, hardware


def softmax_like(rgb: np.ndarray, gt: Path, seed: int) -> torch.Tensor:
    """(21, H, W) probabilities: 2 logits on the ground-truth class (or a blocky random one) plus N(0, 1.5)."""
    rng = np.random.default_rng(seed)
    h, w = rgb.shape[:2]
    if gt.is_file():
        labels = np.asarray(Image.open(gt)).astype(np.int64)
        labels = np.where(labels == 255, 0, labels)
    else:
        blocks = rng.integers(0, 21, (h // 64 + 1, w // 64 + 1))
        labels = np.kron(blocks, np.ones((64, 64), np.int64))[:h, :w]
    logits = rng.normal(0, 1.5, (21, h, w)).astype(np.float32)
    logits[labels, np.arange(h)[:, None], np.arange(w)] += 2.0
    return torch.from_numpy(logits).softmax(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--golden", type=Path, default=GOLDEN)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device = torch.device(args.device)
    try:
        import pydensecrf.densecrf  # noqa: F401
        reference = "pydensecrf"
    except ImportError:
        reference = "torch-cpu"
    rows = []
    for path in sorted((args.golden / "images").glob("*.png")):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        probs = softmax_like(rgb, args.golden / "gt" / path.name, 0)
        start = time.perf_counter()
        ref = crf_probabilities(rgb, probs, "pydensecrf" if reference == "pydensecrf" else "torch").argmax(0)
        t_ref = time.perf_counter() - start
        crf_probabilities(rgb, probs.to(device), "torch")  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        ours = crf_probabilities(rgb, probs.to(device), "torch").argmax(0).cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_ours = time.perf_counter() - start
        agree = float((ours == ref).double().mean())
        rows.append({"image": path.stem, "size": list(rgb.shape[:2]), "agreement": agree,
                     f"s_{reference}": t_ref, f"s_torch_{device.type}": t_ours})
        print(f"{path.stem} {rgb.shape[1]}x{rgb.shape[0]}: labels agree on {100 * agree:.3f}% of pixels; "
              f"{reference} {t_ref:.2f} s, torch on {device.type} {t_ours:.2f} s", flush=True)
    worst = min(r["agreement"] for r in rows)
    print(f"worst agreement {100 * worst:.3f}% (bar 99.9%), reference {reference}, {hardware(args.device)}")
    if args.json:
        args.json.write_text(json.dumps({"reference": reference, "device": hardware(args.device), "images": rows,
                                         "worst_agreement": worst}, indent=1) + "\n")


if __name__ == "__main__":
    main()
