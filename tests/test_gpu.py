"""The CUDA paths, on a real GPU: precision auto, channels-last AMP with a fused optimizer,
torch.compile, augmentation on the device, and a GPU-trained run evaluated on the CPU.

Skipped where no GPU is visible (CI, laptops); ``scripts/gpu_check.sh`` runs this file first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from melanoma.cli.evaluate import evaluate_run
from melanoma.cli.train import train
from melanoma.engine import make_loss, train_one_epoch
from melanoma.optim import create_optimizer
from melanoma.runtime import Runtime, resolve_runtime

from conftest import (
    ONE_STEP,
    SEED_RECIPE,
    TINY,
    assert_same_distribution,
    augmented,
    make_config,
    make_pipeline,
    noise_image,
    same_moments,
    structured_image,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")


def test_auto_resolves_the_gpus_fast_path() -> None:
    rt = resolve_runtime()
    major, _ = torch.cuda.get_device_capability()
    assert rt.device.type == "cuda" and rt.channels_last
    assert rt.precision == ("bf16" if major >= 8 else "fp16")
    assert rt.grad_scaler().is_enabled() == (rt.precision == "fp16")


def _learnable_batches(n: int = 128, batch: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x = torch.randn(n, 3, 32, 32)
    y = (x[:, 0].mean((1, 2)) > 0).float()  # the red channel's brightness decides the label
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def _fit_a_little(model: torch.nn.Module, rt: Runtime, epochs: int) -> list[float]:
    optimizer = create_optimizer(model, "adam", 3e-3, fused=True)
    assert optimizer.defaults.get("fused") is True
    loss_fn, scaler, batches = make_loss(None).to(rt.device), rt.grad_scaler(), _learnable_batches()
    return [train_one_epoch(model, batches, optimizer, loss_fn, rt, scaler) for _ in range(epochs)]


def test_amp_channels_last_and_fused_adam_learn() -> None:
    rt = resolve_runtime()
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=1).to(rt.device, memory_format=rt.memory_format)
    losses = _fit_a_little(model, rt, 12)
    assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0], losses
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in model.parameters())  # fp32 masters


def test_compiled_model_learns_and_checkpoints_plainly() -> None:
    from melanoma.engine import _unwrap

    rt = resolve_runtime()
    torch.manual_seed(0)
    plain = timm.create_model("test_efficientnet", num_classes=1).to(rt.device, memory_format=rt.memory_format)
    losses = _fit_a_little(torch.compile(plain), rt, 6)
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    assert not any(k.startswith("_orig_mod.") for k in _unwrap(torch.compile(plain)).state_dict())


def test_device_augmentation_on_the_gpu_matches_the_cpu_recipe() -> None:
    cpu, device = (make_pipeline(32, (0, 0, 0), (1, 1, 1), on_device=d, **SEED_RECIPE) for d in (False, True))
    a = augmented(cpu, noise_image(), 1024, seed=0)
    b = augmented(device, noise_image(), 1024, seed=1, device="cuda")
    assert b.device.type == "cuda" and b.dtype == torch.float32 and b.shape == a.shape
    assert_same_distribution(a, b.cpu())


@pytest.mark.parametrize("step", ONE_STEP)
def test_each_step_on_the_gpu_draws_like_its_cpu_twin(step: str) -> None:
    recipe = {"scale": (1.0, 1.0), "hflip": 0.0} | ONE_STEP[step]
    cpu, device = (make_pipeline(32, (0, 0, 0), (1, 1, 1), on_device=d, **recipe) for d in (False, True))
    b = augmented(device, structured_image(), 1024, seed=1, device="cuda")
    assert b.device.type == "cuda" and same_moments(augmented(cpu, structured_image(), 1024, seed=0), b.cpu())


def test_a_gpu_trained_run_evaluates_on_the_cpu(tiny_data: Path, tmp_path: Path) -> None:
    overrides = [o for o in TINY if o != "trainer.deterministic=true"]  # cudnn autotuning, as users run it
    metrics = train(make_config([f"data.root={tiny_data}", *overrides, "trainer.epochs=2", "cv.folds=2",
                                 "augmentation.on_device=true", "data.num_workers=2"]), tmp_path / "run")
    assert np.isfinite(metrics["oof"]["auc"]) and metrics["n_images"] == 150
    on_cpu = evaluate_run(make_config([f"ckpt={tmp_path / 'run'}", "eval.n_resamples=50", "eval.num_workers=0",
                                       "trainer.device=cpu"], "eval"), tmp_path / "eval")
    assert on_cpu["n_images"] == 20 and np.isfinite(on_cpu["thresholds"]["0.5"]["metrics"]["auc"]["value"])
