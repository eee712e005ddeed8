"""``deeplabv2-resnet101`` against deeplab-pytorch's DeepLabV2_ResNet101_MSC (golden/deeplab/deeplabv2_msc.npz).

The file holds one training iteration and one inference of the authors' code (``main.py`` train/test) on
deterministic weights. Everything comes from the file: the weight seed and layout (``keys``, ``shapes``),
the crops and labels, the test image; so the same test checks any file made the same way
(``$CLIPES_GOLDEN/deeplab/``). The recipe pieces checked are clipes' own: the model, ``caffe_input``,
``msc_loss``, the optimiser groups of the preset and ``segment_image``.

Tolerances: the same float32 network on the same CPU kernels as the file's maker agrees to ~1e-6
relative; the bars are relative 1e-4 against each array's largest magnitude (sums of ~10^5 products
in another order, or another SIMD width, move single values by that much, not more).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipes.segment.deeplabv2 import DeepLabV2MSC, caffe_input, msc_loss
from clipes.segment.infer import segment_image
from clipes.segment.optim import build_optimizer
from clipes.segment.train import load_config

from .conftest import GOLDEN
from .deeplab_golden import rebuild_weights

FILE = GOLDEN / "deeplab" / "deeplabv2_msc.npz"
LR = 2.5e-4  # the step of the file: deeplab-pytorch's voc12.yaml lr at iteration 0


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    if not FILE.is_file():
        pytest.skip(f"golden data not found at {FILE}")
    with np.load(FILE) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def weights(ref) -> dict[str, torch.Tensor]:
    return rebuild_weights(ref)


def make_model(weights: dict[str, torch.Tensor]) -> DeepLabV2MSC:
    model = DeepLabV2MSC(21)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    return model


def close(actual: torch.Tensor, expected: np.ndarray, rel: float = 1e-4) -> None:
    """Within ``rel`` of the largest magnitude of ``expected`` everywhere."""
    expected_t = torch.from_numpy(np.asarray(expected, dtype=np.float32))
    scale = float(expected_t.abs().max())
    torch.testing.assert_close(actual.detach().float(), expected_t, rtol=rel, atol=rel * scale)


def batch(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack([caffe_input(im) for im in rgb])).permute(0, 3, 1, 2).contiguous()


def test_module_names_and_shapes_are_deeplab_pytorchs(ref):
    """Every key of the authors' state dict (convert.py's layout) is a key of the model, with its shape."""
    own = {k: tuple(v.shape) for k, v in DeepLabV2MSC(21).state_dict().items() if "num_batches_tracked" not in k}
    theirs = {str(k): tuple(int(s) for s in str(sh).split(",")) for k, sh in zip(ref["keys"], ref["shapes"],
                                                                                   strict=True)}
    assert own == theirs


@pytest.fixture(scope="module")
def trained(ref, weights):
    """One training iteration as main.py runs it: forward, per-output losses, backward, one SGD step."""
    torch.manual_seed(0)
    model = make_model(weights)
    model.train()
    outputs = model(batch(ref["rgb"]))
    labels = torch.from_numpy(ref["labels"].astype(np.int64))
    total, parts = msc_loss(outputs, labels, torch.ones(labels.shape))
    loss = total / 2  # iter_size 2: each forward's loss is divided by the accumulation steps
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    cfg = load_config(None, {"model": "deeplabv2-resnet101", "lr": LR, "backbone_weights": "random"})
    opt = build_optimizer(model, cfg)
    opt.step()
    return model, outputs, parts, loss, grads


def test_training_logits(ref, trained):
    _, outputs, _, _, _ = trained
    assert len(outputs) == 4
    for k, out in enumerate(outputs):
        assert tuple(out.shape) == ref[f"train_logits_{k}"].shape
        close(out, ref[f"train_logits_{k}"])


def test_training_losses(ref, trained):
    _, _, parts, loss, _ = trained
    close(torch.stack(parts), ref["loss_per_output"])
    close(loss, ref["loss"])


def _select(name: str, t: torch.Tensor) -> torch.Tensor:
    """The slices the file keeps (layer5.block3.increase.conv.weight[:8], aspp.c0.weight[:, :16])."""
    if name == "layer5.block3.increase.conv.weight":
        return t[:8]
    if name == "aspp.c0.weight":
        return t[:, :16]
    return t


def test_gradients_and_one_sgd_step(ref, trained):
    model, _, _, _, grads = trained
    params = dict(model.named_parameters())
    names = [k.split(":", 1)[1] for k in ref if k.startswith("grad:")]
    assert names  # the file holds some
    for name in names:
        close(_select(name, grads[name]), ref[f"grad:{name}"])
        close(_select(name, params[name]), ref[f"after_step:{name}"])
    # frozen BatchNorm: in eval mode, no gradient, in no optimiser group
    assert all(not p.requires_grad for n, p in params.items() if ".bn." in n)


def test_inference_logits_and_prediction(ref, weights):
    model = make_model(weights).eval()
    x = batch(ref["test_rgb"][None])
    with torch.no_grad():
        logits_max = model.msc(x)[-1]
    close(logits_max, ref["test_logits_max"])
    cfg = load_config(None, {"model": "deeplabv2-resnet101", "backbone_weights": "random"})
    pred = segment_image(model, cfg, ref["test_rgb"], torch.device("cpu"))
    expected = ref["test_pred"]
    differ = pred != expected
    if differ.any():  # only where the file's own top two classes are within float noise of each other
        up = torch.nn.functional.interpolate(torch.from_numpy(ref["test_logits_max"]), size=expected.shape,
                                             mode="bilinear", align_corners=False)[0]
        top2 = up.topk(2, dim=0).values
        gap = (top2[0] - top2[1]).numpy()
        assert (gap[differ] < 1e-4 * float(up.abs().max())).all(), f"{int(differ.sum())} pixels differ"
    assert differ.mean() < 1e-3


def test_every_parity_test_reads_clipes_golden(tmp_path):
    """$CLIPES_GOLDEN moves the golden folder of every parity test (this one included)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = ("import tests.test_deeplab_reference as d, tests.test_refiners as r, tests.test_tagclip as t, "
            "tests.test_parity as p, tests.test_crf_torch as c; print(d.FILE, r.PAR_GOLDEN, t.TAGCLIP, p.GOLDEN, "
            "c.GOLDEN, sep='\\n')")
    env = {**os.environ, "CLIPES_GOLDEN": str(tmp_path), "PYTHONPATH": str(repo)}
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, check=True)
    paths = out.stdout.split()
    assert len(paths) == 5 and all(Path(p).is_relative_to(tmp_path) for p in paths), paths
    assert paths[0] == str(tmp_path / "deeplab" / "deeplabv2_msc.npz")
