"""Segmenters composed of an encoder and a head, and the two whole networks that are not (a tiny net for
tests, torchvision's DeepLabV3). The exact DeepLab-v2 MSC of CLIP-ES is ``deeplabv2.py``.

Every model maps (B, 3, H, W) normalised images to (B, C, H, W) logits for any H, W (multiples of 16 for
the ViTs, which interpolate their positional embedding as ``clipes label`` does). In training mode a model
with auxiliary heads (SETR's) returns ``(loss weight, logits)`` pairs, its main logits first. Attribute
names are those of checkpoints: renaming one breaks every saved model.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .encoders.resnet import freeze_batchnorm
from .heads.aspp import ASPPv2

__all__ = ["DeepLab", "DeepLabV2", "EncoderDecoder", "Setr", "TinySegmenter"]


def _upsample(logits: Tensor, x: Tensor) -> Tensor:
    return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


class TinySegmenter(nn.Module):
    """A few strided convolutions with GroupNorm (no batch statistics, so DDP matches one process)."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(4, cout), nn.ReLU(inplace=True))

        self.encoder = nn.Sequential(block(3, width, 2), block(width, width, 1), block(width, 2 * width, 2),
                                     block(2 * width, 2 * width, 1))
        self.head = nn.Conv2d(2 * width, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return _upsample(self.head(self.encoder(x)), x)


class EncoderDecoder(nn.Module):
    """Encoder features -> head logits at feature resolution -> bilinear upsampling to the input."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: Tensor) -> Tensor:
        return _upsample(self.head(self.encoder(x)), x)


class Setr(nn.Module):
    """CLIP ViT block encoder -> (MLA neck) -> SETR decoder (``heads/setr.py``), every output at the input size."""

    def __init__(self, encoder: nn.Module, head: nn.Module, neck: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.neck = neck
        self.head = head

    def forward(self, x: Tensor) -> Tensor | list[tuple[float, Tensor]]:
        feats = self.encoder(x)
        return self.head(self.neck(feats) if self.neck is not None else feats, x.shape[-2:])


class DeepLab(nn.Module):
    """torchvision's DeepLabV3, returning the main output only; backbone BatchNorm frozen if asked."""

    def __init__(self, model: nn.Module, freeze_bn: bool = False) -> None:
        super().__init__()
        self.model = model
        self.freeze_bn = freeze_bn
        self.train()

    def train(self, mode: bool = True) -> DeepLab:
        super().train(mode)
        if self.freeze_bn:
            freeze_batchnorm(self.model.backbone)
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)["out"]


class DeepLabV2(nn.Module):
    """DeepLab-v2: a ResNet with dilated layer3/layer4 (output stride 8) and the ASPP-v2 head; logits are
    upsampled bilinearly to the input. Backbone BatchNorm frozen if asked, as deeplab-pytorch does."""

    def __init__(self, backbone: nn.Module, num_classes: int, freeze_bn: bool = True) -> None:
        super().__init__()
        backbone.fc, backbone.avgpool = nn.Identity(), nn.Identity()
        self.backbone = backbone
        self.head = ASPPv2(backbone.layer4[-1].conv3.out_channels, num_classes)
        self.freeze_bn = freeze_bn
        self.train()

    def train(self, mode: bool = True) -> DeepLabV2:
        super().train(mode)
        if self.freeze_bn:
            freeze_batchnorm(self.backbone)
        return self

    def forward(self, x: Tensor) -> Tensor:
        b = self.backbone
        f = b.layer4(b.layer3(b.layer2(b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x))))))))
        return _upsample(self.head(f), x)
