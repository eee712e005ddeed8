"""deeplab-pytorch's ``DeepLabV2_ResNet101_MSC``, the segmenter CLIP-ES trained, layer for layer.

The MSRA/Caffe ResNet-101 (stride in each downsampling block's 1x1 ``reduce`` conv, 7x7 stem with a
``ceil_mode`` max-pool, layer4/layer5 dilated 2/4 in every block), DeepLab-v2's ASPP (four 3x3 convs of
rates 6, 12, 18, 24 summed), and MSC: logits of the input and of the input scaled 0.5 and 0.75, with
their pixel-wise max. Module names are deeplab-pytorch's, so a ``convert.py`` state dict (the Caffe init
weights) loads as it is. Inputs are BGR minus the Caffe mean, not divided by a std
(``../shared/deeplab-reference.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import ClipesError
from ..masks import IGNORE
from ..weights import check_finite

__all__ = ["CAFFE_MEAN_BGR", "DeepLabV2MSC", "InitReport", "caffe_input", "load_deeplab_weights", "msc_loss",
           "resize_labels"]

CAFFE_MEAN_BGR = (104.008, 116.669, 122.675)  # deeplab-pytorch's configs/voc12.yaml IMAGE.MEAN (B, G, R)


def caffe_input(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB pixels (0-255) -> float32 BGR minus the Caffe mean, HWC, as deeplab-pytorch's dataset:
    the float32 image minus the float64 mean, rounded once to float32."""
    return (np.asarray(rgb, dtype=np.float32)[..., ::-1] - np.asarray(CAFFE_MEAN_BGR)).astype(np.float32)


class ConvBnReLU(nn.Sequential):
    """conv (no bias) -> BatchNorm (eps 1e-5, momentum 0.001 as Caffe's 0.999 average) -> optional ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int, dilation: int,
                 relu: bool = True) -> None:
        super().__init__()
        self.add_module("conv", nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout, eps=1e-5, momentum=1 - 0.999))
        if relu:
            self.add_module("relu", nn.ReLU())


class Bottleneck(nn.Module):
    """MSRA bottleneck: the stride sits in the 1x1 ``reduce`` conv; projection shortcut in a layer's first block."""

    def __init__(self, cin: int, cout: int, stride: int, dilation: int, project: bool) -> None:
        super().__init__()
        mid = cout // 4
        self.reduce = ConvBnReLU(cin, mid, 1, stride, 0, 1)
        self.conv3x3 = ConvBnReLU(mid, mid, 3, 1, dilation, dilation)
        self.increase = ConvBnReLU(mid, cout, 1, 1, 0, 1, relu=False)
        self.shortcut = ConvBnReLU(cin, cout, 1, stride, 0, 1, relu=False) if project else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.increase(self.conv3x3(self.reduce(x)))
        h += self.shortcut(x)
        return F.relu(h)


class ResLayer(nn.Sequential):
    """``n`` bottlenecks ``block1..blockN``; the first projects and strides, every one has the dilation."""

    def __init__(self, n: int, cin: int, cout: int, stride: int, dilation: int) -> None:
        super().__init__()
        for i in range(n):
            self.add_module(f"block{i + 1}", Bottleneck(cin if i == 0 else cout, cout, stride if i == 0 else 1,
                                                        dilation, i == 0))


class Stem(nn.Sequential):
    """7x7/2 conv + BN + ReLU, then a 3x3/2 max-pool with ``ceil_mode`` (neither MSRA's nor FAIR's pool)."""

    def __init__(self, cout: int) -> None:
        super().__init__()
        self.add_module("conv1", ConvBnReLU(3, cout, 7, 2, 3, 1))
        self.add_module("pool", nn.MaxPool2d(3, 2, 1, ceil_mode=True))


class ASPP(nn.Module):
    """DeepLab-v2's ASPP: 3x3 convs ``c0..c3`` at the given rates straight to class scores, summed;
    weights N(0, 0.01), biases 0."""

    def __init__(self, cin: int, num_classes: int, rates: Sequence[int]) -> None:
        super().__init__()
        for i, rate in enumerate(rates):
            self.add_module(f"c{i}", nn.Conv2d(cin, num_classes, 3, 1, padding=rate, dilation=rate, bias=True))
        for conv in self.children():
            nn.init.normal_(conv.weight, mean=0, std=0.01)
            nn.init.constant_(conv.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        return sum([conv(x) for conv in self.children()])


class DeepLabV2MSC(nn.Module):
    """DeepLab-v2 ResNet-101 (output stride 8) with multi-scale inputs.

    ``msc(x)`` gives deeplab-pytorch's training outputs [full, 0.5, 0.75, max] at their own sizes.
    ``forward`` gives the same list in training mode; in eval mode, the max upsampled bilinearly to the
    input (what ``main.py test`` arg-maxes), so that it serves as any clipes segmenter. BatchNorm is
    frozen (eval mode, no gradient) when ``freeze_bn``, as deeplab-pytorch trains it.
    """

    def __init__(self, num_classes: int, blocks: Sequence[int] = (3, 4, 23, 3), rates: Sequence[int] = (6, 12, 18, 24),
                 scales: Sequence[float] = (0.5, 0.75), freeze_bn: bool = True) -> None:
        super().__init__()
        ch = [64 * 2 ** p for p in range(6)]
        self.layer1 = Stem(ch[0])
        self.layer2 = ResLayer(blocks[0], ch[0], ch[2], 1, 1)
        self.layer3 = ResLayer(blocks[1], ch[2], ch[3], 2, 1)
        self.layer4 = ResLayer(blocks[2], ch[3], ch[4], 1, 2)
        self.layer5 = ResLayer(blocks[3], ch[4], ch[5], 1, 4)
        self.aspp = ASPP(ch[5], num_classes, rates)
        self.scales = tuple(scales)
        self.freeze_bn = freeze_bn
        if freeze_bn:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> DeepLabV2MSC:
        super().train(mode)
        if self.freeze_bn:  # SyncBatchNorm too (DDP on GPUs converts the layers)
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def base(self, x: Tensor) -> Tensor:
        """Single-scale DeepLab-v2 logits at 1/8 of the input (rounded up)."""
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4, self.layer5, self.aspp):
            x = layer(x)
        return x

    def msc(self, x: Tensor) -> list[Tensor]:
        """[logits of x, of x scaled by each of ``scales``, their pixel-wise max at the first's size]."""
        logits = self.base(x)
        pyramid = [self.base(F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False))
                   for s in self.scales]
        size = logits.shape[-2:]
        stacked = torch.stack([logits] + [F.interpolate(p, size=size, mode="bilinear", align_corners=False)
                                          for p in pyramid])
        return [logits, *pyramid, torch.max(stacked, dim=0)[0]]

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        outputs = self.msc(x)
        if self.training:
            return outputs
        return F.interpolate(outputs[-1], size=x.shape[-2:], mode="bilinear", align_corners=False)


def resize_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, H, W) labels (or weights) resized to ``size`` (h, w) by PIL NEAREST on their float values, as
    deeplab-pytorch's ``resize_labels``; on the CPU, returned with the input's dtype."""
    h, w = size
    out = [np.asarray(Image.fromarray(t.numpy().astype(np.float32)).resize((w, h), Image.Resampling.NEAREST))
           for t in labels.cpu()]
    return torch.from_numpy(np.stack(out)).to(labels.dtype)


def msc_loss(outputs: Sequence[Tensor], labels: Tensor, weights: Tensor, world: int = 1, loss: str = "ce"
             ) -> tuple[Tensor, list[Tensor]]:
    """deeplab-pytorch's loss of one forward: for each output, the cross-entropy (255 ignored) against the
    labels resized to that output by PIL NEAREST, averaged over its labelled pixels (weighted by the CRF
    confidence when given; 1 otherwise), summed over the outputs. ``labels``/``weights`` are the (B, H, W)
    crops on the CPU. With ``world`` > 1 (DDP, which averages gradients over processes) each average is
    over the labelled pixels of every process, as one process with the whole batch would take it.
    ``loss`` "balanced-ce": each output's class-balanced cross-entropy (``losses.balanced_ce``, per process)
    instead. Returns (sum, per-output losses)."""
    device = outputs[0].device
    if loss == "balanced-ce":
        from .losses import balanced_ce

        parts = [balanced_ce(o, resize_labels(labels, tuple(o.shape[-2:])).to(device, non_blocking=True),
                             resize_labels(weights, tuple(o.shape[-2:])).to(device, non_blocking=True))
                 for o in outputs]
        return sum(parts), parts
    terms, counts = [], []
    for logits in outputs:
        size = tuple(logits.shape[-2:])
        lab = resize_labels(labels, size).to(device, non_blocking=True)
        wgt = resize_labels(weights, size).to(device, non_blocking=True) * (lab != IGNORE)
        ce = F.cross_entropy(logits.float(), lab, ignore_index=IGNORE, reduction="none")
        terms.append((ce * wgt).sum())
        counts.append(wgt.sum())
    count = torch.stack(counts)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(count)
        count = count / world
    parts = [t / c.clamp_min(1e-6) for t, c in zip(terms, count, strict=True)]
    return sum(parts), parts


@dataclass
class InitReport:
    """What ``load_deeplab_weights`` did: keys loaded, keys of the file it skipped, model keys left at init."""

    source: str
    used: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def summary(self, limit: int = 6) -> str:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")

        text = f"{self.source}: loaded {len(self.used)} tensors"
        if self.skipped:
            text += (f"; skipped {len(self.skipped)} of the file (not in this model, or another shape): "
                     f"{few(self.skipped)}")
        if self.missing:
            text += f"; left at their initial values: {few(self.missing)}"
        return text


def load_deeplab_weights(model: DeepLabV2MSC, path: str) -> InitReport:
    """Load a deeplab-pytorch state dict (``convert.py``'s Caffe init, a ``main.py`` checkpoint: keys with or
    without ``base.``/``module.``) into ``model`` as deeplab-pytorch's ``main.py`` does (``strict=False``):
    keys of the model with the file's shape are loaded, the others reported."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, empty or foreign file: one message
        raise ClipesError(f"--backbone-weights {path}: cannot read ({' '.join(str(e).split())[:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ClipesError(f"--backbone-weights {path}: not a state dict")
    check_finite(state.items(), f"--backbone-weights {path}")
    own = model.state_dict()
    report = InitReport(path)
    chosen = {}
    for key, value in state.items():
        name = key.removeprefix("module.").removeprefix("base.")
        if name in own and own[name].shape == value.shape:
            chosen[name] = value
            report.used.append(name)
        else:
            report.skipped.append(key)
    if not any(k.startswith("layer") for k in chosen):
        raise ClipesError(f"--backbone-weights {path}: not a deeplab-pytorch DeepLab-v2 state dict (none of its "
                          f"{len(state)} keys, e.g. {next(iter(state), '-')}, is a layer of the model, such as "
                          "layer1.conv1.conv.weight)")
    model.load_state_dict(chosen, strict=False)
    report.missing = [k for k in own if k not in chosen]
    return report
