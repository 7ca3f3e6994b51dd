"""Cross-validation folds: stratified, disjoint, reproducible."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedKFold

from melanoma.errors import ConfigError, DataError


def make_folds(labels: Sequence[int], n_folds: int = 3, seed: int = 0) -> np.ndarray:
    """Assign every image to one validation fold with scikit-learn's ``StratifiedKFold``.

    Args:
        labels: the 0/1 label of each image.
        n_folds: number of folds (at least 2).
        seed: shuffling seed; the same seed gives the same folds.

    Returns:
        An int array with each image's fold, ``0 .. n_folds-1``.

    Raises:
        ConfigError: ``n_folds`` is below 2.
        DataError: a class has fewer images than folds.
    """
    if n_folds < 2:
        raise ConfigError(f"cv.folds={n_folds} must be at least 2")
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=2)
    if counts.min() < n_folds:
        raise DataError(f"class {int(counts.argmin())} has {counts.min()} training images, fewer than "
                        f"cv.folds={n_folds}; add images or lower cv.folds")
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.empty(len(labels), dtype=int)
    for k, (_, val_idx) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        fold[val_idx] = k
    return fold
