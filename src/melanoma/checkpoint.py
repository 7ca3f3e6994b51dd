"""Checkpoints and run files, written atomically and read back without executing pickles.

Every file is written to a temporary sibling and renamed over the target, so a run killed
mid-write leaves the previous complete file (or none), never a truncated one that looks
complete.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from melanoma.errors import DataError, WeightsError

FORMAT_VERSION = 1
CONFIG = "config.yaml"  # a run's config, every interpolation resolved when it trained
PREPROCESS = "preprocess.json"  # how the run's models turn an image into a tensor (transforms.Preprocess)
PROVENANCE = "provenance.json"  # the code's commit and the versions a run started with (melanoma.provenance)


def disk_full(path: Path) -> DataError:
    """The one-line error for a write that ran out of space, naming the folder and what is free there."""
    free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
    return DataError(f"no space left to write {path} ({free / 1e6:.0f} MB free in {path.parent}); free some space "
                     "or point the run elsewhere, then resume= the run: its last complete files are intact")


# What torch.save's zip writer raises when a write fails (it does not pass ENOSPC on).
_TORCH_WRITE_FAILURES = ("enforce fail at inline_container", "file write failed", "PytorchStreamWriter failed")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    Raises:
        DataError: the disk (or quota) is full; the previous ``path``, if any, is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name, not mkstemp's file: the writer creates it, so permissions follow the umask.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(path) from None
        raise
    except RuntimeError as exc:
        if any(marker in str(exc) for marker in _TORCH_WRITE_FAILURES):
            raise disk_full(path) from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold ``run_dir/.lock`` while a run writes there: one owner per run directory.

    An advisory ``flock`` on a file that records the holder's PID; the kernel releases it when the
    process ends, however it ends, so a killed run never leaves a stale lock.

    Raises:
        DataError: another process holds the directory (naming its PID).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise DataError(f"{run_dir} is in use by another run (PID {holder}); wait for it to finish, or give this "
                            "run its own folder (hydra.run.dir=...)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_json(obj: Any, path: str | Path) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def read_json(path: str | Path) -> dict:
    """A JSON object from ``path``; ``{}`` when the file is missing, unreadable or not an object.

    For the optional files of a run directory (``metrics.json``, ``audit.json``, ...), which
    reports and figures use where present and skip where not.
    """
    try:
        found = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return found if isinstance(found, dict) else {}


def write_yaml(obj: Any, path: str | Path) -> None:
    """Write plain containers as YAML in their own key order, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(obj, sort_keys=False))


def write_csv(frame: pd.DataFrame, path: str | Path) -> None:
    """Write a table as CSV without its index, atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def save_checkpoint(path: str | Path, model: torch.nn.Module, config: dict, epoch: int,
                    metrics: dict, **extra: Any) -> None:
    """Save a model checkpoint: weights, the resolved run config, the epoch and its metrics.

    Args:
        path: where to write, e.g. ``fold0/best.pt``.
        model: the model whose state dict is saved.
        config: the resolved run config as plain containers.
        epoch: the epoch the weights come from (1-based).
        metrics: validation metrics of those weights.
        **extra: further plain values to store (fold index, ...).
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format_version": FORMAT_VERSION, "model": state, "config": config,
               "epoch": epoch, "metrics": metrics, **extra}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


# Keys added to the run config after runs had been written, with the value that reproduces how those
# runs trained: a run recorded without them is compared (on resume) as if it had recorded these.
ADDED_KEYS = {"data": {"metadata": [], "group_column": None, "sampler": "shuffle"}, "model": {"fusion": "none"},
              "augmentation": {"vignette": 0.0, "vignette_radius": [0.75, 1.35]},
              "audit": {"method": "phash", "similarity": 0.92}}


def with_added_keys(config: Mapping) -> dict:
    """``config`` with every key of ``ADDED_KEYS`` that it lacks set to its value for older runs."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}
    for group, keys in ADDED_KEYS.items():
        if isinstance(out.get(group), dict):
            for key, value in keys.items():
                out[group].setdefault(key, value)
    return out


# Keys that may change when a run is resumed: where it resumes from, where it is tracked, and the TTA
# modes whose thresholds are chosen after the last fold (they change no fold's training).
NOT_COMPARED = ("resume", "logger", "cv.oof_tta")


def comparable(config: Mapping) -> dict:
    """The parts of a run config that must match for a resume (:data:`NOT_COMPARED` may differ), with the keys
    added since older runs were written counted at the value those runs trained with (:data:`ADDED_KEYS`)."""
    out = {k: v for k, v in with_added_keys(config).items() if k not in NOT_COMPARED}
    for key in (k for k in NOT_COMPARED if "." in k):
        group, name = key.split(".", 1)
        if isinstance(out.get(group), Mapping):
            out[group] = {k: v for k, v in out[group].items() if k != name}
    return out


_ABSENT = object()


def config_changes(saved: dict, now: dict, limit: int = 3) -> str:
    """The first keys whose values differ, as ``key: saved -> now``; ``(absent)`` for missing keys."""
    before, after = (pd.json_normalize(c, sep=".").to_dict("records")[0] for c in (saved, now))
    keys = sorted(k for k in before.keys() | after.keys() if before.get(k, _ABSENT) != after.get(k, _ABSENT))

    def show(value: object) -> str:
        return "(absent)" if value is _ABSENT else repr(value)

    shown = [f"{k}: {show(before.get(k, _ABSENT))} -> {show(after.get(k, _ABSENT))}" for k in keys[:limit]]
    return ", ".join(shown) + (f" and {len(keys) - limit} more" if len(keys) > limit else "") or "empty sections"


def update_checkpoint(path: str | Path, **fields: Any) -> None:
    """Add or replace plain fields of a checkpoint, atomically (e.g. thresholds chosen after CV)."""
    payload = load_checkpoint(path) | fields
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_failure(exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, without torch's advice to load it unsafely.

    torch's message suggests ``weights_only=False``, which would run whatever code the pickle carries:
    never the way out for a file of unknown origin.
    """
    text = str(exc)
    if "weights_only" in text or "Weights only load failed" in text or type(exc).__name__ == "UnpicklingError":
        return "it holds Python objects besides tensors and plain values; nothing in it was run"
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises:
        WeightsError: the file is missing, truncated, not a checkpoint, carries code, or has
            another format version.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path} is not a loadable checkpoint ({load_failure(exc)}); it may be truncated, "
                           "or not a melanoma-train checkpoint") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise WeightsError(f"{path} is not a melanoma checkpoint (no model state)")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise WeightsError(f"{path} has checkpoint format {version}, this melanoma reads {FORMAT_VERSION}")
    return payload
