"""Device and precision are resolved once, with clear errors for impossible choices."""

from __future__ import annotations

import contextlib

import pytest
import torch

from melanoma.errors import ConfigError
from melanoma.runtime import resolve_runtime

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


@needs_no_cuda
def test_auto_on_cpu_is_fp32_without_scaler_and_keeps_channels_last() -> None:
    rt = resolve_runtime("auto", "auto", channels_last=True)
    assert (rt.device.type, rt.precision, rt.channels_last) == ("cpu", "fp32", True)
    assert rt.memory_format == torch.channels_last
    assert isinstance(rt.autocast(), contextlib.nullcontext)
    assert not rt.grad_scaler().is_enabled()
    off = resolve_runtime("cpu", "auto", channels_last=False)
    assert (off.channels_last, off.memory_format) == (False, torch.contiguous_format)


@needs_no_cuda
def test_impossible_choices_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"trainer\.device=cuda"):
        resolve_runtime("cuda")
    with pytest.raises(ConfigError, match=r"trainer\.precision=fp16 needs CUDA"):
        resolve_runtime("cpu", "fp16")
    with pytest.raises(ConfigError, match="one of auto, fp32, fp16, bf16"):
        resolve_runtime("cpu", "int8")


def test_bf16_autocast_on_cpu() -> None:
    rt = resolve_runtime("cpu", "bf16")
    with rt.autocast():
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16
