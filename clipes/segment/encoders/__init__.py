"""Segmentation encoders: the CLIP ViT as a dense feature map (or its tapped blocks), torchvision ResNets."""

from .clip import ClipBlockEncoder, ClipDenseEncoder, clip_visual
from .resnet import IMAGENET_MEAN, IMAGENET_STD, dilated_resnet101, freeze_batchnorm, load_resnet_weights

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ClipBlockEncoder", "ClipDenseEncoder", "clip_visual",
           "dilated_resnet101", "freeze_batchnorm", "load_resnet_weights"]
