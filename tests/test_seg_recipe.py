"""The segmenter's loss choices and SETR's mmseg recipe, checked against their formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipes.segment.augment import (
    MmsegAugment,
    _hsv_to_rgb,
    _rgb_to_hsv,
    cat_max_crop,
    mmseg_augment,
    nearest_resize,
    rescale_size,
    short_side_size,
)
from clipes.segment.config import load_config
from clipes.segment.deeplabv2 import msc_loss, resize_labels
from clipes.segment.losses import balanced_ce, loss_norm
from clipes.segment.slide import slide_logits, slide_windows
from clipes.segment.train import _not_finite, segmentation_loss


def _batch(seed: int = 0, pad: int = 3):
    """Two 8x8 crops whose last ``pad`` rows and columns are padding (255), a few ignored pixels inside."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 4, (2, 8, 8), generator=g)
    labels[:, -pad:], labels[:, :, -pad:] = 255, 255
    labels[0, 0, :2] = 255
    return logits, labels


def test_all_pixels_norm_is_mmseg_cross_entropy():
    """mmseg's CrossEntropyLoss (avg_non_ignore off): per-pixel CE, 0 where ignored, averaged over every
    pixel of the batch, padding included; the auxiliary heads add their loss times 0.4."""
    logits, labels = _batch()
    aux = (logits.detach() * 0.5).requires_grad_()
    ones = torch.ones(labels.shape)
    ours = segmentation_loss([(1.0, logits), (0.4, aux)], labels, ones, loss_norm(labels, ones, "all"))

    def mmseg(x):
        return F.cross_entropy(x, labels, ignore_index=255, reduction="none").mean()

    torch.testing.assert_close(ours, mmseg(logits) + 0.4 * mmseg(aux), rtol=1e-6, atol=0)
    labelled = segmentation_loss(logits, labels, ones, loss_norm(labels, ones, "labelled"))
    torch.testing.assert_close(labelled, F.cross_entropy(logits, labels, ignore_index=255), rtol=1e-6, atol=0)
    valid = (labels != 255).float().mean()
    torch.testing.assert_close(segmentation_loss(logits, labels, ones, loss_norm(labels, ones, "all")),
                               labelled * valid, rtol=1e-6, atol=0)


def test_balanced_ce_is_the_mean_of_background_and_foreground_means():
    logits, labels = _batch(1)
    labels[1, :4, :4] = 0
    w = torch.rand(labels.shape, generator=torch.Generator().manual_seed(2))
    ce = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    bg, fg = labels == 0, (labels != 0) & (labels != 255)
    expected = ((ce * w * bg).sum() / (w * bg).sum() + (ce * w * fg).sum() / (w * fg).sum()) / 2
    torch.testing.assert_close(balanced_ce(logits, labels, w), expected, rtol=1e-6, atol=0)
    only_fg = torch.where(labels == 0, 1, labels)  # no background pixel: the foreground mean alone, not NaN
    ce_fg = F.cross_entropy(logits, only_fg, ignore_index=255)
    torch.testing.assert_close(balanced_ce(logits, only_fg, torch.ones(labels.shape)), ce_fg, rtol=1e-6, atol=0)
    none = torch.full_like(labels, 255)
    assert balanced_ce(logits, none, torch.ones(labels.shape)).item() == 0


def test_balanced_ce_on_deeplab_msc_outputs():
    """deeplab-pytorch's MSC loss with --loss balanced-ce: each output's balanced CE against its resized labels."""
    _, labels = _batch(3)
    outputs = [torch.randn(2, 4, s, s, generator=torch.Generator().manual_seed(s)) for s in (8, 4, 6, 8)]
    total, parts = msc_loss(outputs, labels, torch.ones(labels.shape), loss="balanced-ce")
    for o, p in zip(outputs, parts, strict=True):
        size = tuple(o.shape[-2:])
        torch.testing.assert_close(p, balanced_ce(o, resize_labels(labels, size), resize_labels(
            torch.ones(labels.shape), size)))
    torch.testing.assert_close(total, sum(parts))


def test_nan_message_points_at_the_balanced_loss():
    cfg = load_config(None, {"model": "tiny", "lr": 2e-4})
    said = _not_finite(float("nan"), 12, cfg)
    assert "step 12" in said and "--loss balanced-ce" in said and "lower --lr" in said
    balanced = load_config(None, {"model": "tiny", "loss": "balanced-ce"})
    assert "--loss balanced-ce" not in _not_finite(float("inf"), 3, balanced).split(";")[1]


def test_presets_choose_loss_averaging_and_pipeline():
    for model in ("clip-setr-naive", "clip-setr-pup", "clip-setr-mla"):
        cfg = load_config(None, {"model": model})
        assert (cfg.loss, cfg.loss_norm, cfg.augment, cfg.base_size, cfg.scale_min, cfg.scale_max) == \
            ("ce", "all", "mmseg", 520, 0.5, 2.0)
        assert (cfg.cat_max_ratio, cfg.photometric, cfg.test_size, cfg.test_crop, cfg.test_stride) == \
            (0.75, True, 520, 480, 320)
    for model in ("clip-linear", "deeplabv2-resnet101", "deeplabv3-resnet50"):
        cfg = load_config(None, {"model": model})
        assert (cfg.loss, cfg.loss_norm, cfg.augment, cfg.test_crop) == ("ce", "labelled", "clipes", None)
    assert load_config(None, {"model": "clip-setr-pup", "loss_norm": "labelled"}).loss_norm == "labelled"
    with pytest.raises(Exception, match="--loss"):
        load_config(None, {"model": "tiny", "loss": "focal"})
    with pytest.raises(Exception, match="deeplab-pytorch"):  # its MSC loss has its own averaging: not silently
        load_config(None, {"model": "deeplabv2-resnet101", "loss_norm": "all"})


def test_rescale_size_is_mmcv_imrescale():
    # a 500x375 VOC photo at ratio 1.5 of 520: target 780, factor 780 / 500 = 1.56
    assert rescale_size(375, 500, int(520 * 1.5)) == (int(375 * 1.56 + 0.5), 780) == (585, 780)
    assert rescale_size(500, 375, 260) == (260, int(375 * 260 / 500 + 0.5))
    assert rescale_size(100, 100, 520) == (520, 520)


def test_nearest_resize_reads_floor_of_the_scaled_index():
    a = np.arange(10)[None].repeat(3, 0)
    assert nearest_resize(a, 3, 4)[0].tolist() == [math.floor(i * 10 / 4) for i in range(4)]
    assert nearest_resize(a, 3, 20)[0].tolist() == [i // 2 for i in range(20)]


def test_cat_max_ratio_crop_keeps_the_first_balanced_draw():
    """mmseg's RandomCrop: the first of up to ten draws whose crop holds two or more labelled classes, none at
    75% or more of its labelled pixels; replayed from the same generator."""
    labels = np.ones((60, 90), np.int64)
    labels[:, 60:] = 2
    labels[:10] = 255

    def balanced(y0: int, x0: int) -> bool:
        values, counts = np.unique(labels[y0:y0 + 30, x0:x0 + 30], return_counts=True)
        counts = counts[values != 255]
        return len(counts) > 1 and counts.max() / counts.sum() < 0.75

    kept_balanced = 0
    for seed in range(30):
        ref = np.random.default_rng(seed)
        draws = [(int(ref.integers(0, 31)), int(ref.integers(0, 61))) for _ in range(11)]
        expected = next((d for d in draws[:10] if balanced(*d)), draws[10])
        corner = cat_max_crop(labels, 30, 0.75, np.random.default_rng(seed))
        assert corner == expected
        kept_balanced += balanced(*corner)
    assert kept_balanced >= 25  # most crops straddle the border, against 1 in 4 of the first draws


def test_cat_max_ratio_gives_up_after_ten_redraws():
    labels = np.ones((50, 50), np.int64)  # one class everywhere: no crop passes
    rng, ref = np.random.default_rng(5), np.random.default_rng(5)
    corner = cat_max_crop(labels, 20, 0.75, rng)
    draws = [(int(ref.integers(0, 31)), int(ref.integers(0, 31))) for _ in range(11)]
    assert corner == draws[-1]  # the first draw and ten more, the last kept unchecked (mmseg's loop)
    assert cat_max_crop(labels, 20, 1.0, np.random.default_rng(5)) == draws[0]  # off: the first draw


def test_hsv_round_trip_and_hue_turn():
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    back = _hsv_to_rgb(_rgb_to_hsv(rgb)).astype(int)
    # 8-bit hue is kept in 2-degree steps (OpenCV's form): rounding moves it by up to 1 degree, the middle channel
    # by up to chroma / 60 <= 4.25, and the rounding of S and of the output adds under one more
    assert np.abs(back - rgb).max() <= 5
    assert np.abs(back - rgb).mean() < 1
    red = np.array([[[255, 0, 0]]], np.uint8)
    hsv = _rgb_to_hsv(red)
    assert hsv.tolist() == [[[0, 255, 255]]]
    hsv[..., 0] = 60  # 120 degrees
    assert _hsv_to_rgb(hsv).tolist() == [[[0, 255, 0]]]


def test_mmseg_augment_pads_a_small_crop():
    rgb = np.full((40, 30, 3), 200, np.uint8)
    labels = np.zeros((40, 30), np.int64)
    labels[10:30, 5:25] = 1
    mean, std = np.full(3, 100, np.float32), np.full(3, 50, np.float32)
    settings = MmsegAugment(base=40, ratio_range=(1.0, 1.0), crop=64, photometric=False)
    x, lab, w = mmseg_augment(rgb, labels, np.ones((40, 30), np.float32), np.random.default_rng(0), settings, mean, std)
    assert x.shape == (3, 64, 64) and lab.shape == w.shape == (64, 64)
    assert (lab[40:] == 255).all() and (lab[:, 30:] == 255).all() and (x[:, 40:] == 0).all() and (w[40:] == 0).all()
    assert torch.allclose(x[:, :40, :30], torch.tensor(2.0)) and (lab[:40, :30] != 255).all()


def test_slide_windows_are_mmseg_grid():
    # a 500x375 VOC photo at SETR's test size: short side 520, 520x693; windows 480 every 320
    assert short_side_size(375, 500, 520) == (520, int(500 * 520 / 375 + 0.5)) == (520, 693)
    assert short_side_size(500, 375, 520) == (693, 520)
    assert slide_windows(390, 520, 480, 320) == [(0, 390, 0, 480), (0, 390, 40, 520)]
    assert slide_windows(520, 693, 480, 320) == [(0, 480, 0, 480), (0, 480, 213, 693), (40, 520, 0, 480),
                                                 (40, 520, 213, 693)]
    assert slide_windows(100, 100, 480, 320) == [(0, 100, 0, 100)]


def test_slide_logits_average_the_overlapping_windows():
    x = torch.arange(2 * 3 * 20 * 30, dtype=torch.float32).reshape(2, 3, 20, 30)
    torch.testing.assert_close(slide_logits(lambda w: w * 2, x, 12, 8), x * 2)  # a pixel-wise model: unchanged

    def offset(w):  # each window's logits: how many pixels it holds, so overlaps show the averaging
        return torch.full((w.shape[0], 1, *w.shape[-2:]), float(w.shape[-1] * w.shape[-2]))

    out = slide_logits(offset, x, 12, 8)
    assert out.shape == (2, 1, 20, 30) and torch.allclose(out, torch.tensor(144.0))


def test_train_seg_balanced_loss_and_the_nan_advice(tmp_path):
    from typer.testing import CliRunner

    from clipes.cli import app

    from .synthetic import make_dataset

    data = make_dataset(tmp_path / "data", n_train=4, n_val=0, size=32)
    base = [
        "train-seg", "--images", str(data / "images"), "--masks", str(data / "noisy"), "--classes",
        str(data / "classes.txt"), "--model", "tiny", "--batch-size", "2", "--crop", "32", "--workers", "0",
        "--device", "cpu"]
    runner = CliRunner()
    res = runner.invoke(app, [*base, "--steps", "2", "--loss", "balanced-ce", "--out", str(tmp_path / "bal")])
    assert res.exit_code == 0, res.output
    assert "loss: balanced-ce" in (tmp_path / "bal" / "config.yaml").read_text()
    res = runner.invoke(app, [*base, "--steps", "10", "--lr", "1e12", "--out", str(tmp_path / "nan")])
    assert res.exit_code == 2, res.output
    said = " ".join(res.output.split())
    assert "loss became" in said and "--loss balanced-ce" in said and "Traceback" not in said
