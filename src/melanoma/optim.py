"""Optimizers and learning-rate schedules, through timm's factories.

Two recipes share these functions:
- the coursework's: Adam at a constant learning rate (``scheduler.name=none``), stepped per epoch;
- fine-tuning a pretrained backbone: AdamW with no decay on norms and biases, a lower learning
  rate for the early (pretrained, generic) layers than for the new head (``layer_decay``), and a
  linear warm-up into a cosine decay stepped after every batch (``warmup_cosine``), so the new
  head learns before large updates reach the ImageNet features.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Literal

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from torch import nn

from melanoma.errors import ConfigError

log = logging.getLogger(__name__)
OPTIMIZERS = ("adam", "adamw", "sgd", "momentum")
SCHEDULERS = ("none", "cosine", "warmup_cosine")
_CLASSES = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "momentum": torch.optim.SGD}


@dataclass
class OptimizerSettings:
    """The ``optimizer`` config group, spelled like the arguments of :func:`create_optimizer`."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    layer_decay: float | None = None


@dataclass
class ScheduleSettings:
    """The ``scheduler`` config group, spelled like the arguments of :func:`create_scheduler`."""

    name: str = "none"
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    warmup_lr: float = 0.0


def create_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0,
                     momentum: float = 0.9, fused: bool = False,
                     layer_decay: float | None = None) -> torch.optim.Optimizer:
    """Create an optimizer with timm's ``create_optimizer_v2``.

    Args:
        model: the model to optimise; with weight decay, timm leaves biases and norms undecayed.
        name: ``adam`` (the seed's best), ``adamw`` (decoupled weight decay), ``sgd`` (Nesterov
            momentum) or ``momentum`` (classic momentum SGD).
        lr: learning rate (of the head, with ``layer_decay``).
        weight_decay: L2 / decoupled weight decay.
        momentum: momentum for the SGD variants.
        fused: one fused kernel for the whole update instead of one per parameter (CUDA).
        layer_decay: each layer below the head learns at this factor times the rate of the layer
            above it (timm's layer-wise decay over the model's ``group_matcher``); ``None`` for one
            rate everywhere.

    Raises:
        ConfigError: unknown name, a non-positive learning rate, or a layer decay outside (0, 1].
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name={name!r} is not one of {', '.join(OPTIMIZERS)}")
    if not lr > 0:
        raise ConfigError(f"optimizer.lr={lr} must be positive")
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ConfigError(f"optimizer.layer_decay={layer_decay} must be in (0, 1], or null for none")
    extra = {"momentum": momentum} if name in ("sgd", "momentum") else {}
    if fused and "fused" in inspect.signature(_CLASSES[name]).parameters:  # SGD has it from torch 2.3
        extra["fused"] = True
    optimizer = create_optimizer_v2(model, opt=name, lr=lr, weight_decay=weight_decay, layer_decay=layer_decay,
                                    **extra)
    # timm leaves each group's scale to its schedulers; apply it now so it holds under any schedule.
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return optimizer


def create_scheduler(optimizer: torch.optim.Optimizer, name: Literal["none", "cosine", "warmup_cosine"],
                     epochs: int, min_lr: float = 0.0, warmup_epochs: float = 0.0, warmup_lr: float = 0.0,
                     steps_per_epoch: int = 1) -> torch.optim.lr_scheduler.LRScheduler | Scheduler | None:
    """A learning-rate schedule over ``epochs``.

    Args:
        optimizer: the optimizer whose rates it sets.
        name: ``none`` keeps the rates fixed; ``cosine`` anneals them to ``min_lr``, stepped once
            per epoch (torch's ``CosineAnnealingLR``); ``warmup_cosine`` rises linearly from
            ``warmup_lr`` for ``warmup_epochs``, then follows a cosine to ``min_lr``, stepped after
            every batch (timm's ``CosineLRScheduler``; call ``step_update(n)`` after update ``n``).
        epochs: the length of the run.
        min_lr: the final learning rate.
        warmup_epochs: length of the linear warm-up (fractions allowed), ``warmup_cosine`` only.
        warmup_lr: learning rate at the first batch, ``warmup_cosine`` only.
        steps_per_epoch: optimizer updates per epoch, ``warmup_cosine`` only.

    Raises:
        ConfigError: unknown name, or a negative warm-up (one over half the run is cut to half).
    """
    if name == "none":
        return None
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1), eta_min=min_lr)
    if name == "warmup_cosine":
        if not warmup_epochs >= 0:
            raise ConfigError(f"scheduler.warmup_epochs={warmup_epochs} must be at least 0")
        total = max(epochs, 1) * steps_per_epoch
        warmup_steps = round(warmup_epochs * steps_per_epoch)
        if warmup_steps > total // 2:  # a short check run (trainer.epochs=1) still decays
            log.warning("scheduler.warmup_epochs=%g is over half of trainer.epochs=%d: warming up for half the run",
                        warmup_epochs, epochs)
            warmup_steps = total // 2
        for group in optimizer.param_groups:  # timm multiplies by each group's lr_scale itself
            group["initial_lr"] = group["lr"] / group.get("lr_scale", 1.0)
        scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=total,
                                           min_lr=min_lr, warmup_lr=warmup_lr, warmup_epochs=warmup_steps,
                                           step_on_epochs=False, updates_per_epoch=1)
        return scheduler
    raise ConfigError(f"scheduler.name={name!r} is not one of {', '.join(SCHEDULERS)}")


def per_batch(scheduler: object) -> bool:
    """Whether ``scheduler`` is stepped after every batch (``step_update``) rather than per epoch."""
    return isinstance(scheduler, Scheduler)
