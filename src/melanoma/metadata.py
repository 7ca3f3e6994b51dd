"""Clinical metadata (age, sex, anatomic site, ...) as model inputs: the encoding of a manifest's columns.

A :class:`MetadataEncoder` is fitted on the training part of one fold only, so nothing of the
validation or test images leaks into it, and it is stored in that fold's ``best.pt`` with its
column names and levels. Numeric columns are standardised and get a missing-indicator; categorical
ones are one-hot over the levels seen in training, plus an ``unknown`` level that also takes the
missing values and any level first seen at evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from melanoma.errors import ConfigError

Kind = Literal["numeric", "categorical"]
KINDS = ("numeric", "categorical")
MISSING = frozenset({"", "unknown", "nan", "na", "n/a", "none", "null", "?"})  # compared lower-cased
UNKNOWN = "unknown"


def parse_columns(spec: Sequence[str]) -> dict[str, Kind | None]:
    """``data.metadata``'s entries: ``name`` (kind detected from the values) or ``name:numeric|categorical``.

    Raises:
        ConfigError: an unknown kind, or a column named twice.
    """
    columns: dict[str, Kind | None] = {}
    for entry in spec:
        name, _, kind = str(entry).partition(":")
        name, kind = name.strip(), kind.strip() or None
        if not name:
            raise ConfigError(f"data.metadata entry {entry!r} names no column; write NAME or NAME:numeric|categorical")
        if kind is not None and kind not in KINDS:
            raise ConfigError(f"data.metadata entry {entry!r}: {kind!r} is not one of {', '.join(KINDS)}")
        if name in columns:
            raise ConfigError(f"data.metadata names the column {name!r} twice")
        columns[name] = kind
    return columns


def is_missing(values: pd.Series) -> np.ndarray:
    """Which values are missing: empty, NaN, or a word for unknown (see ``MISSING``)."""
    text = values.astype(str).str.strip().str.lower()
    return (text.isin(MISSING) | values.isna()).to_numpy()


def _as_numbers(values: pd.Series) -> np.ndarray | None:
    """The values as floats (missing ones NaN), or ``None`` if some present value is not a number."""
    missing = is_missing(values)
    numbers = pd.to_numeric(values.where(~missing), errors="coerce").to_numpy(dtype=float)
    if np.isnan(numbers[~missing]).any():
        return None
    return numbers


def _levels(values: pd.Series) -> np.ndarray:
    """Categorical values as stripped text, missing ones as ``unknown``."""
    text = values.astype(str).str.strip()
    return np.where(is_missing(values), UNKNOWN, text.to_numpy())


@dataclass
class MetadataEncoder:
    """How metadata columns become one float vector per image.

    Attributes:
        columns: the columns in order, each ``numeric`` or ``categorical``.
        stats: ``column -> [mean, std]`` of the numeric columns in the fitted rows.
        levels: ``column -> levels`` of the categorical columns seen in the fitted rows (``unknown`` last).
    """

    columns: dict[str, Kind]
    stats: dict[str, list[float]] = field(default_factory=dict)
    levels: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def fit(cls, frame: pd.DataFrame, columns: Mapping[str, Kind | None]) -> MetadataEncoder:
        """Fit on ``frame`` (a fold's training rows); a column of ``None`` kind is numeric when every
        present value is a number, else categorical."""
        kinds: dict[str, Kind] = {}
        stats, levels = {}, {}
        for name, kind in columns.items():
            numbers = _as_numbers(frame[name]) if kind != "categorical" else None
            if kind == "numeric" and numbers is None:
                bad = frame[name][~is_missing(frame[name])]
                bad = bad[pd.to_numeric(bad, errors="coerce").isna()]
                raise ConfigError(f"data.metadata column {name!r} is declared numeric but holds {bad.iloc[0]!r}; "
                                  f"declare it {name}:categorical or fix the value")
            if numbers is not None:
                kinds[name] = "numeric"
                present = numbers[~np.isnan(numbers)]
                mean = float(present.mean()) if len(present) else 0.0
                std = float(present.std()) if len(present) > 1 else 0.0
                stats[name] = [mean, std if std > 0 and math.isfinite(std) else 1.0]
            else:
                kinds[name] = "categorical"
                seen = sorted(set(_levels(frame[name])) - {UNKNOWN})
                levels[name] = [*seen, UNKNOWN]
        return cls(kinds, stats, levels)

    @property
    def feature_names(self) -> list[str]:
        """One name per output feature: ``age``, ``age=missing``, ``sex=female``, ..., ``sex=unknown``."""
        names = []
        for name, kind in self.columns.items():
            if kind == "numeric":
                names += [name, f"{name}=missing"]
            else:
                names += [f"{name}={level}" for level in self.levels[name]]
        return names

    @property
    def width(self) -> int:
        """Number of features per image."""
        return len(self.feature_names)

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """``(len(frame), width)`` float32 features; missing numbers are the training mean (0) with the
        indicator at 1, unseen or missing levels are ``unknown``."""
        parts = []
        for name, kind in self.columns.items():
            if kind == "numeric":
                numbers = pd.to_numeric(frame[name].where(~is_missing(frame[name])), errors="coerce").to_numpy(float)
                missing = np.isnan(numbers)
                mean, std = self.stats[name]
                parts += [np.where(missing, 0.0, (numbers - mean) / std), missing.astype(float)]
            else:
                levels = self.levels[name]
                index = {level: i for i, level in enumerate(levels)}
                codes = np.array([index.get(v, len(levels) - 1) for v in _levels(frame[name])], dtype=int)
                parts += list(np.eye(len(levels))[codes].T) if len(frame) else [np.zeros(0)] * len(levels)
        return np.stack(parts, axis=1).astype(np.float32) if parts else np.zeros((len(frame), 0), np.float32)

    def to_dict(self) -> dict:
        """Plain values for ``best.pt`` (``weights_only`` loading) and JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping) -> MetadataEncoder:
        """The encoder :meth:`to_dict` stored."""
        return cls(dict(values["columns"]), {k: list(v) for k, v in values["stats"].items()},
                   {k: list(v) for k, v in values["levels"].items()})
