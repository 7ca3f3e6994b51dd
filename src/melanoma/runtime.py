"""Device, precision and seeding: decided once at the entry point, then passed down."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from melanoma.errors import ConfigError

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed.

    Attributes:
        device: the torch device to train on.
        precision: the resolved precision, one of ``fp32``, ``fp16``, ``bf16``.
        channels_last: whether images and models use the channels-last memory format.
    """

    device: torch.device
    precision: Literal["fp32", "fp16", "bf16"]
    channels_last: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        """A fresh autocast context for the forward pass; a no-op in fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that is only active for fp16 (bf16 and fp32 need none)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    @property
    def memory_format(self) -> torch.memory_format:
        """Memory format for model weights and input batches."""
        return torch.channels_last if self.channels_last else torch.contiguous_format


def resolve_runtime(device: Device = "auto", precision: Precision = "auto",
                    channels_last: bool = True) -> Runtime:
    """Resolve ``auto`` choices against the machine.

    Args:
        device: ``auto`` picks CUDA when available, else the CPU.
        precision: ``auto`` is fp16 autocast with a GradScaler on CUDA and fp32 on the CPU.
        channels_last: ask for channels-last tensors; only honoured on CUDA, where it is faster.

    Returns:
        The resolved runtime.

    Raises:
        ConfigError: for unknown values, CUDA asked for but absent, or fp16 on the CPU.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"trainer.device={device!r} is not one of auto, cpu, cuda")
    if precision not in ("auto", "fp32", "fp16", "bf16"):
        raise ConfigError(f"trainer.precision={precision!r} is not one of auto, fp32, fp16, bf16")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA GPU is visible; use trainer.device=cpu or auto")
    if precision == "auto":
        precision = "fp16" if device == "cuda" else "fp32"
    if precision == "fp16" and device == "cpu":
        raise ConfigError("trainer.precision=fp16 needs CUDA; use trainer.precision=fp32 or bf16 on the CPU")
    return Runtime(torch.device(device), precision, channels_last and device == "cuda")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; optionally ask torch for deterministic kernels.

    Args:
        seed: the run's seed.
        deterministic: make two runs on the same machine give identical numbers, at some cost
            in speed on CUDA.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this workspace setting to be deterministic (see torch docs on reproducibility).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def get_rng_state() -> dict:
    """Every random generator's state (Python, NumPy, torch CPU and CUDA) as checkpointable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    """Restore the generators saved by :func:`get_rng_state`."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
