"""deeplabv2-resnet101 against deeplab-pytorch's golden iteration on any device (the GPU numerics).

    python benchmarks/deeplab_parity.py --device cuda --golden ../shared/golden/deeplab/deeplabv2_msc.npz

The same computation as tests/test_deeplab_reference.py (which runs on the CPU and asserts 1e-4 of each
array's largest value), printed as the largest error of each array relative to its largest value, so
that cuDNN's summation orders (and TF32, which PyTorch leaves off for convolutions unless asked) show.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipes.model import resolve_device
from clipes.segment.deeplabv2 import DeepLabV2MSC, caffe_input, msc_loss
from clipes.segment.optim import build_optimizer
from clipes.segment.train import load_config
from tests.deeplab_golden import rebuild_weights


def rel(actual: torch.Tensor, expected: np.ndarray) -> float:
    exp = torch.from_numpy(np.asarray(expected, dtype=np.float32))
    return float((actual.detach().float().cpu() - exp).abs().max() / exp.abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--golden", default=str(Path(__file__).resolve().parents[2] / "shared/golden/deeplab/"
                                            "deeplabv2_msc.npz"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json")
    args = ap.parse_args()
    device = resolve_device(args.device)
    with np.load(args.golden) as data:
        ref = {k: data[k] for k in data.files}
    weights = rebuild_weights(ref)
    model = DeepLabV2MSC(21)
    model.load_state_dict(weights, strict=False)
    model.to(device).train()
    x = torch.from_numpy(np.stack([caffe_input(im) for im in ref["rgb"]])).permute(0, 3, 1, 2).to(device)
    outputs = model(x)
    total, parts = msc_loss(outputs, torch.from_numpy(ref["labels"].astype(np.int64)), torch.ones(ref["labels"].shape))
    (total / 2).backward()
    report = {f"train_logits_{k}": rel(o, ref[f"train_logits_{k}"]) for k, o in enumerate(outputs)}
    report["loss_per_output"] = rel(torch.stack(parts), ref["loss_per_output"])
    report["loss"] = rel(total / 2, ref["loss"])
    params = dict(model.named_parameters())
    cut = {"layer5.block3.increase.conv.weight": np.s_[:8], "aspp.c0.weight": np.s_[:, :16]}
    names = [k.split(":", 1)[1] for k in ref if k.startswith("grad:")]
    for name in names:
        report[f"grad:{name}"] = rel(params[name].grad[cut.get(name, np.s_[:])], ref[f"grad:{name}"])
    build_optimizer(model, load_config(None, {"model": "deeplabv2-resnet101", "lr": 2.5e-4,
                                         "backbone_weights": "random"})).step()
    for name in names:
        report[f"after_step:{name}"] = rel(params[name][cut.get(name, np.s_[:])], ref[f"after_step:{name}"])
    model.load_state_dict({k: v.to(device) for k, v in weights.items()}, strict=False)  # inference: the initial ones
    model.eval()
    with torch.no_grad():
        test = torch.from_numpy(caffe_input(ref["test_rgb"])).permute(2, 0, 1)[None].to(device)
        logits = model.msc(test)[-1]
        pred = torch.nn.functional.interpolate(logits, size=ref["test_pred"].shape, mode="bilinear",
                                               align_corners=False).argmax(1)[0].cpu().numpy()
    report["test_logits_max"] = rel(logits, ref["test_logits_max"])
    report["test_pred_differ_share"] = float((pred != ref["test_pred"]).mean())
    result = {"device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
              "torch": torch.__version__, "max_error_relative_to_max": report}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
