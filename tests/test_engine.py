"""The training loop's guard against NaN/infinite losses."""

from __future__ import annotations

import pytest
import torch

from melanoma.engine import train_one_epoch
from melanoma.errors import NonFiniteLossError
from melanoma.runtime import resolve_runtime


class _NaNOnSecondBatch(torch.nn.Module):
    """BCE loss that returns NaN for the second batch of each epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        return loss * float("nan") if self.calls == 2 else loss


def _setup() -> tuple[torch.nn.Module, torch.utils.data.DataLoader, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 1))
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 2, 2), torch.tensor([0.0, 1.0] * 4))
    return model, torch.utils.data.DataLoader(data, batch_size=2), torch.optim.SGD(model.parameters(), lr=0.1)


def test_a_nan_loss_names_the_step_and_the_fixes() -> None:
    model, loader, opt = _setup()
    rt = resolve_runtime("cpu", "fp32")
    with pytest.raises(NonFiniteLossError, match=r"fold 2, epoch 5, step 1: .*optimizer\.lr \(now 0\.1\).*"
                                                 r"trainer\.precision=fp32.*trainer\.skip_nonfinite=true"):
        train_one_epoch(model, loader, opt, _NaNOnSecondBatch(), rt, rt.grad_scaler(), where="fold 2, epoch 5")


def test_skip_nonfinite_skips_only_the_bad_batch(caplog: pytest.LogCaptureFixture) -> None:
    model, loader, opt = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    rt = resolve_runtime("cpu", "fp32")
    updates = []
    loss = train_one_epoch(model, loader, opt, _NaNOnSecondBatch(), rt, rt.grad_scaler(), skip_nonfinite=True,
                           on_update=lambda: updates.append(1))
    assert len(updates) == 3  # 4 batches, the second skipped: an all-skipped epoch would fail here
    assert "skipped 1 batch(es) with a non-finite loss" in caplog.text
    assert torch.isfinite(torch.tensor(loss)) and loss > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # it did learn


def test_checkpoints_hold_the_plain_model_under_compile() -> None:
    import timm

    from melanoma.engine import _unwrap

    model = timm.create_model("test_resnet", num_classes=1)
    compiled = torch.compile(model)  # lazy: nothing is compiled until the first forward
    assert _unwrap(compiled) is model
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in _unwrap(compiled).state_dict())


def test_resume_in_another_precision_is_refused(tmp_path) -> None:
    """precision=auto resolves per machine (fp32 on a CPU, bf16/fp16 on GPUs): the saved state must fit."""
    from melanoma.engine import fit
    from melanoma.errors import ConfigError

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 1))
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 2, 2), torch.tensor([0.0, 1.0] * 4))
    loader = torch.utils.data.DataLoader(data, batch_size=4, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = (model, loader, loader, data.tensors[1].numpy(), optimizer, None, torch.nn.BCEWithLogitsLoss())
    fit(*args, resolve_runtime("cpu", "fp32"), 1, tmp_path, {"k": 1})
    with pytest.raises(ConfigError, match="trained in fp32 .* resume with trainer.precision=fp32"):
        fit(*args, resolve_runtime("cpu", "bf16"), 2, tmp_path, {"k": 1})
    assert len(fit(*args, resolve_runtime("cpu", "fp32"), 2, tmp_path, {"k": 1}).history) == 2
