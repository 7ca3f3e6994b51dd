"""Cross-validation folds: stratified, disjoint, reproducible."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from melanoma.errors import ConfigError, DataError
from melanoma.metadata import is_missing


def merge_groups(*keys: Sequence) -> np.ndarray:
    """One group id per image, joining images that share any of the keys (transitively).

    E.g. the audit's duplicate groups and a patient id: a patient's lesions stay together, and so do
    the copies of a lesion, even when a copy was filed under another patient. A missing key (empty,
    NaN, ``None``, ``unknown``, ``NA``, ...: :func:`melanoma.metadata.is_missing`) joins nothing.

    Returns:
        Ints ``0 .. n_groups-1``, numbered in order of first appearance.
    """
    n = len(keys[0])
    rows, cols, offset = [], [], n
    for key in keys:
        values = pd.Series(list(key), dtype=object)
        codes, uniques = pd.factorize(values.mask(is_missing(values)))  # factorize codes NaN and None as -1
        present = codes >= 0
        rows.append(np.flatnonzero(present))
        cols.append(codes[present] + offset)  # one graph node per distinct key value, after the images
        offset += len(uniques)
    edges = coo_matrix((np.ones(sum(map(len, rows))), (np.concatenate(rows), np.concatenate(cols))),
                       shape=(offset, offset))
    _, component = connected_components(edges, directed=False)
    return pd.factorize(component[:n])[0]


def make_folds(labels: Sequence[int], folds: int = 3, seed: int = 0,
               groups: Sequence[int] | None = None) -> np.ndarray:
    """Assign every image to one validation fold, stratified by label.

    Without ``groups`` this is scikit-learn's ``StratifiedKFold``; with them,
    ``StratifiedGroupKFold``, which keeps every group (e.g. the copies of one lesion) inside a
    single fold so that no fold validates on an image its model trained on a copy of.

    Args:
        labels: the 0/1 label of each image.
        folds: number of folds (at least 2; ``cv.folds``).
        seed: shuffling seed; the same seed gives the same folds.
        groups: optional group id of each image.

    Returns:
        An int array with each image's fold, ``0 .. folds-1``.

    Raises:
        ConfigError: ``folds`` is below 2.
        DataError: a class has fewer images (or, with ``groups``, fewer groups) than folds, or
            a validation fold would hold a single class.
    """
    if folds < 2:
        raise ConfigError(f"cv.folds={folds} must be at least 2")
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=2)
    if counts.min() < folds:
        raise DataError(f"class {int(counts.argmin())} has {counts.min()} training images, fewer than "
                        f"cv.folds={folds}; add images or lower cv.folds")
    if groups is None:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    else:
        for cls in (0, 1):  # scikit-learn checks images per class, not groups: a fold could lack the class
            holding = len(set(np.asarray(groups)[labels == cls].tolist()))
            if holding < folds:
                raise DataError(f"class {cls}'s images lie in only {holding} groups (of duplicates and "
                                f"data.group_column), fewer than cv.folds={folds}, so a fold would validate "
                                "without it; lower cv.folds, or set data.group_column=null (or "
                                "cv.group_duplicates=false)")
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold = np.empty(len(labels), dtype=int)
    for k, (_, val_idx) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        fold[val_idx] = k
    for k in range(folds):  # a fold of one class has no AUC: its model would keep its first epoch, unnoticed
        present = np.bincount(labels[fold == k], minlength=2)
        if present.min() == 0:
            raise DataError(f"validation fold {k} holds no images of class {int(present.argmin())} (the groups "
                            f"of duplicates and data.group_column are too uneven for cv.folds={folds}); "
                            "lower cv.folds, or set data.group_column=null (or cv.group_duplicates=false)")
    return fold
