"""Optimizers (through timm's factory) and learning-rate schedules."""

from __future__ import annotations

import inspect
from typing import Literal

import torch
from timm.optim import create_optimizer_v2
from torch import nn

from melanoma.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd", "momentum")


def create_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0,
                     momentum: float = 0.9, fused: bool = False) -> torch.optim.Optimizer:
    """Create an optimizer with timm's ``create_optimizer_v2``.

    Args:
        model: the model to optimise; with weight decay, timm leaves biases and norms undecayed.
        name: ``adam`` (the seed's best), ``adamw``, ``sgd`` (Nesterov momentum) or ``momentum``
            (classic momentum SGD).
        lr: learning rate.
        weight_decay: L2 / decoupled weight decay.
        momentum: momentum for the SGD variants.
        fused: one fused kernel for the whole update instead of one per parameter (CUDA).

    Raises:
        ConfigError: unknown name or a non-positive learning rate.
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name={name!r} is not one of {', '.join(OPTIMIZERS)}")
    if not lr > 0:
        raise ConfigError(f"optimizer.lr={lr} must be positive")
    extra = {"momentum": momentum} if name in ("sgd", "momentum") else {}
    optimizer_class = torch.optim.SGD if name in ("sgd", "momentum") else torch.optim.Adam
    if fused and "fused" in inspect.signature(optimizer_class).parameters:  # SGD has it from torch 2.3
        extra["fused"] = True
    return create_optimizer_v2(model, opt=name, lr=lr, weight_decay=weight_decay, **extra)


def create_scheduler(optimizer: torch.optim.Optimizer, name: Literal["none", "cosine"],
                     epochs: int, min_lr: float = 0.0) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A per-epoch schedule: ``none`` keeps the lr fixed, ``cosine`` anneals it to ``min_lr``."""
    if name == "none":
        return None
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1), eta_min=min_lr)
    raise ConfigError(f"scheduler.name={name!r} is not one of none, cosine")
