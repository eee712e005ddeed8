"""torchvision ResNets as segmentation encoders: their weights (ImageNet, a local state dict, random) and
the dilated ResNet-101 of DeepLab-v2 (output stride 8)."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import ClipesError
from ...weights import check_finite

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "check_backbone_state", "dilated_resnet101", "freeze_batchnorm",
           "load_resnet_weights"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's backbones


def freeze_batchnorm(module: nn.Module) -> None:
    """BatchNorm layers of ``module`` in eval mode (running statistics fixed) with no gradient."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            m.requires_grad_(False)


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


def load_resnet_weights(backbone: nn.Module, weights: str | None, depth: int, imagenet) -> None:
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


def dilated_resnet101(weights: str | None, frozen: bool = False) -> nn.Module:
    """torchvision's ResNet-101 with layer3 and layer4 dilated (output stride 8), weights as ``load_resnet_weights``."""
    from torchvision.models import ResNet101_Weights, resnet101

    backbone = resnet101(weights=None, replace_stride_with_dilation=[False, True, True])
    load_resnet_weights(backbone, weights, 101, ResNet101_Weights.IMAGENET1K_V1)
    if frozen:
        backbone.requires_grad_(False)
    return backbone
