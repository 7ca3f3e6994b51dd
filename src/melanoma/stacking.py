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
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier

from melanoma.metadata import Kind, MetadataEncoder

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

    def predict(self, probs: np.ndarray, metadata: pd.DataFrame) -> np.ndarray:
        """The stacked probability of new images: the mean over the fold stackers."""
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
