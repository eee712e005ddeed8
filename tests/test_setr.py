"""SETR's decoders on the CLIP ViT: the authors' structure, shapes, learning, the preset, train-seg and segment.

The expected parameter tables are written from the authors' code (fudan-zvg/SETR, commit f27d823), each
entry in the order their ``__init__`` registers it:

- ``mmseg/models/decode_heads/vit_up_head.py``, ``VisionTransformerUpHead.__init__`` lines 21-53: ``norm``
  (line 28, LayerNorm(embed_dim)), then with num_conv=2 ``conv_0`` (37: 3x3, or 39: 1x1, embed_dim -> 256),
  ``conv_1`` (40: 1x1 256 -> classes), ``syncbn_fc_0`` (41); with num_conv=4 ``conv_0..conv_3`` (44-47: 3x3
  to 256), ``conv_4`` (48: 1x1 to classes), ``syncbn_fc_0..3`` (50-53).
- ``mmseg/models/decode_heads/vit_mla_head.py``: ``MLAHead.__init__`` lines 18-35, ``head2..head5``, each
  conv3x3(256 -> 128, no bias), BN, ReLU, conv3x3(128 -> 128, no bias), BN, ReLU; ``VIT_MLAHead.__init__``
  lines 51-61: ``mlahead`` (60), ``cls`` (61: 3x3, 4 * 128 -> classes, with bias).
- ``mmseg/models/decode_heads/vit_mla_auxi_head.py``, ``VIT_MLA_AUXIHead.__init__`` lines 21-28: with
  in_channels 256, ``aux`` (28: 1x1 256 -> classes, no bias).
- ``mmseg/models/backbones/vit_mla.py``: ``Conv_MLA.__init__`` ``mla_p2_1x1..mla_p5_1x1`` (1x1 embed_dim ->
  256, no bias, BN, ReLU) then ``mla_p2..mla_p5`` (3x3 256 -> 256, no bias, BN, ReLU); ``VIT_MLA.__init__``
  registers ``mla`` before ``norm_0..norm_3`` (LayerNorm(embed_dim)).
- Every head is an mmseg ``BaseDecodeHead``, whose ``__init__`` (mmseg/models/decode_heads/decode_head.py,
  run first by each head's ``super().__init__``) adds ``conv_seg`` (1x1, channels=512 -> classes) that no
  SETR head's forward calls; the tables list it and the comparison leaves it out (``UNUSED``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from clipes.cli import app
from clipes.segment.heads.setr import SetrUpHead, setr_blocks
from clipes.segment.losses import segmentation_loss
from clipes.segment.optim import build_optimizer, poly_schedule
from clipes.segment.registry import build_segmenter
from clipes.segment.train import load_checkpoint, load_config

from .synthetic import make_dataset

runner = CliRunner()
MODELS = ("clip-setr-naive", "clip-setr-pup", "clip-setr-mla")
UNUSED = ("conv_seg.weight", "conv_seg.bias")
CONV_SEG_CHANNELS = 512  # `channels=512` of every decode and auxiliary head in configs/SETR/*
# CLIP ViT-B/16's vision tower (open_clip layout; random weights): the encoder the ViT-B configs map onto
VIT_B16 = {"width": 768, "layers": 12, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16, "image_size": 224,
           "output_dim": 512, "quick_gelu": True, "layer_scale": False}


def _bn(name: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{name}.weight", (c,)), (f"{name}.bias", (c,))]


def _conv(name: str, cout: int, cin: int, k: int, bias: bool = True) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{name}.weight", (cout, cin, k, k))] + ([(f"{name}.bias", (cout,))] if bias else [])


def _conv_seg(classes: int) -> list[tuple[str, tuple[int, ...]]]:
    return _conv("conv_seg", classes, CONV_SEG_CHANNELS, 1)


def authors_up_head(dim: int, classes: int, num_conv: int, conv3x3: bool) -> list[tuple[str, tuple[int, ...]]]:
    """VisionTransformerUpHead's parameters (vit_up_head.py lines 21-53)."""
    table = _conv_seg(classes) + _bn("norm", dim)
    if num_conv == 2:
        return table + _conv("conv_0", 256, dim, 3 if conv3x3 else 1) + _conv("conv_1", classes, 256, 1) + \
            _bn("syncbn_fc_0", 256)
    table += _conv("conv_0", 256, dim, 3) + [p for k in (1, 2, 3) for p in _conv(f"conv_{k}", 256, 256, 3)]
    return table + _conv("conv_4", classes, 256, 1) + [p for k in range(4) for p in _bn(f"syncbn_fc_{k}", 256)]


def authors_mla_neck(dim: int) -> list[tuple[str, tuple[int, ...]]]:
    """VIT_MLA's own decoder part: ``mla`` (Conv_MLA) then ``norm_0..3`` (vit_mla.py)."""
    table = [p for k in range(2, 6) for p in _conv(f"mla.mla_p{k}_1x1.0", 256, dim, 1, bias=False)
             + _bn(f"mla.mla_p{k}_1x1.1", 256)]
    table += [p for k in range(2, 6) for p in _conv(f"mla.mla_p{k}.0", 256, 256, 3, bias=False)
              + _bn(f"mla.mla_p{k}.1", 256)]
    return table + [p for k in range(4) for p in _bn(f"norm_{k}", dim)]


def authors_mla_head(classes: int) -> list[tuple[str, tuple[int, ...]]]:
    """VIT_MLAHead (vit_mla_head.py lines 18-35 and 51-61)."""
    table = _conv_seg(classes)
    for k in range(2, 6):
        table += _conv(f"mlahead.head{k}.0", 128, 256, 3, bias=False) + _bn(f"mlahead.head{k}.1", 128)
        table += _conv(f"mlahead.head{k}.3", 128, 128, 3, bias=False) + _bn(f"mlahead.head{k}.4", 128)
    return table + _conv("cls", classes, 4 * 128, 3)


def authors_mla_aux(classes: int) -> list[tuple[str, tuple[int, ...]]]:
    """VIT_MLA_AUXIHead with in_channels 256 (vit_mla_auxi_head.py lines 21-28)."""
    return _conv_seg(classes) + _conv("aux", classes, 256, 1, bias=False)


def _under(prefix: str, table: list[tuple[str, tuple[int, ...]]]) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.{name}", shape) for name, shape in table if name not in UNUSED]


def authors_decoder(model: str, dim: int, classes: int) -> list[tuple[str, tuple[int, ...]]]:
    """The whole decoder of the ViT-B/DeiT configs: decode_head -> head.decode, auxiliary_head.i ->
    head.auxiliary.i, VIT_MLA's mla and norm_k -> neck."""
    if model == "clip-setr-naive":  # SETR_Naive_DeiT_*: decode num_conv=2 1x1; 3 auxiliary heads, the same
        head = authors_up_head(dim, classes, 2, conv3x3=False)
        return _under("head.decode", head) + [p for i in range(3) for p in _under(f"head.auxiliary.{i}", head)]
    if model == "clip-setr-pup":  # SETR_PUP_DeiT_*: decode num_conv=4; 4 auxiliary num_conv=2 heads, 3x3
        aux = authors_up_head(dim, classes, 2, conv3x3=True)
        return _under("head.decode", authors_up_head(dim, classes, 4, conv3x3=True)) + \
            [p for i in range(4) for p in _under(f"head.auxiliary.{i}", aux)]
    return _under("neck", authors_mla_neck(dim)) + _under("head.decode", authors_mla_head(classes)) + \
        [p for i in range(4) for p in _under(f"head.auxiliary.{i}", authors_mla_aux(classes))]


def _decoder_params(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(p.shape)) for name, p in model.named_parameters() if not name.startswith("encoder.")]


@pytest.fixture(scope="module")
def tiny_clip_file(golden) -> str:
    return str(golden / "tiny-clip-vit-b16-random.pt")  # 12 blocks, width 128, patch 16


@pytest.mark.parametrize("model", MODELS)
def test_decoder_parameters_are_the_authors(model):
    """Names, shapes, order and count of every decoder parameter equal the authors' module's on CLIP
    ViT-B/16 (width 768) with VOC's 21 classes; the heads read the blocks of the ViT-B configs."""
    torch.manual_seed(0)
    m = build_segmenter(model, 21, clip_vision=VIT_B16)
    expected = authors_decoder(model, 768, 21)
    assert _decoder_params(m) == expected
    assert sum(p.numel() for n, p in m.named_parameters() if not n.startswith("encoder.")) == \
        sum(int(np.prod(s)) for _, s in expected)
    if model == "clip-setr-mla":
        assert m.neck.taps == (2, 5, 8, 11) and m.encoder.blocks == (2, 5, 8, 11)
        assert [h.in_index for h in m.head.auxiliary] == [0, 1, 2, 3]
    else:
        aux = (2, 5, 8) if model == "clip-setr-naive" else (4, 7, 9, 11)
        assert m.head.decode.in_index == 11 and tuple(h.in_index for h in m.head.auxiliary) == aux
    assert m.head.aux_weight == 0.4
    # SETR's norm_cfg is SyncBN: every norm of the decoder is a BatchNorm2d that torchrun's conversion catches
    bns = [k for k, mod in m.named_modules() if isinstance(mod, nn.BatchNorm2d)]
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(m)
    assert bns and [k for k, mod in synced.named_modules() if isinstance(mod, nn.SyncBatchNorm)] == bns


def test_block_indices_follow_the_vit_b_configs():
    assert setr_blocks((2, 5, 8, 11), 12) == (2, 5, 8, 11)
    assert setr_blocks((2, 5, 8, 11), 24) == (5, 11, 17, 23)  # SETR_MLA's ViT-L mla_index
    assert setr_blocks((4, 7, 9, 11), 24) == (9, 15, 19, 23)
    assert setr_blocks((2, 5, 8), 4) == (0, 1, 2)


def test_taps_are_the_clip_tokens_before_ln_post(tiny_clip_file):
    """The grid the heads read is the CLIP patch tokens of that block, row-major: with ln_post applied,
    the last block's grid is what clip-linear's encoder gives."""
    torch.manual_seed(0)
    setr = build_segmenter("clip-setr-naive", 3, clip_model=tiny_clip_file).eval()
    linear = build_segmenter("clip-linear", 3, clip_model=tiny_clip_file).eval()
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        grid = setr.encoder(x)[11]
        dense = linear.encoder(x)
    assert grid.shape == (1, 3, 5, 128)
    torch.testing.assert_close(setr.encoder.visual.ln_post(grid).permute(0, 3, 1, 2), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", MODELS)
def test_forward_shapes_at_non_square_sizes(model, tiny_clip_file):
    torch.manual_seed(0)
    m = build_segmenter(model, 4, clip_model=tiny_clip_file)
    x = torch.randn(2, 3, 48, 80)
    seen = {}
    if model == "clip-setr-mla":  # the 4x upsampling of each level, before the cls conv
        m.head.decode.cls.register_forward_hook(lambda mod, inp, out: seen.update(cls=tuple(inp[0].shape)))
    out = m(x)
    assert [w for w, _ in out] == [1.0] + [0.4] * len(m.head.auxiliary)
    assert all(tuple(o.shape) == (2, 4, 48, 80) for _, o in out)
    m.eval()
    with torch.no_grad():
        assert tuple(m(x).shape) == (2, 4, 48, 80)
        if model == "clip-setr-pup":  # PUP's four 2x stages give 16x the 3 x 5 grid by themselves
            assert tuple(m.head.decode(m.encoder(x), (1, 1)).shape) == (2, 4, 48, 80)
    if model == "clip-setr-mla":
        assert seen["cls"] == (2, 512, 12, 20)


def test_up_head_rejects_forms_setr_lacks():
    with pytest.raises(ValueError, match="num_conv=4, num_upsample=1"):
        SetrUpHead(64, 3, 0, num_conv=4, num_upsample=1)


def _fixed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 48, generator=g)
    y = torch.zeros(2, 32, 48, dtype=torch.long)
    y[:, :, 24:] = 1
    y[:, 8:24, 8:24] = 2
    y[:, :2] = 255
    x[:, 0] += y.float()  # a signal the encoder's tokens carry
    return x, y, torch.ones(2, 32, 48)


@pytest.mark.parametrize("model", MODELS)
def test_training_steps_on_a_fixed_batch_lower_the_loss(model, tiny_clip_file):
    """The preset's SGD (head x10) for 6 steps; the summed loss of the decode and auxiliary heads falls."""
    torch.manual_seed(0)
    m = build_segmenter(model, 3, clip_model=tiny_clip_file).train()
    cfg = load_config(None, {"model": model})
    opt = build_optimizer(m, cfg)
    x, y, w = _fixed_batch()
    norm = ((y != 255) * w).sum()
    losses = []
    for _ in range(6):
        loss = segmentation_loss(m(x), y, w, norm)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_setr_presets_follow_the_configs():
    """Pascal Context configs over mmseg's schedule_80k: SGD 0.9, wd 0, lr 1e-3 (naive 1e-2), x10 on heads,
    poly 0.9 to min_lr 1e-4, 80k steps, batch 16, crop 480; the CLIP encoder frozen as for the other clip-*."""
    for model, lr in (("clip-setr-naive", 1e-2), ("clip-setr-pup", 1e-3), ("clip-setr-mla", 1e-3)):
        cfg = load_config(None, {"model": model})
        assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.head_lr_mult, cfg.head_bias_lr_mult) == \
            ("sgd", lr, 0.9, 0.0, 10.0, 10.0)
        assert (cfg.min_lr, cfg.poly_power, cfg.steps, cfg.batch_size, cfg.crop, cfg.freeze_backbone) == \
            (1e-4, 0.9, 80000, 16, 480, True)
    assert load_config(None, {"model": "clip-linear"}).min_lr is None


def test_mla_neck_trains_at_the_backbone_rate_and_heads_at_ten_times(tiny_clip_file):
    """mmcv's custom_keys {'head': lr_mult 10} matches decode_head.* and auxiliary_head.*; VIT_MLA's neck
    (backbone.mla, backbone.norm_k) keeps the base lr. The poly schedule is mmcv's, floor min_lr, per group."""
    m = build_segmenter("clip-setr-mla", 3, clip_model=tiny_clip_file)
    cfg = load_config(None, {"model": "clip-setr-mla", "steps": 10})
    opt = build_optimizer(m, cfg)
    groups = [(g["lr"], {id(p) for p in g["params"]}) for g in opt.param_groups]
    assert [lr for lr, _ in groups] == [1e-3, pytest.approx(1e-2), pytest.approx(1e-2)]  # neck, head weights, biases
    assert groups[0][1] == {id(p) for p in m.neck.parameters()}
    assert groups[1][1] | groups[2][1] == {id(p) for p in m.head.parameters()}
    sched = poly_schedule(opt, 10, 0.9, cfg.min_lr)
    for step in range(10):
        for g, base in zip(opt.param_groups, (1e-3, 1e-2, 1e-2), strict=True):
            assert g["lr"] == pytest.approx((base - 1e-4) * (1 - step / 10) ** 0.9 + 1e-4, rel=1e-12)
        opt.step()
        sched.step()
    assert all(g["lr"] == pytest.approx(1e-4, rel=1e-12) for g in opt.param_groups)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("setr"), n_train=8, n_val=3)


@pytest.mark.parametrize("model", MODELS)
def test_train_seg_and_segment_from_the_cli(model, data, golden, tmp_path, monkeypatch):
    """train-seg writes a self-contained checkpoint (the CLIP file is gone when segment runs), and segment
    predicts from it at several scales with flips."""
    clip = tmp_path / "clip.pt"
    clip.write_bytes((golden / "tiny-clip-vit-b16-random.pt").read_bytes())
    run = tmp_path / "run"
    res = runner.invoke(app, ["train-seg", "--images", str(data / "images"), "--masks", str(data / "noisy"),
                              "--classes", str(data / "classes.txt"), "--model", model, "--clip-model", str(clip),
                              "--steps", "2", "--batch-size", "2", "--crop", "64", "--workers", "0",
                              "--device", "cpu", "--val-every", "2", "--val-images", str(data / "val_images"),
                              "--val-masks", str(data / "val_masks"), "--out", str(run)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["step"] == 2
    saved = load_checkpoint(run / "last.pt")
    assert any(k.startswith("encoder.visual.") for k in saved["model"])
    assert any(k.startswith("head.auxiliary.") for k in saved["model"])
    clip.unlink()
    monkeypatch.setenv("CLIPES_MODEL", str(tmp_path / "nonexistent.pt"))
    res = runner.invoke(app, ["segment", str(data / "val_images"), "--checkpoint", str(run / "last.pt"), "--out",
                              str(tmp_path / "pred"), "--device", "cpu", "--scales", "0.75,1", "--flip"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "pred").glob("*.png"))) == 3
