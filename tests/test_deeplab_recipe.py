"""The DeepLab preset is the recipe CLIP-ES used (deeplab-pytorch's VOC config, reference section 6):
whole network trained, backbone BatchNorm frozen, SGD 0.9, poly 0.9, lr 2e-4 with 10x head weights and
20x head biases (no decay on those), wd 5e-4, batch 10 as 5 x 2, crop 321, 20k steps, scales 0.5-1.5."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from clipes.errors import ClipesError
from clipes.segment.data import SegDataset, pair_folders
from clipes.segment.models import DeepLabV2, build_segmenter
from clipes.segment.train import TrainConfig, _optimizer, load_checkpoint, load_config, poly_schedule, train

from .synthetic import make_dataset


def _build(name: str, **kw) -> tuple[nn.Module, TrainConfig]:
    cfg = load_config(None, {"model": name, "backbone_weights": "random", **kw})
    model = build_segmenter(name, 21, freeze_backbone=cfg.freeze_backbone, backbone_weights="random",
                            freeze_bn=cfg.freeze_bn)
    return model, cfg


def _backbone(model: nn.Module) -> nn.Module:
    return model.backbone if isinstance(model, DeepLabV2) else model.model.backbone


@pytest.mark.parametrize("name", ["deeplabv2-resnet101", "deeplabv3-resnet50"])
def test_the_whole_network_trains_except_backbone_batchnorm(name):
    model, cfg = _build(name)
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.poly_power) == ("sgd", 2e-4, 0.9, 5e-4, 0.9)
    assert (cfg.batch_size, cfg.accumulate, cfg.crop, cfg.steps) == (10, 2, 321, 20000)
    assert cfg.scales == [0.5, 0.75, 1.0, 1.25, 1.5] and not cfg.freeze_backbone and cfg.freeze_bn
    backbone = _backbone(model)
    bn = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    bn_params = {id(p) for m in bn for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in model.parameters() if not p.requires_grad} == bn_params  # BN only is frozen
    total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in trainable)
    assert n_train == total - sum(p.numel() for m in bn for p in m.parameters())
    if name == "deeplabv3-resnet50":  # the figure: 39.6M in all, of which only 16.1M trained before
        assert 39.5e6 < total < 39.7e6 and n_train > 39.5e6
    model.train()
    assert all(not m.training for m in bn) and model.training
    head_bn = [m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and "classifier" in n]
    assert all(m.training for m in head_bn)  # DeepLabV3's head keeps training its own BatchNorm


def test_deeplab_v2_parameter_groups_and_aspp():
    model, cfg = _build("deeplabv2-resnet101")
    assert [c.dilation for c in model.head.branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    opt = _optimizer(model, cfg)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    groups = [(g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups]
    n_backbone = sum(1 for p in model.backbone.parameters() if p.requires_grad)
    assert groups == [(pytest.approx(2e-4), 5e-4, n_backbone), (pytest.approx(2e-3), 5e-4, 4),
                      (pytest.approx(4e-3), 0.0, 4)]
    head_biases = {id(c.bias) for c in model.head.branches}
    assert {id(p) for p in opt.param_groups[2]["params"]} == head_biases
    # ResNet-101 backbone: every conv weight trains (its convolutions have no biases), no BN parameter does
    convs = [m.weight for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in convs}
    # 44,549,160 parameters of ResNet-101, less fc (2,049,000) and the BatchNorm affine ones (105,344)
    assert sum(p.numel() for p in convs) == 42_394_816 and len(convs) == 104


def test_frozen_batchnorm_statistics_do_not_move_in_training():
    model, cfg = _build("deeplabv2-resnet101")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    opt = _optimizer(model, cfg)
    loss = model(torch.randn(2, 3, 33, 33)).square().mean()
    loss.backward()
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.eval()
    model.train()  # eval/train around validation keeps them frozen
    assert all(not m.training for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))


def test_poly_schedule_keeps_the_head_multipliers():
    model, cfg = _build("deeplabv2-resnet101", steps=10)
    opt = _optimizer(model, cfg)
    sched = poly_schedule(opt, cfg.steps, cfg.poly_power)
    for _ in range(4):
        opt.step()
        sched.step()
    factor = (1 - 4 / 10) ** 0.9
    assert sched.get_last_lr() == pytest.approx([2e-4 * factor, 2e-3 * factor, 4e-3 * factor])


def test_freeze_flag_still_freezes_the_backbone():
    model, _ = _build("deeplabv2-resnet101", freeze_backbone=True)
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())


def test_backbone_from_a_user_file(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(1)
    ref = resnet50()
    torch.save(ref.state_dict(), tmp_path / "r50.pth")
    model = build_segmenter("deeplabv3-resnet50", 3, backbone_weights=str(tmp_path / "r50.pth"))
    torch.testing.assert_close(model.model.backbone.conv1.weight, ref.conv1.weight, rtol=0, atol=0)
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ClipesError, match="not a torchvision ResNet-50"):
        build_segmenter("deeplabv3-resnet50", 3, backbone_weights=str(tmp_path / "bad.pth"))
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ClipesError, match="--backbone-weights .*cannot read"):
        build_segmenter("deeplabv2-resnet101", 3, backbone_weights=str(tmp_path / "empty.pth"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("recipe"), n_train=8, n_val=2, size=32)


def test_scales_are_drawn_from_the_list(data):
    items = pair_folders(data / "images", data / "masks")
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    for scales, area in (([0.5], 16 * 16), ([1.0], 32 * 32)):
        ds = SegDataset(items, mean, std, train=True, crop=32, scales=scales)
        assert all(float(ds[(i, i)][2].sum()) == area for i in range(len(items)))  # weights: 1 inside, 0 padding
    ds = SegDataset(items, mean, std, train=True, crop=32, scales=[0.5, 1.0])
    assert {float(ds[(i % 8, i)][2].sum()) for i in range(40)} == {256.0, 1024.0}


def test_accumulated_batches_end_with_the_weights_of_whole_batches(data, tmp_path):
    base = dict(images=str(data / "images"), masks=str(data / "noisy"), classes=str(data / "classes.txt"),
                model="tiny", optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=8, crop=32,
                steps=3, workers=0, device="cpu", val_every=100)
    train(TrainConfig(out=str(tmp_path / "whole"), accumulate=1, **base))
    train(TrainConfig(out=str(tmp_path / "parts"), accumulate=4, **base))
    a = load_checkpoint(tmp_path / "whole" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "parts" / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    with pytest.raises(ClipesError, match="--accumulate"):
        load_config(None, {**base, "accumulate": 3})
