"""The DeepLab preset is the recipe CLIP-ES used (deeplab-pytorch's VOC config, reference section 6):
whole network trained, backbone BatchNorm frozen, SGD 0.9, poly 0.9, lr 2e-4 with 10x head weights and
20x head biases (no decay on those), wd 5e-4, batch 10 as 5 x 2, crop 321, 20k steps, scales 0.5-1.5."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from clipes.errors import ClipesError
from clipes.segment.data import SegDataset, deeplab_augment, pair_folders
from clipes.segment.deeplabv2 import DeepLabV2MSC, caffe_input, msc_loss, resize_labels
from clipes.segment.optim import build_optimizer, poly_schedule
from clipes.segment.registry import build_segmenter
from clipes.segment.segmenters import DeepLabV2
from clipes.segment.train import TrainConfig, load_checkpoint, load_config, train

from .synthetic import make_dataset


def _build(name: str, **kw) -> tuple[nn.Module, TrainConfig]:
    cfg = load_config(None, {"model": name, "backbone_weights": "random", **kw})
    model = build_segmenter(name, 21, freeze_backbone=cfg.freeze_backbone, backbone_weights="random",
                            freeze_bn=cfg.freeze_bn)
    return model, cfg


def _backbone(model: nn.Module) -> nn.Module:
    return model.backbone if isinstance(model, DeepLabV2) else model.model.backbone


@pytest.mark.parametrize("name", ["deeplabv2-resnet101-torchvision", "deeplabv3-resnet50"])
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
    model, cfg = _build("deeplabv2-resnet101-torchvision")
    assert [c.dilation for c in model.head.branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    opt = build_optimizer(model, cfg)
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
    model, cfg = _build("deeplabv2-resnet101-torchvision")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    opt = build_optimizer(model, cfg)
    loss = model(torch.randn(2, 3, 33, 33)).square().mean()
    loss.backward()
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.eval()
    model.train()  # eval/train around validation keeps them frozen
    assert all(not m.training for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))


def test_poly_schedule_keeps_the_head_multipliers():
    model, cfg = _build("deeplabv2-resnet101-torchvision", steps=10)
    opt = build_optimizer(model, cfg)
    sched = poly_schedule(opt, cfg.steps, cfg.poly_power)
    for _ in range(4):
        opt.step()
        sched.step()
    factor = (1 - 4 / 10) ** 0.9
    assert sched.get_last_lr() == pytest.approx([2e-4 * factor, 2e-3 * factor, 4e-3 * factor])


def test_freeze_flag_still_freezes_the_backbone():
    model, _ = _build("deeplabv2-resnet101-torchvision", freeze_backbone=True)
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


# deeplabv2-resnet101: deeplab-pytorch's DeepLabV2_ResNet101_MSC and main.py's recipe (numbers: test_deeplab_reference)

def test_msc_model_parameter_groups_are_main_pys():
    """get_params: 1x every conv weight of layer1..layer5, 10x the ASPP weights, 20x the ASPP biases without
    decay; BatchNorm in no group and in eval mode."""
    model, cfg = _build("deeplabv2-resnet101")
    assert isinstance(model, DeepLabV2MSC) and cfg.poly_step == 10 and model.scales == (0.5, 0.75)
    opt = build_optimizer(model, cfg)
    convs = [m for n, m in model.named_modules() if n.startswith("layer") and isinstance(m, nn.Conv2d)]
    aspp = [model.aspp.c0, model.aspp.c1, model.aspp.c2, model.aspp.c3]
    expected = [{id(m.weight) for m in convs}, {id(m.weight) for m in aspp}, {id(m.bias) for m in aspp}]
    assert [{id(p) for p in g["params"]} for g in opt.param_groups] == expected
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [
        (pytest.approx(2e-4), 5e-4), (pytest.approx(2e-3), 5e-4), (pytest.approx(4e-3), 0.0)]
    assert len(convs) == 104 and all(m.bias is None for m in convs)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training and not m.weight.requires_grad for m in bns)
    assert [c.dilation for c in aspp] == [(6, 6), (12, 12), (18, 18), (24, 24)]


def test_poly_rate_changes_every_ten_iterations_as_deeplab_pytorch():
    """libs/utils/lr_scheduler.py's PolynomialLR, stepped by main.py with scheduler.step(epoch=iteration):
    after iteration i the rate becomes base * (1 - i / iter_max) ** 0.9 when i % 10 == 0, else stays."""
    model, cfg = _build("deeplabv2-resnet101", steps=100)
    opt = build_optimizer(model, cfg)
    sched = poly_schedule(opt, cfg.steps, cfg.poly_power, every=cfg.poly_step)
    ref_lr = 2e-4
    for i in range(1, 36):
        assert sched.get_last_lr()[0] == pytest.approx(ref_lr, rel=1e-12)  # the rate iteration i trains with
        opt.step()
        sched.step()
        if i % 10 == 0:
            ref_lr = 2e-4 * (1 - i / 100) ** 0.9


def test_resize_labels_is_pil_nearest_per_output():
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 21, (2, 33, 33))).long()
    labels[:, :4] = 255
    for size in ((5, 5), (17, 17), (9, 13)):
        got = resize_labels(labels, size)
        for b in range(2):
            ref = np.asarray(Image.fromarray(labels[b].numpy().astype(np.float32)).resize(size[::-1], Image.NEAREST))
            assert np.array_equal(got[b].numpy(), ref.astype(np.int64))
        assert got.dtype == torch.int64


def test_msc_loss_is_the_sum_of_per_output_means():
    torch.manual_seed(0)
    outputs = [torch.randn(2, 4, s, s) for s in (5, 3, 4, 5)]
    labels = torch.randint(0, 4, (2, 33, 33))
    labels[0, :10] = 255
    total, parts = msc_loss(outputs, labels, torch.ones(labels.shape))
    for out, part in zip(outputs, parts, strict=True):  # nn.CrossEntropyLoss(ignore_index=255), mean reduction
        ref = nn.CrossEntropyLoss(ignore_index=255)(out, resize_labels(labels, tuple(out.shape[-2:])))
        torch.testing.assert_close(part, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(total, sum(parts))


def test_deeplab_augmentation_order_and_rounding():
    """Sides truncated (int(h * s)), padding at the bottom/right with the mean (0 after subtraction) and 255,
    a crop of the padded image, then the flip; an unscaled crop is the image minus the mean, bit for bit."""
    rng_img = np.random.default_rng(1)
    rgb = rng_img.integers(0, 256, (21, 30, 3), dtype=np.uint8)
    labels = rng_img.integers(0, 5, (21, 30)).astype(np.int64)
    weight = np.ones((21, 30), np.float32)
    x, lab, w = deeplab_augment(rgb, labels, weight, np.random.default_rng(0), [0.75], crop=25, flip=False)
    assert x.shape == (3, 25, 25) and lab.shape == (25, 25)
    assert int((lab != 255).any(1).sum()) == 15 and int((lab != 255).any(0).sum()) == 22  # int(21*.75), int(30*.75)
    assert float(x[:, 15:].abs().max()) < 1e-5 and int(w.sum()) == 15 * 22
    # scale 1, no padding needed: a crop of caffe_input
    for seed in range(4):
        x, lab, _ = deeplab_augment(rgb, labels, weight, np.random.default_rng(seed), [1.0], crop=20, flip=True)
        full = torch.from_numpy(caffe_input(rgb)).permute(2, 0, 1)
        hits = [(y, x0, f) for y in range(2) for x0 in range(11) for f in (False, True)
                if torch.equal(x, (full[:, y:y + 20, x0:x0 + 20].flip(-1) if f else full[:, y:y + 20, x0:x0 + 20]))]
        assert hits


def test_caffe_input_is_bgr_minus_the_mean():
    rgb = np.array([[[10, 20, 30]]], dtype=np.uint8)
    np.testing.assert_array_equal(caffe_input(rgb), np.float32([[[30 - 104.008, 20 - 116.669, 10 - 122.675]]]))


def test_deeplab_pytorch_state_dict_loads_as_it_is(tmp_path, capsys):
    """convert.py's layout loads key for key (with or without main.py's 'base.'), the report names what was
    used and skipped; a torchvision ResNet file is refused with a message; no init file is an error."""
    ref = DeepLabV2MSC(91, freeze_bn=True)  # the COCO init: 91 classes, so its ASPP does not fit 21
    state = {k: v + 0.5 for k, v in ref.state_dict().items() if "num_batches_tracked" not in k}
    state["fc.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "coco_init.pth")
    model = build_segmenter("deeplabv2-resnet101", 21, backbone_weights=str(tmp_path / "coco_init.pth"))
    torch.testing.assert_close(model.layer1.conv1.conv.weight, state["layer1.conv1.conv.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.layer5.block3.increase.bn.running_var,
                               state["layer5.block3.increase.bn.running_var"], rtol=0, atol=0)
    report = model.init_report
    assert "aspp.c0.weight" in report.skipped and "fc.weight" in report.skipped
    assert "aspp.c0.weight" in report.missing and len(report.used) == len(state) - 9
    assert "skipped 9" in report.summary()
    torch.save({"base." + k: v for k, v in ref.state_dict().items()}, tmp_path / "voc.pth")
    model = build_segmenter("deeplabv2-resnet101", 91, backbone_weights=str(tmp_path / "voc.pth"))
    assert not model.init_report.skipped and not model.init_report.missing
    from torchvision.models import resnet50

    torch.save(resnet50().state_dict(), tmp_path / "tv.pth")
    with pytest.raises(ClipesError, match="not a deeplab-pytorch DeepLab-v2 state dict"):
        build_segmenter("deeplabv2-resnet101", 21, backbone_weights=str(tmp_path / "tv.pth"))
    with pytest.raises(ClipesError, match="--backbone-weights FILE"):
        build_segmenter("deeplabv2-resnet101", 21)


def test_train_seg_and_segment_with_the_msc_model(data, tmp_path):
    """train-seg --model deeplabv2-resnet101 from a deeplab-pytorch file: the report of the keys it used,
    the logged loss of a step is main.py's (per part: the sum of the four outputs' means, / the parts),
    and segment predicts with the MSC max."""
    from typer.testing import CliRunner

    from clipes.cli import app
    from clipes.segment.data import PositionSampler

    torch.save(DeepLabV2MSC(91).state_dict(), tmp_path / "init.pth")
    out = tmp_path / "run"
    args = ["train-seg", "--model", "deeplabv2-resnet101", "--images", str(data / "images"), "--masks",
            str(data / "noisy"), "--classes", str(data / "classes.txt"), "--val-images", str(data / "val_images"),
            "--val-masks", str(data / "val_masks"), "--backbone-weights", str(tmp_path / "init.pth"),
            "--crop", "33", "--batch-size", "2", "--accumulate", "2", "--steps", "1", "--workers", "0",
            "--device", "cpu", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    assert "loaded" in said and "aspp.c0.weight" in said  # the 91-class ASPP of the file is skipped
    logged = json.loads((out / "log.jsonl").read_text().splitlines()[0])["loss"]

    cfg = load_config(None, {"model": "deeplabv2-resnet101", "backbone_weights": str(tmp_path / "init.pth"),
                             "crop": 33, "batch_size": 2, "accumulate": 2})
    torch.manual_seed(0)
    model = build_segmenter("deeplabv2-resnet101", 3, backbone_weights=str(tmp_path / "init.pth")).train()
    ds = SegDataset(pair_folders(data / "images", data / "noisy"), (0, 0, 0), (1, 1, 1), train=True, crop=33,
                    scales=cfg.scales, recipe="deeplab-pytorch")
    keys = next(iter(PositionSampler(len(ds), 2, 1)))
    total = 0.0
    with torch.no_grad():
        for key in keys:  # accumulate 2: one sample per part
            x, lab, w = ds[key]
            total += float(msc_loss(model(x[None]), lab[None], w[None])[0]) / 2
    assert logged == pytest.approx(total, rel=1e-5)

    res = CliRunner().invoke(app, ["segment", str(data / "val_images"), "--checkpoint", str(out / "last.pt"),
                                   "--out", str(tmp_path / "pred"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "pred").glob("*.png"))) == len(list((data / "val_images").iterdir()))
