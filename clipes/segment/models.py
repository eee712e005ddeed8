"""Segmenters chosen by name: CLIP ViT with a linear, mask-transformer or SETR head, DeepLab-v2 and v3, a tiny net.

Every model maps (B, 3, H, W) normalised images to (B, C, H, W) logits for any H, W (multiples
of 16 for the ViTs, which interpolate their positional embedding as ``clipes label`` does). In training
mode a model with auxiliary heads (SETR's) returns ``(loss weight, logits)`` pairs, its main logits first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ClipesError
from ..images import CLIP_MEAN, CLIP_STD
from ..vit import block_forward, embed
from ..weights import check_finite
from .deeplabv2 import DeepLabV2MSC, caffe_input, load_deeplab_weights

__all__ = [
    "SEGMENTERS",
    "ASPPv2",
    "ClipDenseEncoder",
    "DeepLab",
    "DeepLabV2",
    "DeepLabV2MSC",
    "LinearHead",
    "MaskTransformerHead",
    "SegmenterSpec",
    "TinySegmenter",
    "build_segmenter",
    "freeze_batchnorm",
    "head_parameters",
]


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
        return F.interpolate(self.head(self.encoder(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)


_VIT_INPUT = ("conv1.", "class_embedding", "positional_embedding", "ln_pre.")  # what ``vit.embed`` reads


class ClipDenseEncoder(nn.Module):
    """Patch features of a CLIP ViT: every block, then ``ln_post``; (B, D, H/p, W/p).

    Of the ViT, only what the forward reads trains (the first ``depth`` blocks, ``ln_post`` if read): the
    rest (``proj``, ...) would get no gradient, which DDP without ``find_unused_parameters`` rejects."""

    def __init__(self, visual: nn.Module, frozen: bool = True, depth: int | None = None,
                 ln_post: bool = True) -> None:
        super().__init__()
        self.visual = visual
        self.frozen = frozen
        self.visual.requires_grad_(not frozen)
        depth = len(visual.transformer.resblocks) if depth is None else depth
        blocks = tuple(f"transformer.resblocks.{i}." for i in range(depth))
        read = _VIT_INPUT + blocks + (("ln_post.",) if ln_post else ())
        for name, p in visual.named_parameters():
            if not name.startswith(read):
                p.requires_grad_(False)
        self.dim = int(visual.ln_post.weight.shape[0])
        self.patch = int(visual.conv1.kernel_size[0])

    def forward(self, x: Tensor) -> Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            t = embed(self.visual, x)
            for blk in self.visual.transformer.resblocks:
                t, _ = block_forward(blk, t)
            t = self.visual.ln_post(t[:, 1:])
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        return t.transpose(1, 2).reshape(x.shape[0], self.dim, h, w)


class LinearHead(nn.Module):
    """Per-patch linear classifier (Segmenter's linear baseline)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, num_classes, 1)

    def forward(self, feats: Tensor) -> Tensor:
        return self.proj(feats)


class MaskTransformerHead(nn.Module):
    """Segmenter's mask transformer (Strudel et al., 2021): learnable class tokens attend jointly with
    the patch tokens; masks are the scalar products of normalised patch and class embeddings."""

    def __init__(self, dim: int, num_classes: int, d_model: int = 256, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, d_model)
        self.cls = nn.Parameter(torch.randn(1, num_classes, d_model) * d_model ** -0.5)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.proj_patch = nn.Linear(d_model, d_model, bias=False)
        self.proj_cls = nn.Linear(d_model, d_model, bias=False)
        self.norm = nn.LayerNorm(num_classes)

    def forward(self, feats: Tensor) -> Tensor:
        b, _, h, w = feats.shape
        x = self.proj_in(feats.flatten(2).transpose(1, 2))
        x = self.blocks(torch.cat([x, self.cls.expand(b, -1, -1)], dim=1))
        patches, cls = x[:, : h * w], x[:, h * w:]
        patches = F.normalize(self.proj_patch(patches), dim=-1)
        cls = F.normalize(self.proj_cls(cls), dim=-1)
        masks = self.norm(patches @ cls.transpose(1, 2))
        return masks.transpose(1, 2).reshape(b, -1, h, w)


class EncoderDecoder(nn.Module):
    """Encoder features -> head logits at feature resolution -> bilinear upsampling to the input."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: Tensor) -> Tensor:
        logits = self.head(self.encoder(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def freeze_batchnorm(module: nn.Module) -> None:
    """BatchNorm layers of ``module`` in eval mode (running statistics fixed) with no gradient."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            m.requires_grad_(False)


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


class ASPPv2(nn.Module):
    """DeepLab-v2's ASPP (LargeFOV per branch): parallel 3x3 convolutions at dilations 6, 12, 18, 24 straight
    to class scores, summed (Chen et al., 2017; deeplab-pytorch's ``_ASPP``, weights N(0, 0.01), biases 0)."""

    def __init__(self, in_ch: int, num_classes: int, rates: tuple[int, ...] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(in_ch, num_classes, 3, padding=r, dilation=r) for r in rates)
        for conv in self.branches:
            nn.init.normal_(conv.weight, 0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, feats: Tensor) -> Tensor:
        return sum(conv(feats) for conv in self.branches)


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
        return F.interpolate(self.head(f), size=x.shape[-2:], mode="bilinear", align_corners=False)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's backbones


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


def clip_visual(clip_model: str | None, clip_vision: dict | None = None) -> nn.Module:
    """The CLIP ViT of a clip-* model: loaded from ``clip_model``, or of the layout ``clip_vision`` that a
    checkpoint recorded (random weights: the checkpoint's replace them)."""
    if clip_vision is not None:
        from .checkpoint import rebuild_vision

        return rebuild_vision(clip_vision)
    from ..model import load_clip

    return load_clip(clip_model, flag="--clip-model").model.visual


def _clip(head: str):
    def build(num_classes: int, clip_model: str | None = None, freeze_backbone: bool = True,
              backbone_weights: str | None = None, freeze_bn: bool = False,
              clip_vision: dict | None = None) -> nn.Module:
        encoder = ClipDenseEncoder(clip_visual(clip_model, clip_vision), frozen=freeze_backbone)
        module = LinearHead(encoder.dim, num_classes) if head == "linear" else MaskTransformerHead(
            encoder.dim, num_classes)
        return EncoderDecoder(encoder, module)
    return build


def check_backbone_state(backbone: nn.Module, state: dict, source: str, depth: int) -> None:
    """Backbone weights fit ``backbone`` tensor by tensor (a ResNet-18 file for a ResNet-50 is refused naming the
    first tensor of another shape, not a size-mismatch traceback) and are finite."""
    own = backbone.state_dict()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ClipesError(f"{source}: {key} is not a tensor; not a torchvision ResNet-{depth} state dict")
        if key in own and tuple(value.shape) != tuple(own[key].shape):
            raise ClipesError(f"{source}: not a torchvision ResNet-{depth} state dict ({key} is "
                              f"{tuple(value.shape)}, ResNet-{depth}'s is {tuple(own[key].shape)})")
    check_finite(state.items(), source)


def _load_backbone(backbone: nn.Module, weights: str | None, depth: int, imagenet) -> None:
    """ImageNet weights for a torchvision ResNet (``imagenet``/None: torchvision's download or cache), a local
    torchvision ResNet state dict, or ``random``."""
    if weights == "random":
        return
    if weights in (None, "imagenet"):
        try:
            state = imagenet.get_state_dict(progress=False)
        except Exception as e:
            raise ClipesError(f"cannot download ImageNet weights for ResNet-{depth} ({e}). Pass "
                              f"--backbone-weights with a local torchvision ResNet-{depth} state dict, or "
                              "--backbone-weights random") from None
        source = f"torchvision's ImageNet ResNet-{depth}"
    else:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:  # missing, empty or foreign file: one message
            raise ClipesError(f"--backbone-weights {weights}: cannot read ({' '.join(str(e).split())[:200]})") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        source = weights
    if not isinstance(state, dict):
        raise ClipesError(f"--backbone-weights {weights}: not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(("fc.", "module.fc."))}
    check_backbone_state(backbone, state, source, depth)
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if unexpected or missing:
        raise ClipesError(f"{source}: not a torchvision ResNet-{depth} state dict "
                          f"({len(missing)} missing, {len(unexpected)} unexpected keys)")


def _deeplab(depth: int):
    def build(num_classes: int, clip_model: str | None = None, freeze_backbone: bool = False,
              backbone_weights: str | None = None, freeze_bn: bool = True,
              clip_vision: dict | None = None) -> nn.Module:
        from torchvision.models import ResNet50_Weights, ResNet101_Weights
        from torchvision.models.segmentation import deeplabv3_resnet50, deeplabv3_resnet101

        factory = deeplabv3_resnet50 if depth == 50 else deeplabv3_resnet101
        imagenet = ResNet50_Weights.IMAGENET1K_V1 if depth == 50 else ResNet101_Weights.IMAGENET1K_V1
        model = factory(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
        _load_backbone(model.backbone, backbone_weights, depth, imagenet)
        if freeze_backbone:
            model.backbone.requires_grad_(False)
        return DeepLab(model, freeze_bn=freeze_bn)
    return build


def _deeplab_v2(num_classes: int, clip_model: str | None = None, freeze_backbone: bool = False,
                backbone_weights: str | None = None, freeze_bn: bool = True,
                clip_vision: dict | None = None) -> nn.Module:
    from torchvision.models import ResNet101_Weights, resnet101

    backbone = resnet101(weights=None, replace_stride_with_dilation=[False, True, True])
    _load_backbone(backbone, backbone_weights, 101, ResNet101_Weights.IMAGENET1K_V1)
    if freeze_backbone:
        backbone.requires_grad_(False)
    return DeepLabV2(backbone, num_classes, freeze_bn=freeze_bn)


def _setr(decoder: str):
    def build(num_classes: int, **kwargs) -> nn.Module:
        from .setr import build_setr

        return build_setr(decoder, num_classes, **kwargs)
    return build


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
    "clip-setr-naive": SegmenterSpec(_setr("naive"), "setr-naive", 16),  # SETR's decoders: segment/setr.py
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
