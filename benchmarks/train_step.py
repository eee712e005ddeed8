"""Seconds per training step of a segmenter (forward, CGL loss with any auxiliary heads, backward, optimiser
step), its peak memory and parameter counts.

    python benchmarks/train_step.py --model tiny --batch-size 8 --crop 64
    python benchmarks/train_step.py --model clip-linear --clip-model ViT-B-16 --batch-size 16 --crop 448 --bf16
    python benchmarks/train_step.py --model clip-setr-pup --clip-model ViT-B-16 --batch-size 2 --crop 448

Random images and masks in memory (no data loading), so the figure is the model's own cost. Peak memory:
on a GPU the most allocated by the training steps; on the CPU the process's peak resident size (model
loading included), so run one model per process.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from clipes.model import resolve_device
from clipes.segment.deeplabv2 import msc_loss
from clipes.segment.losses import segmentation_loss
from clipes.segment.optim import build_optimizer
from clipes.segment.registry import build_segmenter
from clipes.segment.train import PRESETS, SEGMENTERS, TrainConfig

from _common import hardware


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--clip-model", default="ViT-B-16")
    ap.add_argument("--finetune", action="store_true")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    # the preset decides what trains (DeepLab: the whole network, backbone BatchNorm frozen); --finetune the CLIP ViT
    cfg = TrainConfig(model=args.model, clip_model=args.clip_model,
                      freeze_backbone=False if args.finetune else None).resolved()
    model = build_segmenter(args.model, 21, clip_model=args.clip_model, freeze_backbone=cfg.freeze_backbone,
                            backbone_weights="random", freeze_bn=cfg.freeze_bn).to(device).train()
    opt = build_optimizer(model, cfg)
    x = torch.randn(args.batch_size, 3, args.crop, args.crop, device=device)
    y = torch.randint(0, 21, (args.batch_size, args.crop, args.crop), device=device)
    w = torch.ones(y.shape, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.steps + 1):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(x)
        # deeplabv2-resnet101 gives MSC's four outputs, for deeplab-pytorch's loss
        msc = SEGMENTERS[args.model].recipe == "deeplab-pytorch"
        loss = msc_loss(logits, y, w)[0] if msc else segmentation_loss(logits, y, w, w.numel())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    s = sum(times) / len(times)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    params = {name: p for name, p in model.named_parameters()}
    trained = sum(p.numel() for p in params.values() if p.requires_grad)
    new_layers = sum(p.numel() for name, p in params.items() if not name.startswith("encoder."))
    print(json.dumps({"model": args.model, "preset": SEGMENTERS[args.model].preset, "device": str(device),
                      "hardware": hardware(str(device)),
                      "params_trained": trained, "params_outside_clip_encoder": new_layers,
                      "peak_memory_mib": round(peak / 2**20, 1),
                      "peak_memory_kind": "allocated" if device.type == "cuda" else "process max RSS",
                      "batch_size": args.batch_size, "crop": args.crop, "bf16": args.bf16, "finetune": args.finetune,
                      "seconds_per_step": round(s, 4), "steps_per_second": round(1 / s, 3),
                      "optimizer": PRESETS[SEGMENTERS[args.model].preset]["optimizer"]}))


if __name__ == "__main__":
    main()
