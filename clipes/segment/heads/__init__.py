"""Segmentation heads: features of an encoder -> class logits (SETR's: with its auxiliary heads)."""

from .aspp import ASPPv2
from .linear import LinearHead
from .mask_transformer import MaskTransformerHead
from .setr import MlaAuxHead, MlaHead, MlaNeck, SetrDecoder, SetrUpHead

__all__ = ["ASPPv2", "LinearHead", "MaskTransformerHead", "MlaAuxHead", "MlaHead", "MlaNeck", "SetrDecoder",
           "SetrUpHead"]
