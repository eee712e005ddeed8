"""train-seg and segment: learning through noisy pseudo masks, CGL, resume, DDP and inference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from clipes.cli import app
from clipes.segment.registry import SEGMENTERS, build_segmenter
from clipes.segment.train import TrainConfig, cgl_loss, load_checkpoint, load_config, train

from .conftest import GOLDEN
from .synthetic import make_dataset

runner = CliRunner()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("synthetic"), photos_dir=GOLDEN / "images")


def _config(root: Path, out: Path, **kw) -> TrainConfig:
    base = dict(out=str(out), images=str(root / "images"), masks=str(root / "noisy"),
                val_images=str(root / "val_images"), val_masks=str(root / "val_masks"),
                classes=str(root / "classes.txt"), model="tiny", optimizer="adamw", lr=3e-3, weight_decay=1e-4,
                batch_size=8, crop=64, scale_min=0.75, scale_max=1.25, workers=0, device="cpu", val_every=100)
    base.update(kw)
    return TrainConfig(**base)


def test_tiny_model_learns_through_corrupted_pseudo_masks(synthetic, tmp_path):
    """25% of object pixels are 255 and a band of the discs is labelled 'square'; the model still
    segments the clean validation set. Measured: 94.9% mIoU after 300 steps."""
    result = train(_config(synthetic, tmp_path / "run", steps=300))
    assert result["best_miou"] >= 0.80
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "last.pt").is_file()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 300 and log[-1]["loss"] < log[0]["loss"]

    pred = tmp_path / "pred"
    res = runner.invoke(app, ["segment", str(synthetic / "val_images"), "--checkpoint", str(tmp_path / "run" /
                              "best.pt"), "--out", str(pred), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["eval", str(pred), str(synthetic / "val_masks"), "--classes",
                              str(synthetic / "classes.txt"), "--json", str(tmp_path / "eval.json")])
    assert res.exit_code == 0, res.output
    miou = json.loads((tmp_path / "eval.json").read_text())["miou"]
    assert miou == pytest.approx(load_checkpoint(tmp_path / "run" / "best.pt")["best_miou"], abs=1e-9)
    res = runner.invoke(app, ["segment", str(synthetic / "val_images"), "--checkpoint", str(tmp_path / "run" /
                              "best.pt"), "--out", str(tmp_path / "ms"), "--device", "cpu", "--scales", "0.75,1,1.25",
                              "--flip"])
    assert res.exit_code == 0 and len(list((tmp_path / "ms").glob("*.png"))) == 12


def test_ignored_pixels_get_no_gradient():
    logits = torch.randn(2, 3, 5, 5, requires_grad=True)
    labels = torch.randint(0, 3, (2, 5, 5))
    labels[0, :2] = 255
    labels[1, :, 3:] = 255
    loss = cgl_loss(logits, labels, torch.ones(2, 5, 5), (labels != 255).sum())
    loss.backward()
    ignored = (labels == 255)[:, None].expand_as(logits)
    assert (logits.grad[ignored] == 0).all()
    assert (logits.grad[~ignored] != 0).any()
    ref = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_confidence_weights_scale_the_loss():
    logits = torch.randn(1, 3, 4, 4)
    labels = torch.randint(0, 3, (1, 4, 4))
    w = torch.rand(1, 4, 4)
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert float(cgl_loss(logits, labels, w, w.sum())) == pytest.approx(float((ce * w).sum() / w.sum()), rel=1e-6)


def test_resumed_run_ends_with_the_same_weights(synthetic, tmp_path):
    full = train(_config(synthetic, tmp_path / "full", steps=16, val_every=8))
    train(_config(synthetic, tmp_path / "split", steps=16, val_every=8, stop_at=8))
    resumed = train(_config(synthetic, tmp_path / "split", steps=16, val_every=8, resume=True))
    assert resumed["step"] == full["step"] == 16
    a = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_two_processes_follow_the_loss_curve_of_one(tmp_path):
    """Two gloo processes with half the batch each give the curve and weights of one process.

    Noise backgrounds, always: with them, AdamW made this fail (1.84e-5 against 1e-5) although the two
    runs compute the same gradient (their float64 gradients agree to 4e-15, and both float32 ones
    are equally far from it). One weight's gradient cancels to 1.8e-8 (its per-image terms are about
    1e-3), so float32 rounding in a different summation order gives 1.93e-8 or 1.98e-8, and Adam's
    first step, lr * g / (|g| + eps) with eps 1e-8, turns that into 3e-3 * 0.658 or 0.664: an
    amplification of lr / eps that no bound fits. SGD with momentum (the DeepLab recipe) moves
    weights linearly in the gradient, so the comparison measures the distributed maths (sampler
    slices, loss normalised by the global count of valid pixels, gradient averaging), which a mean
    of per-rank means would break by 2e-4 to 4e-3 here.
    """
    data = make_dataset(tmp_path / "noise")
    args = ["train-seg", "--images", str(data / "images"), "--masks", str(data / "noisy"), "--classes",
            str(data / "classes.txt"), "--model", "tiny", "--optimizer", "sgd", "--lr", "0.05", "--steps", "6",
            "--batch-size", "8", "--crop", "64", "--workers", "0", "--device", "cpu", "--val-every", "100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "clipes", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29533", "-m", "clipes", *args, "--out", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]

    def losses(run: str) -> list[float]:
        return [json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]

    a, b = losses("one"), losses("two")
    assert len(a) == len(b) >= 1
    np.testing.assert_allclose(a, b, rtol=1e-4)
    wa = load_checkpoint(tmp_path / "one" / "last.pt")["model"]
    wb = load_checkpoint(tmp_path / "two" / "last.pt")["model"]
    w0 = _tiny_init()
    assert max(float((wa[k] - w0[k]).abs().max()) for k in wa) > 1e-2  # the weights did move
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def _tiny_init() -> dict[str, torch.Tensor]:
    """The tiny model's weights at step 0 of a seed-0 run."""
    from clipes.segment.segmenters import TinySegmenter

    torch.manual_seed(0)
    return TinySegmenter(3).state_dict()


def test_config_file_and_flag_overrides(tmp_path):
    f = tmp_path / "cfg.yaml"
    f.write_text("model: deeplabv3-resnet101\nsteps: 50\nlr: 0.01\n")
    cfg = load_config(f, {"lr": 0.5, "crop": None})
    assert cfg.model == "deeplabv3-resnet101" and cfg.steps == 50 and cfg.lr == 0.5
    assert cfg.optimizer == "sgd" and cfg.crop == 321 and cfg.batch_size == 10 and cfg.weight_decay == 5e-4
    vit = load_config(None, {"model": "clip-linear"})
    assert vit.optimizer == "adamw" and vit.crop == 448
    f.write_text("modle: tiny\n")
    with pytest.raises(Exception, match="unknown setting"):
        load_config(f, {})


def _said(res) -> str:
    return " ".join(res.output.split())


def test_train_seg_errors_are_clear(synthetic, tmp_path):
    res = runner.invoke(app, ["train-seg", "--out", str(tmp_path / "o"), "--images", str(synthetic / "images"),
                              "--model", "tiny"])
    assert res.exit_code == 2 and "--images needs --masks" in _said(res)
    res = runner.invoke(app, ["train-seg", "--out", str(tmp_path / "o"), "--images", str(synthetic / "images"),
                              "--masks", str(tmp_path), "--model", "tiny"])
    assert res.exit_code == 2 and "have no mask" in _said(res)
    res = runner.invoke(app, ["train-seg", "--model", "unet", "--images", "x", "--masks", "y"])
    assert res.exit_code == 2 and "unknown model 'unet'" in _said(res)
    res = runner.invoke(app, ["train-seg", "--model", "deeplabv3-resnet50", "--images", str(synthetic / "images"),
                              "--masks", str(synthetic / "noisy"), "--out", str(tmp_path / "d"), "--steps", "1",
                              "--device", "cpu", "--workers", "0"])
    assert res.exit_code == 2 and "--backbone-weights" in _said(res)


@pytest.mark.parametrize("model", ["clip-linear", "clip-segmenter"])
def test_clip_heads_train_and_segment(synthetic, golden, tmp_path, model):
    ckpt = str(golden / "tiny-clip-vit-b16-random.pt")
    result = train(_config(synthetic, tmp_path / "run", model=model, clip_model=ckpt, steps=3, val_every=3))
    assert result["step"] == 3 and np.isfinite(result["loss"]) and result["best_miou"] is not None
    saved = load_checkpoint(tmp_path / "run" / "last.pt")
    assert saved["config"]["clip_model"] == ckpt and saved["config"]["freeze_backbone"]
    frozen = [k for k in saved["model"] if k.startswith("encoder.visual.")]
    assert frozen  # the encoder's weights travel in the checkpoint
    res = runner.invoke(app, ["segment", str(synthetic / "val_images"), "--checkpoint",
                              str(tmp_path / "run" / "last.pt"), "--out", str(tmp_path / "pred"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "pred").glob("*.png"))) == 12


@pytest.mark.parametrize("model", ["clip-linear", "clip-segmenter"])
def test_finetuned_clip_heads_train_under_torchrun(synthetic, golden, tmp_path, model):
    """--finetune under two gloo processes: DDP runs without find_unused_parameters, so a trainable encoder
    parameter the forward never reads (CLIP's ``proj``) fails or stalls the second step; the timeout turns a
    stall into a failure."""
    args = ["train-seg", "--images", str(synthetic / "images"), "--masks", str(synthetic / "noisy"), "--classes",
            str(synthetic / "classes.txt"), "--model", model, "--finetune", "--clip-model",
            str(golden / "tiny-clip-vit-b16-random.pt"), "--steps", "3", "--batch-size", "4", "--crop", "64",
            "--workers", "0", "--device", "cpu", "--val-every", "100", "--out", str(tmp_path / "run")]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "clipes", *args], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 3


@pytest.mark.parametrize("model", [m for m in SEGMENTERS if m.startswith("clip-")])
def test_finetuned_clip_models_train_only_what_the_forward_reads(golden, model):
    """Every trainable parameter gets a gradient, so DDP needs no find_unused_parameters; the ViT still trains."""
    torch.manual_seed(0)
    net = build_segmenter(model, 3, clip_model=str(golden / "tiny-clip-vit-b16-random.pt"), freeze_backbone=False)
    out = net.train()(torch.randn(2, 3, 64, 64))
    (sum(w * o.sum() for w, o in out) if isinstance(out, list) else out.sum()).backward()
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    assert {n for n, p in net.named_parameters() if p.grad is not None} == trained
    assert "encoder.visual.transformer.resblocks.0.attn.in_proj_weight" in trained
    assert "encoder.visual.proj" not in trained
