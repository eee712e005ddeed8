"""Segmenters chosen by name (``train-seg --model``): each an encoder and a head composed by its builder.

``SEGMENTERS`` maps a name to a ``SegmenterSpec``: the builder, the optimiser preset, the input stride and
normalisation. Encoders live in ``encoders/``, heads in ``heads/``, their compositions in ``segmenters.py``;
the exact DeepLab-v2 MSC of CLIP-ES in ``deeplabv2.py``. A new model is a builder and a line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import nn

from ..errors import ClipesError
from ..images import CLIP_MEAN, CLIP_STD
from .deeplabv2 import DeepLabV2MSC, caffe_input, load_deeplab_weights
from .encoders.clip import ClipBlockEncoder, ClipDenseEncoder, clip_visual
from .encoders.resnet import IMAGENET_MEAN, IMAGENET_STD, dilated_resnet101, load_resnet_weights
from .heads.linear import LinearHead
from .heads.mask_transformer import MaskTransformerHead
from .heads.setr import setr_heads
from .segmenters import DeepLab, DeepLabV2, EncoderDecoder, Setr, TinySegmenter

__all__ = ["HEAD_PREFIXES", "SEGMENTERS", "SegmenterSpec", "build_segmenter", "head_parameters"]


@dataclass(frozen=True)
class SegmenterSpec:
    """What ``train-seg`` and ``segment`` need to know about a model family: its optimiser preset,
    input stride (whole images are padded to a multiple; 1: any size as it is) and the per-channel mean
    and std its inputs are normalised with (RGB in [0, 1]), or ``recipe`` "deeplab-pytorch": that code's
    input (BGR minus the Caffe mean), augmentation and multi-output loss."""

    build: Callable[..., nn.Module]
    preset: str
    stride: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    recipe: str = "clipes"  # "deeplab-pytorch": its BGR minus mean input, augmentation and multi-output loss

    def normalize(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) RGB pixels 0-255 -> the model's float32 (H, W, 3) input."""
        if self.recipe == "deeplab-pytorch":
            return caffe_input(rgb)
        mean, std = np.asarray(self.mean, np.float32) * 255, np.asarray(self.std, np.float32) * 255
        return (np.asarray(rgb, dtype=np.float32) - mean) / std


# Every builder takes (num_classes, clip_model, freeze_backbone, backbone_weights, freeze_bn, clip_vision) by
# keyword and ignores what does not concern its family (the ResNet options for CLIP models and the reverse).

def _clip(head: str):
    def build(num_classes: int, clip_model: str | None = None, freeze_backbone: bool = True,
              backbone_weights: str | None = None, freeze_bn: bool = False,
              clip_vision: dict | None = None) -> nn.Module:
        encoder = ClipDenseEncoder(clip_visual(clip_model, clip_vision), frozen=freeze_backbone)
        module = LinearHead(encoder.dim, num_classes) if head == "linear" else MaskTransformerHead(
            encoder.dim, num_classes)
        return EncoderDecoder(encoder, module)
    return build


def _setr(decoder: str):
    def build(num_classes: int, clip_model: str | None = None, freeze_backbone: bool = True,
              backbone_weights: str | None = None, freeze_bn: bool = False,
              clip_vision: dict | None = None) -> nn.Module:
        """The CLIP ViT (frozen unless ``freeze_backbone`` is False) with SETR's ``decoder``."""
        visual = clip_visual(clip_model, clip_vision)
        depth, dim = len(visual.transformer.resblocks), int(visual.ln_post.weight.shape[0])
        blocks, neck, head = setr_heads(decoder, num_classes, depth, dim)
        return Setr(ClipBlockEncoder(visual, blocks, frozen=freeze_backbone), head, neck)
    return build


def _deeplab(depth: int):
    def build(num_classes: int, clip_model: str | None = None, freeze_backbone: bool = False,
              backbone_weights: str | None = None, freeze_bn: bool = True,
              clip_vision: dict | None = None) -> nn.Module:
        from torchvision.models import ResNet50_Weights, ResNet101_Weights
        from torchvision.models.segmentation import deeplabv3_resnet50, deeplabv3_resnet101

        factory = deeplabv3_resnet50 if depth == 50 else deeplabv3_resnet101
        imagenet = ResNet50_Weights.IMAGENET1K_V1 if depth == 50 else ResNet101_Weights.IMAGENET1K_V1
        model = factory(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
        load_resnet_weights(model.backbone, backbone_weights, depth, imagenet)
        if freeze_backbone:
            model.backbone.requires_grad_(False)
        return DeepLab(model, freeze_bn=freeze_bn)
    return build


def _deeplab_v2(num_classes: int, clip_model: str | None = None, freeze_backbone: bool = False,
                backbone_weights: str | None = None, freeze_bn: bool = True,
                clip_vision: dict | None = None) -> nn.Module:
    return DeepLabV2(dilated_resnet101(backbone_weights, frozen=freeze_backbone), num_classes, freeze_bn=freeze_bn)


def _deeplab_v2_msc(num_classes: int, clip_model: str | None = None, freeze_backbone: bool = False,
                    backbone_weights: str | None = None, freeze_bn: bool = True,
                    clip_vision: dict | None = None) -> nn.Module:
    """deeplab-pytorch's DeepLabV2_ResNet101_MSC; the backbone from a deeplab-pytorch state dict."""
    model = DeepLabV2MSC(num_classes, freeze_bn=freeze_bn)
    if backbone_weights in (None, "imagenet"):
        raise ClipesError("deeplabv2-resnet101 starts from a deeplab-pytorch state dict: pass --backbone-weights FILE "
                          "(the ImageNet init CLIP-ES used, or convert.py's COCO init), or --backbone-weights random")
    if backbone_weights != "random":
        model.init_report = load_deeplab_weights(model, backbone_weights)
    if freeze_backbone:
        for name, p in model.named_parameters():
            if not name.startswith("aspp."):
                p.requires_grad_(False)
    return model


def _tiny(num_classes: int, clip_model: str | None = None, freeze_backbone: bool = False,
          backbone_weights: str | None = None, freeze_bn: bool = False, clip_vision: dict | None = None) -> nn.Module:
    return TinySegmenter(num_classes)


SEGMENTERS: dict[str, SegmenterSpec] = {
    "clip-linear": SegmenterSpec(_clip("linear"), "vit", 16),
    "clip-segmenter": SegmenterSpec(_clip("mask"), "vit", 16),
    "clip-setr-naive": SegmenterSpec(_setr("naive"), "setr-naive", 16),  # SETR's decoders: heads/setr.py
    "clip-setr-pup": SegmenterSpec(_setr("pup"), "setr", 16),
    "clip-setr-mla": SegmenterSpec(_setr("mla"), "setr", 16),
    "deeplabv3-resnet50": SegmenterSpec(_deeplab(50), "deeplab", 8, IMAGENET_MEAN, IMAGENET_STD),
    "deeplabv3-resnet101": SegmenterSpec(_deeplab(101), "deeplab", 8, IMAGENET_MEAN, IMAGENET_STD),
    "deeplabv2-resnet101": SegmenterSpec(_deeplab_v2_msc, "deeplabv2", 1, recipe="deeplab-pytorch"),
    "deeplabv2-resnet101-torchvision": SegmenterSpec(_deeplab_v2, "deeplab", 8, IMAGENET_MEAN, IMAGENET_STD),
    "tiny": SegmenterSpec(_tiny, "vit", 4),
}


# the task head of every model (DeepLabV3's: torchvision's; deeplab-pytorch's ASPP)
HEAD_PREFIXES = ("head.", "model.classifier.", "aspp.")


def head_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """Trainable parameters split into (backbone, head weights, head biases)."""
    backbone, weights, biases = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if not name.startswith(HEAD_PREFIXES):
            backbone.append(p)
        else:
            (biases if name.endswith(".bias") else weights).append(p)
    return backbone, weights, biases


def build_segmenter(name: str, num_classes: int, **kwargs) -> nn.Module:
    """A segmenter by registry name (see ``SEGMENTERS``)."""
    if name not in SEGMENTERS:
        raise ClipesError(f"unknown segmenter {name!r}; choose one of {', '.join(SEGMENTERS)}")
    return SEGMENTERS[name].build(num_classes, **kwargs)
