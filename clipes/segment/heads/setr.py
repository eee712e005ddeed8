"""SETR's decoders (Zheng et al., CVPR 2021) on the CLIP ViT: naive, PUP and MLA, with their auxiliary heads.

Layer for layer as the authors' code (fudan-zvg/SETR): ``VisionTransformerUpHead`` (naive, PUP and their
auxiliary heads, ``mmseg/models/decode_heads/vit_up_head.py``), the MLA neck of ``VIT_MLA``
(``mmseg/models/backbones/vit_mla.py``: ``norm_0..3`` and ``Conv_MLA``), ``VIT_MLAHead`` and
``VIT_MLA_AUXIHead``. Modules and parameters carry the authors' names, so a state dict reads like theirs
under the prefixes ``head.decode`` (their ``decode_head``), ``head.auxiliary`` (``auxiliary_head``) and
``neck`` (``backbone.norm_k`` and ``backbone.mla``). Settings are those of the ViT-B/DeiT configs in
``configs/SETR/``: which blocks feed the heads and the neck, 256 channels (MLA head: 128), BatchNorm
(SyncBN under ``torchrun``), auxiliary loss weight 0.4, ``align_corners`` False except inside the MLA head.

Where this differs, and why:

- CLIP's CLS token runs through every block (its weights were trained with it) and is dropped where the
  tokens are tapped. SETR's naive/PUP heads drop it at their input, as here; its MLA ViT drops it before
  the first block.
- The heads' 2x and 4x upsamplings scale height and width each; the authors' give ``F.interpolate`` a
  single size taken from the width, which is the same on the square crops they train and test on.
- mmseg's ``BaseDecodeHead`` gives every head a 1x1 ``conv_seg`` (512 -> classes) that SETR's heads never
  call (hence ``find_unused_parameters`` in the configs); it is left out.
- Block indices: the ViT-B/DeiT configs' (12 blocks) scaled to the encoder's depth, see ``setr_blocks``.

In training mode the model returns ``[(1.0, logits), (0.4, aux logits), ...]`` (mmseg's loss weights;
``losses.segmentation_loss`` sums them under the confidence-guided loss); in eval mode the logits alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AUX_WEIGHT", "SETR_DECODERS", "ConvMla", "MlaAuxHead", "MlaHead", "MlaNeck", "SetrDecoder", "SetrUpHead",
           "setr_blocks", "setr_heads"]

SETR_DECODERS = ("naive", "pup", "mla")

# SETR's training recipe (SGD, loss averaging, mmseg pipeline) is SETR_PRESETS in segment/presets.py, beside the
# other presets: read without torch for --help

AUX_WEIGHT = 0.4  # loss_weight of every auxiliary head in the configs (the decode head's: 1.0)
CHANNELS = 256  # VisionTransformerUpHead's conv width; VIT_MLA's mla_channels
MLA_HEAD_CHANNELS = 128  # VIT_MLAHead's mlahead_channels

# Blocks (0-based, of 12) in the ViT-B/DeiT configs; the decode head of naive and PUP reads the last block.
_NAIVE_AUX = (2, 5, 8)  # SETR_Naive_DeiT_* / SETR_Naive_Base_*, in_index of the auxiliary heads (ViT-L: 9, 14, 19)
_PUP_AUX = (4, 7, 9, 11)  # SETR_PUP_DeiT_* (ViT-L: 9, 14, 19, 23)
_MLA_TAPS = (2, 5, 8, 11)  # SETR_MLA_DeiT_* mla_index (ViT-L: 5, 11, 17, 23)

LayerNorm = partial(nn.LayerNorm, eps=1e-6)  # SETR's norm_layer


def setr_blocks(vit_b: Sequence[int], depth: int) -> tuple[int, ...]:
    """ViT-B config block indices (of 12) on an encoder of ``depth`` blocks: block i of 12 is the last of the
    first (i + 1) / 12 of the encoder, ``ceil((i + 1) * depth / 12) - 1`` (the same indices at depth 12)."""
    return tuple(math.ceil((i + 1) * depth / 12) - 1 for i in vit_b)


def _up(x: Tensor, factor: int, align_corners: bool = False) -> Tensor:
    """Bilinear upsampling by ``factor`` in height and width."""
    return F.interpolate(x, size=(x.shape[-2] * factor, x.shape[-1] * factor), mode="bilinear",
                         align_corners=align_corners)


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _channels_first(tokens: Tensor) -> Tensor:
    return tokens.permute(0, 3, 1, 2)


class SetrUpHead(nn.Module):
    """``VisionTransformerUpHead``: LayerNorm on the tokens of block ``in_index``, then

    - naive (``num_conv=2, num_upsample=1``): conv (3x3, or 1x1 without ``conv3x3``) to 256, BN, ReLU,
      1x1 conv to classes, bilinear to the input size;
    - its 2-upsampling form (PUP's auxiliary heads): the same with a 4x upsampling before the 1x1 conv;
    - PUP (``num_conv=4, num_upsample=4``): four 3x3 conv + BN + ReLU stages at 256 channels, each followed
      by a 2x upsampling, the last one after the 1x1 conv to classes (output: 16x the token grid).
    """

    def __init__(self, embed_dim: int, num_classes: int, in_index: int, num_conv: int = 2,
                 num_upsample: int = 1, conv3x3: bool = True) -> None:
        super().__init__()
        if (num_conv, num_upsample) not in ((2, 1), (2, 2), (4, 4)):
            raise ValueError(f"SETR's up head has no num_conv={num_conv}, num_upsample={num_upsample} form")
        self.in_index, self.num_conv, self.num_upsample = in_index, num_conv, num_upsample
        self.norm = LayerNorm(embed_dim)
        if num_conv == 2:
            self.conv_0 = nn.Conv2d(embed_dim, CHANNELS, 3, 1, 1) if conv3x3 else nn.Conv2d(embed_dim, CHANNELS, 1, 1)
            self.conv_1 = nn.Conv2d(CHANNELS, num_classes, 1, 1)
            self.syncbn_fc_0 = nn.BatchNorm2d(CHANNELS)
        else:
            self.conv_0 = nn.Conv2d(embed_dim, CHANNELS, 3, 1, 1)
            self.conv_1 = nn.Conv2d(CHANNELS, CHANNELS, 3, 1, 1)
            self.conv_2 = nn.Conv2d(CHANNELS, CHANNELS, 3, 1, 1)
            self.conv_3 = nn.Conv2d(CHANNELS, CHANNELS, 3, 1, 1)
            self.conv_4 = nn.Conv2d(CHANNELS, num_classes, 1, 1)
            for k in range(4):
                setattr(self, f"syncbn_fc_{k}", nn.BatchNorm2d(CHANNELS))

    def _stage(self, x: Tensor, k: int) -> Tensor:
        return F.relu(getattr(self, f"syncbn_fc_{k}")(getattr(self, f"conv_{k}")(x)), inplace=True)

    def forward(self, feats: Mapping[int, Tensor] | Sequence[Tensor], size: Sequence[int]) -> Tensor:
        x = _channels_first(self.norm(feats[self.in_index]))
        if self.num_conv == 2:
            x = self._stage(x, 0)
            if self.num_upsample == 2:
                x = _up(x, 4)
            return _resize(self.conv_1(x), size)
        for k in range(3):
            x = _up(self._stage(x, k), 2)
        return _up(self.conv_4(self._stage(x, 3)), 2)


def _conv_bn_relu(cin: int, cout: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class ConvMla(nn.Module):
    """``Conv_MLA``: per level a 1x1 conv + BN + ReLU to 256 channels, summed top-down (deepest first),
    then per level a 3x3 conv + BN + ReLU. Levels 2..5 are the shallowest to the deepest tap."""

    def __init__(self, in_channels: int, mla_channels: int = CHANNELS) -> None:
        super().__init__()
        for k in range(2, 6):
            setattr(self, f"mla_p{k}_1x1", nn.Sequential(*_conv_bn_relu(in_channels, mla_channels, 1)))
        for k in range(2, 6):
            setattr(self, f"mla_p{k}", nn.Sequential(*_conv_bn_relu(mla_channels, mla_channels, 3)))

    def forward(self, levels: Sequence[Tensor]) -> tuple[Tensor, ...]:
        lateral = [getattr(self, f"mla_p{k}_1x1")(x) for k, x in zip(range(2, 6), levels, strict=True)]
        summed = [lateral[3]]
        for lat in reversed(lateral[:3]):
            summed.insert(0, summed[0] + lat)
        return tuple(getattr(self, f"mla_p{k}")(s) for k, s in zip(range(2, 6), summed, strict=True))


class MlaNeck(nn.Module):
    """The MLA part of ``VIT_MLA``: LayerNorm ``norm_0..3`` on the tokens of the four tapped blocks, then
    ``Conv_MLA``; returns its four 256-channel maps, shallowest first."""

    def __init__(self, embed_dim: int, taps: Sequence[int], mla_channels: int = CHANNELS) -> None:
        super().__init__()
        if len(taps) != 4:
            raise ValueError(f"MLA taps four blocks, not {len(taps)}")
        self.taps = tuple(taps)
        self.mla = ConvMla(embed_dim, mla_channels)
        for k in range(4):
            setattr(self, f"norm_{k}", LayerNorm(embed_dim))

    def forward(self, feats: Mapping[int, Tensor]) -> tuple[Tensor, ...]:
        return self.mla([_channels_first(getattr(self, f"norm_{k}")(feats[t])) for k, t in enumerate(self.taps)])


class MlaHead(nn.Module):
    """``VIT_MLAHead``: per level (``mlahead.head2..5``) two 3x3 conv + BN + ReLU to 128 channels and a 4x
    upsampling (``align_corners=True``, as the authors'), concatenated, a 3x3 conv to classes (``cls``),
    bilinear to the input size."""

    def __init__(self, num_classes: int, mla_channels: int = CHANNELS, head_channels: int = MLA_HEAD_CHANNELS
                 ) -> None:
        super().__init__()
        self.mlahead = nn.Module()
        for k in range(2, 6):
            setattr(self.mlahead, f"head{k}", nn.Sequential(*_conv_bn_relu(mla_channels, head_channels, 3),
                                                            *_conv_bn_relu(head_channels, head_channels, 3)))
        self.cls = nn.Conv2d(4 * head_channels, num_classes, 3, padding=1)

    def forward(self, feats: Sequence[Tensor], size: Sequence[int]) -> Tensor:
        x = torch.cat([_up(getattr(self.mlahead, f"head{k}")(p), 4, align_corners=True)
                       for k, p in zip(range(2, 6), feats, strict=True)], dim=1)
        return _resize(self.cls(x), size)


class MlaAuxHead(nn.Module):
    """``VIT_MLA_AUXIHead`` on a 256-channel MLA level: a 1x1 conv to classes without bias, bilinear to the
    input size."""

    def __init__(self, num_classes: int, in_index: int, in_channels: int = CHANNELS) -> None:
        super().__init__()
        self.in_index = in_index
        self.aux = nn.Conv2d(in_channels, num_classes, 1, bias=False)

    def forward(self, feats: Sequence[Tensor], size: Sequence[int]) -> Tensor:
        return _resize(self.aux(feats[self.in_index]), size)


class SetrDecoder(nn.Module):
    """The decode head and the auxiliary heads (mmseg's ``decode_head`` and ``auxiliary_head``); every
    output at the input size. The auxiliary heads run in training mode only."""

    def __init__(self, decode: nn.Module, auxiliary: Sequence[nn.Module], aux_weight: float = AUX_WEIGHT) -> None:
        super().__init__()
        self.decode = decode
        self.auxiliary = nn.ModuleList(auxiliary)
        self.aux_weight = aux_weight

    def forward(self, feats: Any, size: Sequence[int]) -> Tensor | list[tuple[float, Tensor]]:
        def fit(x: Tensor) -> Tensor:  # mmseg resizes to the image (and the label) when the sizes differ
            return x if tuple(x.shape[-2:]) == tuple(size) else _resize(x, size)

        logits = fit(self.decode(feats, size))
        if not self.training or not len(self.auxiliary):
            return logits
        return [(1.0, logits)] + [(self.aux_weight, fit(head(feats, size))) for head in self.auxiliary]


def setr_heads(decoder: str, num_classes: int, depth: int, dim: int
               ) -> tuple[tuple[int, ...], MlaNeck | None, SetrDecoder]:
    """SETR's ``decoder`` for a CLIP ViT of ``depth`` blocks of width ``dim``: the blocks the encoder must
    tap, the MLA neck (None for naive and PUP) and the decode head with its auxiliary heads."""
    if decoder not in SETR_DECODERS:
        raise ValueError(f"unknown SETR decoder {decoder!r}; one of {', '.join(SETR_DECODERS)}")
    last = depth - 1
    neck = None
    if decoder == "naive":
        blocks = setr_blocks(_NAIVE_AUX, depth)
        decode = SetrUpHead(dim, num_classes, last, num_conv=2, num_upsample=1, conv3x3=False)
        aux = [SetrUpHead(dim, num_classes, b, num_conv=2, num_upsample=1, conv3x3=False) for b in blocks]
        blocks += (last,)
    elif decoder == "pup":
        blocks = setr_blocks(_PUP_AUX, depth)
        decode = SetrUpHead(dim, num_classes, last, num_conv=4, num_upsample=4)
        aux = [SetrUpHead(dim, num_classes, b, num_conv=2, num_upsample=2) for b in blocks]
        blocks += (last,)
    else:
        blocks = setr_blocks(_MLA_TAPS, depth)
        neck = MlaNeck(dim, blocks)
        decode = MlaHead(num_classes)
        aux = [MlaAuxHead(num_classes, k) for k in range(4)]
    return blocks, neck, SetrDecoder(decode, aux)
