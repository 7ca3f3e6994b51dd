"""Device, precision and seeding: decided once at the entry point, then passed down."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
import torch

from melanoma.errors import ConfigError

log = logging.getLogger("melanoma.runtime")

T = TypeVar("T")
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed.

    Attributes:
        device: the torch device to train on.
        precision: the resolved precision, one of ``fp32``, ``fp16``, ``bf16``.
        channels_last: whether images and models use the channels-last memory format.
        rank: this process's rank under torchrun (0 otherwise).
        world_size: number of processes under torchrun (1 otherwise).
    """

    device: torch.device
    precision: Literal["fp32", "fp16", "bf16"]
    channels_last: bool
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether several processes train together (DistributedDataParallel)."""
        return self.world_size > 1

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


RUNTIME_KEYS = ("device", "precision", "channels_last")  # the runtime config group: resolve_runtime's arguments
CPU_BF16_MIN_SIZE = 192  # training images from this size up: where native bf16 paid for every model measured


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512-BF16 or AMX), so that bf16 autocast is faster.

    Measured on 2 cores with AVX-512-BF16 (docs/benchmarks.md): channels-last bf16 trained
    EfficientNet-Lite0 1.4x faster than fp32 at 192-224 px, ResNet34 1.6-1.8x, but at 128 px
    Lite0 no faster and EfficientNet-B0 1.2x slower; elsewhere oneDNN emulates bf16, slower
    than fp32. ``trainer.precision=bf16`` warns where it is emulated; ``auto`` uses it from
    ``CPU_BF16_MIN_SIZE`` px up where it is native.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's, on x86 builds
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_runtime(device: Device = "auto", precision: Precision = "auto",
                    channels_last: bool = True, image_size: int | None = None) -> Runtime:
    """Resolve ``auto`` choices against the machine.

    Args:
        device: ``auto`` picks CUDA when available, else the CPU.
        precision: ``auto`` is bf16 autocast on GPUs that support it (Ampere and newer: no
            GradScaler, no overflow), fp16 with a GradScaler on older GPUs; on the CPU it is bf16
            where the CPU has it natively and ``image_size`` is at least ``CPU_BF16_MIN_SIZE``
            (1.2-1.8x faster training steps there; no loss of AUC where it was checked, at 128 px:
            docs/benchmarks.md), else fp32.
        channels_last: channels-last tensors for models and batches, on CUDA and on the CPU alike
            (on a 2-core CPU it made an fp32 training step of EfficientNet-Lite0 1.57x faster,
            docs/benchmarks.md).
        image_size: the training image size, for ``auto`` on the CPU; ``None`` (inference, and
            callers that do not train) keeps the CPU in fp32.

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
        # Compute capability 8+ (Ampere) has bf16 units; is_bf16_supported() also says yes to emulated bf16.
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda":
            precision = "bf16" if torch.cuda.get_device_capability(local)[0] >= 8 else "fp16"
        else:  # at 128 px native bf16 bought Lite0 nothing and cost EfficientNet-B0 17%
            pays = image_size is not None and image_size >= CPU_BF16_MIN_SIZE and cpu_has_native_bf16()
            precision = "bf16" if pays else "fp32"
    if precision == "fp16" and device == "cpu":
        raise ConfigError("trainer.precision=fp16 needs CUDA; use trainer.precision=fp32 or bf16 on the CPU")
    if precision == "bf16" and device == "cpu" and not cpu_has_native_bf16():
        log.warning("trainer.precision=bf16 on a CPU without native bf16 (AVX-512-BF16 or AMX): emulated, slower "
                    "than fp32; trainer.precision=fp32 is faster here")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Runtime(torch.device(device), precision, channels_last)
    # Launched by torchrun: one process per device, PyTorch's own DDP (nccl on GPUs, gloo on CPUs).
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo")
    torch_device = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    return Runtime(torch_device, precision, channels_last, torch.distributed.get_rank(),
                   world_size)


def broadcast(obj: T, runtime: Runtime) -> T:
    """Rank 0's ``obj`` on every rank (a no-op in a single process)."""
    if not runtime.distributed:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def rank0_first(runtime: Runtime, enabled: bool = True) -> Iterator[None]:
    """Run the block on rank 0 first and on the other ranks after it (which then read what it wrote).

    A no-op in a single process or with ``enabled=False``. The others wait on a gloo group with a
    long timeout: decoding a large image set can outlast NCCL's 10-minute watchdog. Should rank 0
    fail inside the block, torchrun stops the waiting ranks.
    """
    if not (enabled and runtime.distributed):
        yield
        return
    group = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(hours=6))
    try:
        if not runtime.is_main:
            torch.distributed.barrier(group=group)
        yield
        if runtime.is_main:
            torch.distributed.barrier(group=group)
    finally:
        torch.distributed.destroy_process_group(group)


def gather_shards(shard: np.ndarray, runtime: Runtime) -> np.ndarray:
    """Reassemble rows that were split as ``rows[rank::world_size]`` across ranks."""
    if not runtime.distributed:
        return shard
    parts: list = [None] * runtime.world_size
    torch.distributed.all_gather_object(parts, shard)
    full = np.empty(sum(len(p) for p in parts), dtype=shard.dtype)
    for rank, part in enumerate(parts):
        full[rank::runtime.world_size] = part
    return full


def all_sum(values: list[float], runtime: Runtime) -> list[float]:
    """Element-wise sum of ``values`` over ranks."""
    if not runtime.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    torch.distributed.all_reduce(t)
    return t.tolist()


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
