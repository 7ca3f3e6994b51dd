"""Stacking: gradient-boosted trees on a run's out-of-fold image probabilities plus the metadata.

As the ISIC 2024 top teams did: a second-level model sees the image model's logit and the clinical
metadata. It uses the run's own folds: each fold's trees are fitted on the OOF rows of the other
folds only and predict this fold, so no tree sees the label of a row it predicts (the usual
stacking scheme; the other folds' image probabilities come from models that did train on this
fold's images, a second-order effect every stacker on OOF predictions shares). On new images the image
probability is the fold ensemble's, and the stacked probability the mean of the fold stackers'.

The trees are scikit-learn's ``HistGradientBoostingClassifier`` (no new dependency), small and
regularised for sets of hundreds of images. They are refitted from the run's files when needed, not
stored: the fit is deterministic (``random_state``) and takes well under a second, and no pickle
is ever written or read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from sklearn.ensemble import HistGradientBoostingClassifier

from melanoma.checkpoint import CONFIG, read_json
from melanoma.data import load_records
from melanoma.errors import DataError
from melanoma.inference import Ensemble
from melanoma.metadata import Kind, MetadataEncoder, parse_columns
from melanoma.metrics import binary_metrics, choose_thresholds

TREE_SETTINGS = {"learning_rate": 0.05, "max_iter": 150, "max_leaf_nodes": 8, "min_samples_leaf": 20,
                 "l2_regularization": 1.0, "early_stopping": False}


def _logit(probs: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=float), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


@dataclass
class Stacker:
    """The fold stackers: one encoder and one tree ensemble per fold of the image run."""

    encoders: list[MetadataEncoder]
    trees: list[HistGradientBoostingClassifier]

    def features(self, k: int, probs: np.ndarray, metadata: pd.DataFrame) -> np.ndarray:
        """Fold ``k``'s inputs: the image logit, then its encoding of the metadata."""
        return np.column_stack([_logit(probs), self.encoders[k].transform(metadata)])

    @property
    def columns(self) -> list[str]:
        """The metadata columns the trees read besides the image probability."""
        return list(self.encoders[0].columns)

    def check_columns(self, metadata: pd.DataFrame, source: str = "the metadata") -> None:
        """Raise a :class:`DataError` naming the first column the trees read that ``metadata`` lacks."""
        missing = [c for c in self.columns if c not in metadata.columns]
        if missing:
            raise DataError(f"{source} has no metadata column {missing[0]!r}, which the stacked model reads (it "
                            f"needs {', '.join(self.columns)}); add the column (empty cells are unknown values)")

    def predict(self, probs: np.ndarray, metadata: pd.DataFrame, source: str = "the metadata") -> np.ndarray:
        """The stacked probability of new images: the mean over the fold stackers.

        Raises:
            DataError: ``metadata`` (from ``source``) lacks a column the trees read.
        """
        self.check_columns(metadata, source)
        return np.mean([tree.predict_proba(self.features(k, probs, metadata))[:, 1]
                        for k, tree in enumerate(self.trees)], axis=0)


def fit_stacker(oof: pd.DataFrame, columns: Mapping[str, Kind | None], seed: int = 0) -> tuple[Stacker, np.ndarray]:
    """Fit one stacker per fold on the other folds' OOF rows and predict its own fold.

    Args:
        oof: the run's ``oof_predictions.csv`` (``label, fold, prob``) with the metadata ``columns`` joined.
        columns: the metadata columns and kinds (:func:`melanoma.metadata.parse_columns`).
        seed: ``random_state`` of the trees.

    Returns:
        The fold stackers, and the stacked out-of-fold probability of every row of ``oof``.
    """
    stacked = np.empty(len(oof))
    encoders, trees = [], []
    columns = MetadataEncoder.fit(oof, columns).columns  # each column's kind from every row, for all folds
    folds = oof["fold"].to_numpy()
    for k in range(int(folds.max()) + 1):
        train, held = oof[folds != k], folds == k
        encoder = MetadataEncoder.fit(train, columns)
        tree = HistGradientBoostingClassifier(random_state=seed, **TREE_SETTINGS)
        encoders.append(encoder)
        trees.append(tree)
        stacker = Stacker(encoders, trees)
        tree.fit(stacker.features(k, train["prob"].to_numpy(), train), train["label"].to_numpy())
        stacked[held] = tree.predict_proba(stacker.features(k, oof["prob"].to_numpy()[held], oof[held]))[:, 1]
    return Stacker(encoders, trees), stacked


@dataclass
class RunStacker:
    """A training run's stacker, refitted from its files, with what its out-of-fold predictions chose.

    Attributes:
        stacker: the fold stackers.
        oof: the run's OOF rows with the metadata, ``prob_image`` (the image model's) and ``prob`` (stacked).
        thresholds: operating points chosen on the stacked OOF predictions.
        oof_at_thresholds: the stacked OOF metrics at each of them.
        seed: ``random_state`` of the trees.
        data: the run's ``data`` config (where its images and manifest are).
    """

    stacker: Stacker
    oof: pd.DataFrame
    thresholds: dict[str, float]
    oof_at_thresholds: dict[str, dict]
    seed: int
    data: dict

    def operating_points_of(self, ensemble: Ensemble) -> Ensemble:
        """``ensemble`` with this stacker's operating points (chosen on the stacked OOF predictions).

        The models stay the image models; thresholds, their OOF metrics and so the degenerate-point
        warning and the promise checks become the stacked model's. The stacked OOF predictions were
        made without TTA, so the image models' thresholds per TTA mode are dropped.
        """
        return replace(ensemble, thresholds=dict(self.thresholds), oof_at_thresholds=dict(self.oof_at_thresholds),
                       thresholds_by_tta={}, oof_at_thresholds_by_tta={}, thresholds_tta="none", stacked=True)


def stacker_from_run(run: str | Path, seed: int | None = None) -> RunStacker:
    """Refit a training run's stacker from its ``config.yaml``, ``oof_predictions.csv`` and manifest.

    Args:
        run: a finished ``melanoma-train`` run trained with ``data.metadata``.
        seed: ``random_state`` of the trees; ``None`` is the one ``melanoma-stack`` recorded in
            ``RUN/stack/metrics.json``, else 0. The same seed refits the same trees.

    Raises:
        DataError: the run lacks its files, was trained without metadata, or its data moved.
    """
    run = Path(run)
    if not (run / CONFIG).is_file() or not (run / "oof_predictions.csv").is_file():
        raise DataError(f"{run} holds no finished melanoma-train run ({CONFIG} and oof_predictions.csv); point "
                        "at one")
    data = yaml.safe_load((run / CONFIG).read_text())["data"]
    columns = parse_columns(data.get("metadata") or [])
    if not columns:
        raise DataError(f"{run} was trained without metadata; train with data=csv data.metadata=[age_approx,sex] "
                        "(model.fusion=none is enough: stacking adds the metadata to the image model)")
    records = load_records(data["layout"], data["root"], tuple(data["classes"]), data["manifest"],
                           columns=list(columns))
    oof = pd.read_csv(run / "oof_predictions.csv")
    absent = sorted(set(oof["path"]) - set(records["path"]))
    if absent:
        raise DataError(f"{data['manifest']} no longer lists {absent[0]} ({len(absent)} of the run's {len(oof)} "
                        "images): the data moved since training; stack where the run's data is")
    if seed is None:
        seed = int((read_json(run / "stack" / "metrics.json").get("settings") or {}).get("random_state", 0))
    oof = oof.merge(records[["path", *columns]], on="path", how="left", validate="one_to_one")
    stacker, stacked = fit_stacker(oof, columns, seed)
    oof = oof.assign(prob_image=oof["prob"], prob=stacked)
    thresholds = choose_thresholds(oof["label"], stacked)
    return RunStacker(stacker, oof, thresholds,
                      {name: binary_metrics(oof["label"], stacked, t) for name, t in thresholds.items()}, seed, data)


def with_stacker(run: str | Path, ensemble: Ensemble, stack: bool) -> tuple[Ensemble, RunStacker | None]:
    """``(ensemble, None)``, or with ``stack`` the run's refitted stacker and ``ensemble`` at its operating points.

    What ``melanoma-eval eval.stack=true`` and ``melanoma-predict stack=true`` score with: the image
    models stay the fold ensemble; thresholds (so the degenerate-point warning and the promise
    checks) become the stacked model's (:meth:`RunStacker.operating_points_of`).
    """
    if not stack:
        return ensemble, None
    stacked = stacker_from_run(run)
    return stacked.operating_points_of(ensemble), stacked
