"""Writes the segmenter fixtures of tests/test_segment_registry.py with the clipes of main at 9d7e1e3 (before
segment/ became encoders + heads + registry): every segmenter's state-dict keys and shapes, one train-seg
checkpoint and its logits on a fixed input. Kept to show how they were made; it needs that clipes
(``clipes.segment.models``) on the path: ``python tests/data/make_segmenter_fixture.py tests/data``."""

import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from clipes.segment.models import SEGMENTERS, build_segmenter  # the layout before the split

from clipes.segment.checkpoint import vision_spec, write_checkpoint
from clipes.segment.config import TrainConfig
from clipes.segment.infer import load_segmenter

VISION = {"width": 32, "layers": 4, "head_width": 16, "mlp_width": 64, "mlp_ratio": 2.0, "patch_size": 16,
          "image_size": 64, "output_dim": 16, "quick_gelu": True, "layer_scale": False}
NAME = "segmenter-main-9d7e1e3"


def main(out: Path) -> None:
    table = {}
    for name in SEGMENTERS:
        kw = {"clip_vision": VISION} if name.startswith("clip-") else {"backbone_weights": "random"}
        torch.manual_seed(0)
        m = build_segmenter(name, 3, **kw)
        table[name] = {k: list(v.shape) for k, v in m.state_dict().items()}
        if name == "clip-linear":
            cfg = TrainConfig(model=name, images="images", masks="masks", out="run", steps=1)
            write_checkpoint(out / f"{NAME}.pt", {
                "model": m.state_dict(), "optimizer": {}, "scheduler": {}, "step": 1, "best_miou": 0.0,
                "config": asdict(cfg), "classes": ["cat", "dog"],
                "arch": {"model": name, "num_classes": 3, "clip_vision": vision_spec(m.encoder.visual)}})
    (out / "segmenter-keys-main-9d7e1e3.json").write_text(
        json.dumps({"vision": VISION, "classes": 3, "models": table}, separators=(",", ":")) + "\n")
    model, _, _ = load_segmenter(out / f"{NAME}.pt", torch.device("cpu"))
    torch.manual_seed(1)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        torch.save({"input": x, "logits": model(x)}, out / f"{NAME}-logits.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
