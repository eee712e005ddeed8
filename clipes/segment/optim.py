"""Optimisers and schedules of train-seg: parameter groups with the head's learning-rate multipliers (DeepLab's
1x/10x/20x, SETR's 10x) and the poly schedule."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import TrainConfig
from .registry import head_parameters

__all__ = ["build_optimizer", "param_groups", "poly_schedule"]


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The backbone at ``lr``; the head's weights at ``head_lr_mult`` x lr and its biases at
    ``head_bias_lr_mult`` x lr, without weight decay unless ``head_bias_decay`` (DeepLab's 1x/10x/20x)."""
    backbone, weights, biases = head_parameters(model)
    groups = [{"params": backbone, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
              {"params": weights, "lr": cfg.lr * cfg.head_lr_mult, "weight_decay": cfg.weight_decay},
              {"params": biases, "lr": cfg.lr * cfg.head_bias_lr_mult,
               "weight_decay": cfg.weight_decay if cfg.head_bias_decay else 0.0}]
    return [g for g in groups if g["params"]]


def poly_schedule(opt: torch.optim.Optimizer, steps: int, power: float, min_lr: float = 0.0,
                  every: int = 1) -> torch.optim.lr_scheduler.LambdaLR:
    """DeepLab's poly learning rate: every group's own lr times ``(1 - s / steps) ** power``; with
    ``min_lr``, mmcv's form (SETR's): ``(lr - min_lr) * (1 - s / steps) ** power + min_lr`` per group.
    ``s`` is the number of steps done rounded down to a multiple of ``every`` (deeplab-pytorch's
    ``PolynomialLR`` with ``step_size`` 10 changes the rate after iterations 10, 20, ... only)."""
    def factor(lr: float):
        return lambda s: (c := max(0.0, 1 - (s - s % every) / steps) ** power) + min_lr / lr * (1 - c)

    return torch.optim.lr_scheduler.LambdaLR(opt, [factor(g["lr"]) for g in opt.param_groups])


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW, as ``cfg.optimizer`` says, over ``param_groups``."""
    groups = param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
