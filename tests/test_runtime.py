"""Device and precision are resolved once, with clear errors for impossible choices."""

from __future__ import annotations

import contextlib

import pytest
import torch

import melanoma.runtime as runtime
from melanoma.errors import ConfigError
from melanoma.runtime import resolve_runtime

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


@needs_no_cuda
@pytest.mark.parametrize("native_bf16", [False, True])
def test_auto_on_cpu_is_fp32_without_scaler_and_keeps_channels_last(native_bf16: bool,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native_bf16)  # no image size: inference, fp32
    rt = resolve_runtime("auto", "auto", channels_last=True)
    assert (rt.device.type, rt.precision, rt.channels_last) == ("cpu", "fp32", True)
    assert rt.memory_format == torch.channels_last
    assert isinstance(rt.autocast(), contextlib.nullcontext)
    assert not rt.grad_scaler().is_enabled()
    off = resolve_runtime("cpu", "auto", channels_last=False)
    assert (off.channels_last, off.memory_format) == (False, torch.contiguous_format)


@needs_no_cuda
@pytest.mark.parametrize(("native_bf16", "image_size", "expected"), [
    (False, 224, "fp32"), (False, 128, "fp32"),  # emulated bf16 is slower than fp32 at every size
    (True, 128, "fp32"), (True, 191, "fp32"),  # native, but below 192 px it bought Lite0 nothing, cost B0 17%
    (True, 192, "bf16"), (True, 384, "bf16"),  # native, from 192 px: 1.2-1.8x faster steps
])
def test_auto_on_cpu_trains_in_bf16_only_where_native_and_from_192_px(native_bf16: bool, image_size: int,
                                                                      expected: str,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native_bf16)
    rt = resolve_runtime("cpu", "auto", image_size=image_size)
    assert rt.precision == expected and not rt.grad_scaler().is_enabled()
    assert "emulated" not in caplog.text
    assert resolve_runtime("cpu", "fp32", image_size=image_size).precision == "fp32"  # an explicit choice stands


@pytest.mark.parametrize("native_bf16", [False, True])
def test_bf16_on_a_cpu_warns_only_where_it_is_emulated(native_bf16: bool, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native_bf16)
    rt = resolve_runtime("cpu", "bf16")
    assert rt.precision == "bf16" and not rt.grad_scaler().is_enabled()
    assert ("emulated, slower than fp32" in caplog.text) != native_bf16


def test_native_bf16_is_what_torch_reports_for_this_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    for avx512, amx in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert runtime.cpu_has_native_bf16() == (avx512 or amx)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert runtime.cpu_has_native_bf16() is False  # a torch without the checks (or not x86): fp32


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
