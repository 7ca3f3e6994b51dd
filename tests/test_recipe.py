"""The fine-tuning recipe: layer-wise rates, the per-batch warm-up + cosine schedule, weight EMA,
temperature scaling and the degenerate-threshold warning."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from melanoma.calibration import apply_temperature, fit_temperature, log_loss
from melanoma.checkpoint import load_checkpoint
from melanoma.engine import fit, make_loss
from melanoma.errors import ConfigError
from melanoma.metrics import binary_metrics, degenerate_operating_point
from melanoma.models import create_model
from melanoma.optim import create_optimizer, create_scheduler
from melanoma.runtime import resolve_runtime


def _head_and_stem(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    groups = sorted(optimizer.param_groups, key=lambda g: g.get("lr_scale", 1.0))
    return groups[-1], groups[0]


def test_layer_decay_lowers_the_rate_block_by_block_under_every_schedule() -> None:
    model = create_model("test_efficientnet")
    optimizer = create_optimizer(model, "adamw", 1e-3, 0.05, layer_decay=0.5)
    head, stem = _head_and_stem(optimizer)
    assert head["lr"] == pytest.approx(1e-3) and stem["lr"] < 1e-3 * 0.5 ** 3
    scales = sorted({g["lr_scale"] for g in optimizer.param_groups})
    assert all(b / a == pytest.approx(2.0) for a, b in zip(scales, scales[1:], strict=False))
    # timm's defaults: no weight decay on biases and norm weights
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert all(id(p) not in decayed for n, p in model.named_parameters() if p.ndim == 1)
    with pytest.raises(ConfigError, match=r"optimizer\.layer_decay=1\.5"):
        create_optimizer(model, "adamw", 1e-3, layer_decay=1.5)


def test_warmup_cosine_is_stepped_per_batch_at_the_hand_computed_rates() -> None:
    model = create_model("test_efficientnet")
    optimizer = create_optimizer(model, "adamw", 1e-3, 0.05, layer_decay=0.5)
    epochs, steps, base, floor, start = 4, 10, 1e-3, 1e-6, 1e-5
    scheduler = create_scheduler(optimizer, "warmup_cosine", epochs, min_lr=floor, warmup_epochs=1,
                                 warmup_lr=start, steps_per_epoch=steps)
    head, stem = _head_and_stem(optimizer)
    total, warmup = epochs * steps, steps

    def expected(t: int) -> float:
        if t < warmup:
            return start + t * (base - start) / warmup
        return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * t / total))

    assert head["lr"] == pytest.approx(start)  # the first batch
    for t in (1, 5, 9, 10, 20, 39, 40):
        scheduler.step_update(t)
        assert head["lr"] == pytest.approx(expected(t), rel=1e-9), t
        assert stem["lr"] == pytest.approx(expected(t) * stem["lr_scale"], rel=1e-9), t
    assert expected(5) == pytest.approx(5.05e-4) and expected(20) == pytest.approx(5.005e-4)
    with pytest.raises(ConfigError, match=r"scheduler\.warmup_epochs=-1"):
        create_scheduler(optimizer, "warmup_cosine", 4, warmup_epochs=-1, steps_per_epoch=steps)
    short = create_scheduler(optimizer, "warmup_cosine", 1, warmup_epochs=1, warmup_lr=start, steps_per_epoch=steps)
    assert short.warmup_t == steps // 2  # a one-epoch check run warms up for half of it, then decays


def _loaders(n: int = 64) -> tuple[DataLoader, DataLoader, np.ndarray]:
    generator = torch.Generator().manual_seed(0)
    labels = (torch.arange(n) % 2).float()
    images = torch.randn(n, 3, 32, 32, generator=generator) + labels.view(-1, 1, 1, 1)  # a learnable signal
    data = TensorDataset(images, labels)
    train = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    return train, DataLoader(data, batch_size=32), labels.numpy().astype(int)


def test_ema_weights_are_validated_and_saved_and_differ_from_the_raw_ones(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("test_efficientnet")
    train_loader, val_loader, labels = _loaders()
    optimizer = create_optimizer(model, "adamw", 3e-3)
    scheduler = create_scheduler(optimizer, "warmup_cosine", 3, warmup_epochs=1, steps_per_epoch=len(train_loader))
    runtime = resolve_runtime("cpu", "fp32")
    result = fit(model, train_loader, val_loader, labels, optimizer, scheduler, make_loss(None), runtime, 3,
                 tmp_path, {"k": 1}, clip_grad_norm=1.0, ema_decay=0.9)
    best, last = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / "last.pt")
    assert best["ema"] is True and last["updates"] == 3 * len(train_loader)
    raw = {k: v for k, v in last["model"].items() if v.is_floating_point()}
    assert any(not torch.equal(raw[k], last["ema"][k]) for k in raw)  # the average is not the last step
    if best["epoch"] == 3:  # best.pt holds the averaged weights, not the raw ones
        assert all(torch.equal(best["model"][k], last["ema"][k]) for k in raw)
    ema_model = create_model("test_efficientnet")
    ema_model.load_state_dict(best["model"])
    ema_model.eval()
    with torch.inference_mode():
        probs = torch.cat([torch.sigmoid(ema_model(x).squeeze(1)) for x, _ in val_loader]).numpy()
    np.testing.assert_allclose(probs, result.probs, atol=1e-6)  # validation scored the EMA weights
    with pytest.raises(ConfigError, match=r"trainer\.ema_decay=1\.0"):
        fit(model, train_loader, val_loader, labels, optimizer, None, make_loss(None), runtime, 1, tmp_path / "x",
            {}, ema_decay=1.0)


def test_temperature_scaling_lowers_the_log_loss_of_an_overconfident_model() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    # Class-conditional N(+-1.5, 3) scores are exact log-odds (2 * 1.5 * x / 3 = x): a calibrated model ...
    honest_logits = rng.normal(1.5 * (2 * labels - 1), math.sqrt(3.0))
    overconfident = 1 / (1 + np.exp(-4 * honest_logits))     # ... blown up four-fold
    temperature = fit_temperature(labels, overconfident)
    assert 3.0 < temperature < 5.5
    calibrated = apply_temperature(overconfident, temperature)
    assert log_loss(labels, calibrated) < 0.75 * log_loss(labels, overconfident)
    auc_before, auc_after = (binary_metrics(labels, p)["auc"] for p in (overconfident, calibrated))
    assert auc_after == pytest.approx(auc_before, abs=1e-3)  # one monotone map: the ranking stays
    assert fit_temperature(np.ones(5, dtype=int), np.full(5, 0.9)) == 1.0  # one class: nothing to fit


def test_degenerate_sens95_threshold_is_reported_with_its_numbers() -> None:
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(200, dtype=int), np.ones(50, dtype=int)]
    weak = rng.random(250)  # a model at chance: 95% sensitivity costs nearly all specificity
    threshold = 0.03
    message = degenerate_operating_point("sens95", threshold, binary_metrics(labels, weak, threshold))
    assert message is not None and "\n" not in message
    assert message.startswith("the sens95 threshold 0.03 keeps only") and "threshold=youden" in message
    strong = np.r_[rng.random(200) * 0.5, 0.4 + rng.random(50) * 0.6]
    assert degenerate_operating_point("sens95", 0.42, binary_metrics(labels, strong, 0.42)) is None


def test_clipping_bounds_every_update() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    before = model.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    from melanoma.engine import train_one_epoch

    batch = [(torch.full((8, 4), 100.0), torch.ones(8))]
    rt = resolve_runtime("cpu", "fp32", channels_last=False)  # a linear model on rows, not images
    train_one_epoch(model, batch, optimizer, make_loss(None), rt, rt.grad_scaler(), clip_grad_norm=0.5)
    moved = model.weight.detach() - before
    assert 0 < float(moved.norm()) <= 0.5 + 1e-6  # lr 1 times a gradient clipped to norm 0.5


def test_eval_and_predict_warn_from_the_oof_metrics_stored_with_the_ensemble() -> None:
    from melanoma.inference import Ensemble

    stored = {"sens95": {"sensitivity": 0.96, "specificity": 0.05}, "youden": {"sensitivity": 0.7, "specificity": 0.8}}
    ensemble = Ensemble([], [], {}, {}, {"sens95": 0.01, "youden": 0.3}, "sens95", [], stored)
    assert "keeps only 5.0% specificity" in ensemble.degenerate_warning("sens95", 0.01)
    assert ensemble.degenerate_warning("youden", 0.3) is None
    assert ensemble.degenerate_warning("0.5", 0.5) is None  # not measured out-of-fold: nothing to say
