"""The schema of every CLI's config: each key's type, range or choices, checked before anything is read or written.

Hydra composes YAML without types, so ``data.batch_size=abc`` or ``+trainer.epoch=3`` would otherwise
surface as a traceback deep inside training, or not at all. :func:`validate` walks the composed config
once at the entry point and names the first bad key, its value, what it must be and, for unknown keys,
the close names. The choices come from the modules that use them, so the schema cannot drift from them.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from melanoma.audit import METHODS
from melanoma.crossval import OPERATING_POINTS
from melanoma.data import SPLITS as DATA_SPLITS
from melanoma.errors import ConfigError
from melanoma.export import FORMATS, TTAS
from melanoma.fusion import FUSIONS
from melanoma.gradcam import SPLITS as EXPLAIN_SPLITS
from melanoma.metadata import parse_columns
from melanoma.optim import OPTIMIZERS, SCHEDULERS
from melanoma.transforms import INTERPOLATIONS

MONITORS = ("auc", "loss", "accuracy", "f1", "balanced_accuracy")


@dataclass(frozen=True)
class Rule:
    """What one key may hold: ``check(value)`` is true for a valid value; ``wants`` says it in words."""

    check: Callable[[Any], bool]
    wants: str

    def __or__(self, other: Rule) -> Rule:
        return Rule(lambda v: self.check(v) or other.check(v), f"{self.wants} or {other.wants}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _bounds(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> tuple[Callable[[float], bool], str]:
    def inside(v: float) -> bool:
        return ((lo is None or (v > lo if lo_open else v >= lo))
                and (hi is None or (v < hi if hi_open else v <= hi)))

    if lo is not None and hi is not None:
        words = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        words = f"{'>' if lo_open else '>='} {lo:g}"
    elif hi is not None:
        words = f"{'<' if hi_open else '<='} {hi:g}"
    else:
        words = ""
    return inside, words


def integer(lo: int | None = None, hi: int | None = None) -> Rule:
    """An integer (not a bool) within ``[lo, hi]``."""
    inside, words = _bounds(lo, hi, False, False)
    return Rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and inside(v),
                f"an integer {words}".rstrip())


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Rule:
    """A finite int or float within the bounds (open where asked)."""
    inside, words = _bounds(lo, hi, lo_open, hi_open)
    return Rule(lambda v: _is_number(v) and inside(v), f"a number {words}".rstrip())


def numbers(length: int, lo: float | None = None, hi: float | None = None) -> Rule:
    """A list of ``length`` numbers, each within ``[lo, hi]``."""
    inside, words = _bounds(lo, hi, False, False)
    return Rule(lambda v: isinstance(v, list | tuple) and len(v) == length
                and all(_is_number(x) and inside(x) for x in v),
                f"a list of {length} numbers{' ' + words if words else ''} (e.g. [{', '.join(['0.5'] * length)}])")


def choice(*options: str) -> Rule:
    """One of ``options`` (strings; Hydra's ``0.5`` arrives as a float and is compared as text)."""
    return Rule(lambda v: not isinstance(v, bool) and str(v) in options, f"one of {', '.join(options)}")


FLAG = Rule(lambda v: isinstance(v, bool), "true or false")
TEXT = Rule(lambda v: isinstance(v, str) and v != "", "a non-empty string")
NULL = Rule(lambda v: v is None, "null")
MAPPING = Rule(lambda v: isinstance(v, Mapping), "a group of keys")
THRESHOLD = choice(*OPERATING_POINTS[1:]) | number(0, 1)  # null = the run's operating point
WORKERS = choice("auto") | integer(0)

# One entry per key; a nested dict is a group. A key missing here is unknown, and refused.
DATA = {
    "layout": choice("kaggle", "folder", "csv"), "root": TEXT | NULL, "manifest": TEXT | NULL,
    "classes": Rule(lambda v: isinstance(v, list | tuple) and len(v) == 2 and all(isinstance(c, str) for c in v)
                    and v[0] != v[1], "two different class names, negative first (e.g. [benign, malignant])"),
    "image_size": integer(16, 4096), "batch_size": integer(1), "eval_batch_size": integer(1) | NULL,
    "num_workers": WORKERS, "prefetch_factor": integer(1) | NULL, "cache": choice("none", "memory", "disk"),
    "cache_edge": integer(16) | NULL, "cache_dir": TEXT | NULL, "on_bad_file": choice("error", "skip"),
    "sampler": choice("shuffle", "balanced"), "synthetic": NULL | MAPPING,
    "group_column": TEXT | NULL,
    "metadata": Rule(lambda v: isinstance(v, list | tuple) and all(isinstance(c, str) and c for c in v),
                     "a list of manifest column names (e.g. [age_approx,sex])"),
}
SYNTHETIC = {"n_train": integer(4), "n_test": integer(2), "size": integer(16, 4096), "seed": integer(0),
             "metadata": FLAG}
MODEL = {"name": TEXT, "pretrained": FLAG, "weights": TEXT | NULL, "drop_rate": number(0, 1, hi_open=True),
         "strict_weights": FLAG, "fusion": choice(*FUSIONS)}
AUGMENTATION = {
    "name": TEXT, "augment": FLAG, "crop_pct": number(0, 1, lo_open=True) | NULL,
    "interpolation": choice(*INTERPOLATIONS) | NULL,
    "scale": Rule(lambda v: numbers(2, 0, 1).check(v) and 0 < v[0] <= v[1],
                  "a list [min, max] with 0 < min <= max <= 1"),
    "hflip": number(0, 1), "vflip": number(0, 1), "rot90": FLAG, "rotation": number(0, 180), "vignette": number(0, 1),
    "vignette_radius": Rule(lambda v: numbers(2, 0, 2).check(v) and 0 < v[0] <= v[1],
                            "a list [min, max] of radii in half-sides, 0 < min <= max <= 2 (1.41 reaches the corners)"),
    "color_jitter": numbers(4, 0, None), "on_device": FLAG, "mean": numbers(3, 0, 1) | NULL,
    "std": numbers(3, 0, None) | NULL,
}
OPTIMIZER = {"name": choice(*OPTIMIZERS), "lr": number(0, lo_open=True), "weight_decay": number(0),
             "momentum": number(0, 1, hi_open=True), "layer_decay": number(0, 1, lo_open=True) | NULL}
SCHEDULER = {"name": choice(*SCHEDULERS), "min_lr": number(0), "warmup_epochs": number(0), "warmup_lr": number(0)}
RUNTIME = {"device": choice("auto", "cpu", "cuda"), "precision": choice("auto", "fp32", "fp16", "bf16"),
           "channels_last": FLAG}
TRAINER = {
    "epochs": integer(1), "compile": FLAG, "deterministic": FLAG, "monitor": choice(*MONITORS),
    "pos_weight": NULL | choice("auto") | number(0, lo_open=True), "clip_grad_norm": number(0, lo_open=True) | NULL,
    "ema_decay": number(0, 1, lo_open=True, hi_open=True) | NULL, "skip_nonfinite": FLAG, **RUNTIME,
}
CV = {"folds": integer(2), "seed": integer(0), "group_duplicates": FLAG, "operating_point": choice(*OPERATING_POINTS),
      "calibration": choice("temperature", "none"),
      "oof_tta": Rule(lambda v: isinstance(v, list | tuple) and all(str(m) in TTAS[1:] for m in v),
                      f"a list of TTA modes from {', '.join(TTAS[1:])} (e.g. [flip], or [] for none)")}
AUDIT = {"enabled": FLAG, "threshold": integer(0, 143), "workers": integer(1) | NULL,
         "method": choice(*METHODS), "similarity": number(0, 1, lo_open=True)}
EVAL = {"split": choice(*DATA_SPLITS, "all"), "tta": choice(*TTAS), "threshold": THRESHOLD | NULL,
        "prevalence": number(0, 1, lo_open=True, hi_open=True), "n_resamples": integer(0), "level":
        number(0, 1, lo_open=True, hi_open=True), "seed": integer(0), "batch_size": integer(1),
        "num_workers": WORKERS, "dedup": FLAG, "subgroups": FLAG, "stack": FLAG}
LOGGER = {  # logger=[a,b]: each chosen backend's group (melanoma.tracking)
    "csv": {"dir": TEXT | NULL}, "tensorboard": {"log_dir": TEXT | NULL},
    "mlflow": {"tracking_uri": TEXT, "artifact_location": TEXT | NULL, "experiment_name": TEXT, "run_name": TEXT | NULL,
               "request_retries": integer(0), "request_timeout": number(0, lo_open=True)},
    "wandb": {"project": TEXT, "entity": TEXT | NULL, "mode": choice("offline", "online", "disabled")},
}
BENCH = {"warmup": integer(1), "steps": integer(1), "timm_loader": FLAG}

SCHEMAS: dict[str, dict[str, Any]] = {
    "train": {"seed": integer(0), "resume": TEXT | NULL, "data": DATA, "model": MODEL, "augmentation": AUGMENTATION,
              "optimizer": OPTIMIZER, "scheduler": SCHEDULER, "trainer": TRAINER, "cv": CV, "audit": AUDIT,
              "logger": LOGGER},
    "audit_run": {"seed": integer(0), "data": DATA, "audit": AUDIT, "cv": CV},
    "bench": {"seed": integer(0), "bench": BENCH, "data": DATA, "model": MODEL, "augmentation": AUGMENTATION,
              "optimizer": OPTIMIZER, "trainer": TRAINER},
    # melanoma-eval: a null data key is the training run's own value.
    "eval": {"ckpt": TEXT, "data": {key: rule | NULL for key, rule in DATA.items()}, "eval": EVAL, "trainer": RUNTIME,
             "audit": AUDIT},
    "predict": {"ckpt": TEXT, "input": TEXT, "threshold": THRESHOLD | NULL, "tta": choice(*TTAS), "stack": FLAG,
                "batch_size": integer(1), "num_workers": WORKERS, "metadata": TEXT | NULL, "trainer": RUNTIME},
    "export": {"ckpt": TEXT, "format": choice(*FORMATS), "tta": choice(*TTAS), "out": TEXT | NULL,
               "images": TEXT | NULL, "n_images": integer(2), "tolerance": number(0, lo_open=True)},
    "explain": {"ckpt": TEXT, "input": TEXT | NULL, "split": choice(*EXPLAIN_SPLITS), "n": integer(1),
                "seed": integer(0), "threshold": THRESHOLD | NULL, "out": TEXT | NULL, "occlusion": FLAG,
                "trainer": RUNTIME},
}
_GROUPS_OF_GROUPS = {"data.synthetic": SYNTHETIC}  # groups that may also be null


def problems(config: Mapping[str, Any], config_name: str) -> list[str]:
    """Every key of a resolved config that breaks the schema of ``config_name``, one sentence each.

    Args:
        config: the composed config as plain containers (``OmegaConf.to_container(cfg, resolve=True)``).
        config_name: the top-level config (``train``, ``eval``, ``predict``, ``explain``, ``audit_run``, ``bench``).

    Returns:
        Sentences like ``data.batch_size='abc' must be an integer >= 1``; empty when the config is valid.
    """
    found = _walk(config, SCHEMAS[config_name], "")
    return found or _across_keys(config, config_name)


def _across_keys(config: Mapping[str, Any], config_name: str) -> list[str]:
    """Rules that tie keys of a valid config together (checked once each key is valid on its own)."""
    found = []
    data, model = config.get("data") or {}, config.get("model") or {}
    if config_name == "train" and model.get("fusion", "none") != "none" and not data.get("metadata"):
        found.append(f"model.fusion={model['fusion']} needs metadata columns: data=csv data.manifest=CSV "
                     "data.metadata=[age_approx,sex] (or model.fusion=none)")
    pos_weight = (config.get("trainer") or {}).get("pos_weight")
    if config_name == "train" and data.get("sampler") == "balanced" and pos_weight is not None:
        found.append(f"data.sampler=balanced and trainer.pos_weight={pos_weight} both correct the class "
                     "imbalance; keep one (trainer.pos_weight=null, or data.sampler=shuffle)")
    if config_name in ("train", "audit_run") and data.get("layout") not in ("csv", None) and (
            data.get("metadata") or data.get("group_column")):
        found.append(f"data.metadata and data.group_column need data=csv (a manifest holds the columns); "
                     f"data.layout={data['layout']} has none")
    try:
        parse_columns(data.get("metadata") or [])
    except ConfigError as exc:
        found.append(str(exc))
    return found


def validate(cfg: DictConfig, config_name: str) -> None:
    """Check a composed config against the schema of ``config_name`` (see :func:`problems`).

    Raises:
        ConfigError: the first bad key, with the number of others, or an interpolation that does not resolve.
    """
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{str(exc).splitlines()[0]}; check the ${{...}} values of the overrides") from None
    found = problems(config, config_name)
    if found:
        more = f" (and {len(found) - 1} more: {'; '.join(found[1:])})" if len(found) > 1 else ""
        raise ConfigError(found[0] + more)


def _walk(values: Mapping[str, Any], schema: Mapping[str, Any], prefix: str) -> list[str]:
    found = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in schema:
            close = difflib.get_close_matches(str(key), list(schema), n=3)
            where = f"a key of {prefix.rstrip('.')}" if prefix else "a top-level key"
            found.append(f"{path} is not {where} (close: {', '.join(close) or 'none'}); "
                         f"the keys are {', '.join(schema)}")
        elif isinstance(schema[key], Mapping):
            if not isinstance(value, Mapping):
                found.append(f"{path}={value!r} must be a group of keys ({', '.join(schema[key])})")
            else:
                found += _walk(value, schema[key], f"{path}.")
        elif not schema[key].check(value):
            found.append(f"{path}={value!r} must be {schema[key].wants}")
        elif path in _GROUPS_OF_GROUPS and isinstance(value, Mapping):
            found += _walk(value, _GROUPS_OF_GROUPS[path], f"{path}.")
    return found
