"""The training and evaluation loops, shared by every fold and every backbone."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from melanoma.checkpoint import (
    FORMAT_VERSION,
    atomic_path,
    comparable,
    config_changes,
    load_checkpoint,
    save_checkpoint,
    write_csv,
)
from melanoma.errors import ConfigError, NonFiniteLossError, raise_if_stopped
from melanoma.metrics import binary_metrics
from melanoma.optim import per_batch
from melanoma.runtime import Runtime, all_sum, gather_shards, get_rng_state, set_rng_state

log = logging.getLogger(__name__)
Monitor = Literal["auc", "loss", "accuracy", "f1", "balanced_accuracy"]
HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_auc", "val_accuracy", "lr", "seconds"]


def make_loss(pos_weight: float | str | None, labels: np.ndarray | None = None) -> nn.Module:
    """``BCEWithLogitsLoss``, the numerically safe form of the seed's BCE.

    Args:
        pos_weight: weight of the malignant class; ``auto`` uses negatives / positives of
            ``labels``; ``None`` weighs both classes equally.
        labels: the training labels, needed for ``auto``.
    """
    if pos_weight is None:
        return nn.BCEWithLogitsLoss()
    if pos_weight == "auto":
        counts = np.bincount(np.asarray(labels, dtype=int), minlength=2)
        pos_weight = counts[0] / max(counts[1], 1)
    elif not isinstance(pos_weight, (int, float)) or pos_weight <= 0:
        raise ConfigError(f"trainer.pos_weight={pos_weight!r} must be null, auto or a positive number")
    return nn.BCEWithLogitsLoss(pos_weight=torch.tensor(float(pos_weight)))


def configured_lr(optimizer: torch.optim.Optimizer) -> float:
    """The ``optimizer.lr`` the run was configured with, whatever a schedule or layer decay made of it now."""
    return max(group.get("initial_lr", group["lr"]) for group in optimizer.param_groups)


def _to_device(batch: Sequence[torch.Tensor], runtime: Runtime,
               device_transform: nn.Module | None = None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """A loader batch ``(images, labels)`` or ``(images, metadata, labels)`` on the device, as
    ``(model inputs, labels)``: the model is called as ``model(*inputs)``."""
    images, *metadata, labels = batch
    images = images.to(runtime.device, non_blocking=True, memory_format=runtime.memory_format)
    if device_transform is not None:
        with torch.no_grad():
            images = device_transform(images).contiguous(memory_format=runtime.memory_format)
    inputs = (images, *(m.to(runtime.device, non_blocking=True) for m in metadata))
    return inputs, labels.to(runtime.device, non_blocking=True)


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    loss_fn: nn.Module, runtime: Runtime, scaler: torch.amp.GradScaler,
                    desc: str = "train", skip_nonfinite: bool = False, where: str = "",
                    device_transform: nn.Module | None = None, clip_grad_norm: float | None = None,
                    on_update: Callable[[], None] | None = None) -> float:
    """Run one pass over ``loader`` with gradient updates.

    Args:
        skip_nonfinite: skip the update of a batch whose loss or gradients are NaN or infinite
            (costs a device sync per step) instead of stopping. Weights that diverge through
            finite but huge updates still stop the fold, at validation.
        where: context for the error message, e.g. ``"fold 1, epoch 3"``.
        device_transform: applied to each batch once on the device (the batched part of the
            augmentation, see ``transforms.build_device_transform``).
        clip_grad_norm: clip the gradients' global L2 norm to this value; ``None`` for no clipping.
        on_update: called after every optimizer update (a per-batch schedule, the weight EMA).

    Returns:
        The mean training loss over images.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (without ``skip_nonfinite``).
    """
    model.train()
    total, count, skipped = torch.zeros((), device=runtime.device), 0, 0
    first_bad = torch.full((), -1, device=runtime.device)  # checked once per epoch: no sync per step
    for step, batch in enumerate(tqdm(loader, desc=desc, leave=False, disable=None, dynamic_ncols=True)):
        raise_if_stopped()
        inputs, labels = _to_device(batch, runtime, device_transform)
        with runtime.autocast():
            logits = model(*inputs).squeeze(1)
        loss = loss_fn(logits.float(), labels)
        if skip_nonfinite and not torch.isfinite(loss):
            skipped += 1
            continue
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if skip_nonfinite or clip_grad_norm is not None:
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm or float("inf"))
            if skip_nonfinite and not torch.isfinite(norm):
                scaler.update()  # resets the scaler's per-step state; the update itself is skipped
                skipped += 1
                continue
        scaler.step(optimizer)
        scaler.update()
        if on_update is not None:
            on_update()
        total += loss.detach() * len(labels)  # stays on the device: no sync per step
        count += len(labels)
    if int(first_bad) >= 0:
        lr = configured_lr(optimizer)
        raise NonFiniteLossError(f"{where}{', ' if where else ''}step {int(first_bad)}: the training loss is not "
                                 f"finite; lower optimizer.lr (now {lr:g}) or use trainer.precision=fp32, or set "
                                 "trainer.skip_nonfinite=true to skip such batches")
    if skipped:
        log.warning("%s: skipped %d batch(es) with a non-finite loss", where or desc, skipped)
    total_all, count_all = all_sum([float(total), float(count)], runtime)
    return total_all / max(count_all, 1)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, loss_fn: nn.Module, runtime: Runtime,
             desc: str = "eval") -> tuple[float, np.ndarray]:
    """Predict every image of ``loader`` in order.

    Returns:
        ``(mean loss, probabilities of malignancy)``.
    """
    model.eval()
    losses, probs, n = [], [], 0
    for batch in tqdm(loader, desc=desc, leave=False, disable=None, dynamic_ncols=True):
        raise_if_stopped()
        inputs, labels = _to_device(batch, runtime)
        with runtime.autocast():
            logits = model(*inputs).squeeze(1).float()
        losses.append(loss_fn(logits, labels) * len(labels))
        probs.append(torch.sigmoid(logits))
        n += len(labels)
    return float(torch.stack(losses).sum()) / max(n, 1), torch.cat(probs).cpu().numpy()


@dataclass
class FoldResult:
    """What one fold's training produced.

    Attributes:
        best_epoch: 1-based epoch whose weights are in ``best.pt``.
        metrics: validation metrics of those weights at threshold 0.5.
        probs: validation probabilities of those weights, in the loader's order.
        history: one row per epoch, columns ``HISTORY_COLUMNS``.
    """

    best_epoch: int
    metrics: dict
    probs: np.ndarray
    history: pd.DataFrame


def _score(monitor: Monitor, val_loss: float, metrics: dict) -> float:
    """Higher is better; a metric that is undefined scores lowest."""
    if monitor == "loss":
        return -val_loss
    value = metrics.get(monitor)
    return -math.inf if value is None else value


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile and DistributedDataParallel wrappers.

    Its state dict has neither ``_orig_mod.`` nor ``module.`` prefixes, so checkpoints load
    into a fresh model whatever the training run was wrapped in.
    """
    while isinstance(model, (torch._dynamo.eval_frame.OptimizedModule, nn.parallel.DistributedDataParallel)):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    return model


def _save_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler,
                train_loader: DataLoader, config: dict, epoch: int, rows: list[dict], best: tuple,
                precision: str, ema: ModelEmaV3 | None, updates: int, extra: dict | None = None) -> None:
    """Write ``last.pt``: the state after ``epoch``, atomically, loadable with ``weights_only``."""
    score, best_epoch, metrics, probs = best
    with atomic_path(path) as tmp:
        torch.save({
            "format_version": FORMAT_VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None, "updates": updates,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict(), "config": config, "epoch": epoch, "history": rows,
            "best": {"score": score, "epoch": best_epoch, "metrics": metrics, "probs": torch.from_numpy(probs)},
            "rng": get_rng_state(), "loader_rng": train_loader.generator.get_state(), "precision": precision,
        } | (extra or {}), tmp)


def _restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler,
             train_loader: DataLoader, config: dict, precision: str,
             ema: ModelEmaV3 | None) -> tuple[list[dict], tuple, int, int]:
    """Load ``last.pt`` into the training objects; returns history rows, best, next epoch, updates so far."""
    state = load_checkpoint(path)
    saved_config, now = comparable(state.get("config", {})), comparable(config)
    if saved_config != now:
        raise ConfigError(f"{path} was written by a run with another config ({config_changes(saved_config, now)}); "
                          "resume with the same overrides, or train into a new run directory")
    saved = state.get("precision", precision)  # precision=auto resolves per machine: the scaler state must fit
    if saved != precision:
        raise ConfigError(f"{path} was trained in {saved} and this machine resolves trainer.precision to "
                          f"{precision}; resume with trainer.precision={saved}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    if ema is not None and state.get("ema") is not None:
        ema.module.load_state_dict(state["ema"])
    set_rng_state(state["rng"])
    train_loader.generator.set_state(state["loader_rng"])
    b = state["best"]
    best = (b["score"], b["epoch"], b["metrics"], b["probs"].numpy())
    return list(state["history"]), best, state["epoch"] + 1, int(state.get("updates", 0))


def fit(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, val_labels: np.ndarray,
        optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        loss_fn: nn.Module, runtime: Runtime, epochs: int, fold_dir: Path, config: dict,
        monitor: Monitor = "auc", fold: int = 0, checkpoint_extra: dict | None = None,
        skip_nonfinite: bool = False, device_transform: nn.Module | None = None,
        clip_grad_norm: float | None = None, ema_decay: float | None = None,
        on_epoch: Callable[[dict], None] | None = None, state_extra: dict | None = None) -> FoldResult:
    """Train one fold, keep the best epoch's weights and predictions.

    Writes ``fold_dir/history.csv`` after every epoch and ``fold_dir/best.pt`` whenever the
    monitored validation metric improves. ``fold_dir/last.pt`` holds everything needed to go on
    after the last completed epoch (model, optimizer, scheduler, GradScaler, history, best epoch,
    every RNG state and the shuffling generator); when it exists, training resumes from it, and
    a finished fold is not trained again.

    Args:
        model: the model, already on ``runtime.device``.
        train_loader: the fold's training images, shuffled.
        val_loader: the fold's validation images, in a fixed order.
        val_labels: labels of all validation images; under torchrun ``val_loader`` holds this
            rank's share ``[rank::world_size]`` and the predictions are gathered.
        optimizer: the optimizer over the model's parameters.
        scheduler: stepped once per epoch, or after every batch for a timm scheduler
            (``optim.per_batch``), or ``None``.
        loss_fn: the loss on logits.
        runtime: device and precision.
        epochs: number of epochs.
        fold_dir: where the fold's files go.
        config: the resolved run config, stored in the checkpoint.
        monitor: validation metric that picks the best epoch (``loss`` is minimised).
        fold: the fold index, stored in the checkpoint.
        checkpoint_extra: further plain values stored in ``best.pt`` (e.g. the preprocessing).
        skip_nonfinite: skip batches with a NaN/infinite loss instead of stopping the fold.
        device_transform: the batched part of the training augmentation, run on the device.
        clip_grad_norm: clip the gradients' global norm to this value; ``None`` for no clipping.
        ema_decay: keep an exponential moving average of the weights (timm ``ModelEmaV3``, its
            decay warmed up from 0 towards this value); validation, ``best.pt`` and the returned
            predictions then use the averaged weights. ``None`` for no EMA.
        on_epoch: called with each completed epoch's ``history.csv`` row (experiment tracking).
        state_extra: further plain values stored in ``last.pt`` (the tracked runs' ids, for resume).

    Returns:
        The fold's result.
    """
    if monitor not in ("auc", "loss", "accuracy", "f1", "balanced_accuracy"):
        raise ConfigError(f"trainer.monitor={monitor!r} is not one of auc, loss, accuracy, f1, balanced_accuracy")
    scaler = runtime.grad_scaler()
    loss_fn = loss_fn.to(runtime.device)
    if ema_decay is not None and not 0 < ema_decay < 1:
        raise ConfigError(f"trainer.ema_decay={ema_decay} must be in (0, 1), or null for no EMA")
    ema = ModelEmaV3(_unwrap(model), decay=ema_decay, use_warmup=True) if ema_decay is not None else None
    rows, best, first, updates = [], None, 1, 0
    if (fold_dir / "last.pt").is_file():
        rows, best, first, updates = _restore(fold_dir / "last.pt", _unwrap(model), optimizer, scheduler, scaler,
                                              train_loader, config, runtime.precision, ema)
        log.info("fold %d: resuming after epoch %d of %d", fold, first - 1, epochs)
    step_per_batch = per_batch(scheduler)

    def on_update() -> None:
        nonlocal updates
        updates += 1
        if step_per_batch:
            scheduler.step_update(updates)
        if ema is not None:
            ema.update(_unwrap(model), step=updates)

    for epoch in tqdm(range(first, epochs + 1), desc=f"fold {fold}", disable=None, dynamic_ncols=True):
        start = time.perf_counter()
        lr = max(group["lr"] for group in optimizer.param_groups)  # the head's, under layer decay
        if hasattr(train_loader.sampler, "set_epoch"):  # DistributedSampler: a new shuffle each epoch
            train_loader.sampler.set_epoch(epoch)
        train_loss = train_one_epoch(model, train_loader, optimizer, loss_fn, runtime, scaler,
                                     skip_nonfinite=skip_nonfinite, where=f"fold {fold}, epoch {epoch}",
                                     device_transform=device_transform, clip_grad_norm=clip_grad_norm,
                                     on_update=on_update)
        # Finite but exploding: a loss 100x the first epoch's, and at least 100x log 2 (a classifier at
        # chance), means the weights ran away; an AUC of 0.5 would otherwise follow silently.
        first = rows[0]["train_loss"] if rows and rows[0]["train_loss"] > math.log(2) else None
        reference = first or math.log(2)
        if train_loss > 100 * reference:
            raise NonFiniteLossError(
                f"fold {fold}, epoch {epoch}: training diverged (mean loss {train_loss:.3g}, over 100x "
                f"{'epoch 1' if first else 'a classifier at chance'}'s {reference:.3g}); lower optimizer.lr "
                f"(now {configured_lr(optimizer):g})")
        scored = ema.module if ema is not None else model
        val_loss, probs = evaluate(scored, val_loader, loss_fn, runtime)
        loss_sum, n_val = all_sum([val_loss * len(probs), float(len(probs))], runtime)
        val_loss, probs = loss_sum / max(n_val, 1), gather_shards(probs, runtime)
        if not np.isfinite(probs).all():  # the last updates of the epoch diverged
            raise NonFiniteLossError(
                f"fold {fold}, epoch {epoch}: the model's validation outputs are not finite; lower optimizer.lr "
                f"(now {configured_lr(optimizer):g}) or use trainer.precision=fp32")
        if scheduler is not None and not step_per_batch:
            scheduler.step()
        metrics = binary_metrics(val_labels, probs)
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_auc": metrics["auc"],
               "val_accuracy": metrics["accuracy"], "lr": lr, "seconds": time.perf_counter() - start}
        rows.append(row)
        score = _score(monitor, val_loss, metrics)
        improved = best is None or score > best[0]
        if improved:
            best = (score, epoch, metrics | {"loss": val_loss}, probs)
        if runtime.is_main:  # under torchrun only rank 0 writes
            write_csv(pd.DataFrame(rows, columns=HISTORY_COLUMNS), fold_dir / "history.csv")
            if improved:
                save_checkpoint(fold_dir / "best.pt", _unwrap(scored), config, epoch, best[2], fold=fold,
                                ema=ema is not None, **(checkpoint_extra or {}))
            _save_state(fold_dir / "last.pt", _unwrap(model), optimizer, scheduler, scaler, train_loader, config,
                        epoch, rows, best, runtime.precision, ema, updates, state_extra)
            if on_epoch is not None:
                on_epoch(row)
    _, best_epoch, best_metrics, best_probs = best
    return FoldResult(best_epoch, best_metrics, best_probs, pd.DataFrame(rows, columns=HISTORY_COLUMNS))
