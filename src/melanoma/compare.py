"""Comparing two models honestly: the paired difference in AUC on the same images, with its uncertainty.

Two models scored on the same images are correlated: an unpaired comparison of their two AUC
intervals is far too conservative, and a difference of point estimates says nothing. Here both
are resampled together (a stratified bootstrap of image indices, shared by the two models) for
a bias-corrected interval of ``AUC_B - AUC_A``, and DeLong's test (DeLong, DeLong and
Clarke-Pearson 1988, in the fast form of Sun and Xu 2014) gives its z statistic and p value.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import norm, rankdata

from melanoma.confidence import auc_rows, bc_interval, stratified_resamples
from melanoma.errors import DataError


def delong(labels: Sequence[int], probs_a: Sequence[float], probs_b: Sequence[float],
           level: float = 0.95) -> dict:
    """DeLong's test of ``AUC_B - AUC_A`` for two correlated ROC curves on the same images.

    Returns:
        ``{"auc_a", "auc_b", "difference", "se", "z", "p_value", "ci"}`` (two-sided; the CI is the
        normal interval ``difference +- z * se``). With identical scores the difference is 0 with
        ``se`` 0, ``z`` 0 and ``p_value`` 1.

    Raises:
        DataError: the labels hold a single class.
    """
    y = np.asarray(labels, dtype=int)
    scores = np.stack([np.asarray(probs_a, dtype=float), np.asarray(probs_b, dtype=float)])
    positives, negatives = scores[:, y == 1], scores[:, y == 0]
    m, n = positives.shape[1], negatives.shape[1]
    if m < 2 or n < 2:
        raise DataError(f"DeLong's test needs at least 2 images of each class among the compared images "
                        f"({m} malignant, {n} benign)")
    # Midranks within each class and over both give the structural components V10 and V01.
    tx, ty = rankdata(positives, axis=1), rankdata(negatives, axis=1)
    tz = rankdata(np.concatenate([positives, negatives], axis=1), axis=1)
    auc = (tz[:, :m].sum(1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1 - (tz[:, m:] - ty) / m
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    variance = max(float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]), 0.0)
    difference, se = float(auc[1] - auc[0]), variance ** 0.5
    z = difference / se if se > 0 else 0.0
    half = norm.ppf(0.5 + level / 2) * se
    return {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "difference": difference, "se": se, "z": z,
            "p_value": float(2 * norm.sf(abs(z))) if se > 0 else 1.0, "ci": [difference - half, difference + half]}


def paired_auc_difference(labels: Sequence[int], probs_a: Sequence[float], probs_b: Sequence[float],
                          n_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """``AUC_B - AUC_A`` on the same images, with a paired stratified bootstrap CI and DeLong's test.

    Args:
        labels: 0/1 labels of the images both models scored.
        probs_a, probs_b: each model's probabilities of malignancy, in the same image order.
        n_resamples: bootstrap resamples (by class, the same indices for both models).
        level: confidence level.
        seed: seed of the resampling.

    Returns:
        ``{"n_images", "n_positive", "auc_a", "auc_b", "difference": {"value", "ci"}, "bootstrap":
        {"n_resamples", "level", "seed", "paired", "stratified"}, "delong": ...}``.

    Raises:
        DataError: the inputs differ in length, or the labels hold a single class.
    """
    y = np.asarray(labels, dtype=int)
    a, b = np.asarray(probs_a, dtype=float), np.asarray(probs_b, dtype=float)
    if not len(y) == len(a) == len(b):
        raise DataError(f"the two models scored {len(a)} and {len(b)} images for {len(y)} labels")
    test = delong(y, a, b, level)
    idx = stratified_resamples(y, n_resamples, seed)
    samples = auc_rows(y[idx], b[idx]) - auc_rows(y[idx], a[idx])
    return {"n_images": int(len(y)), "n_positive": int(y.sum()), "auc_a": test["auc_a"], "auc_b": test["auc_b"],
            "difference": bc_interval(test["difference"], samples, level),
            "bootstrap": {"n_resamples": n_resamples, "level": level, "seed": seed, "paired": True,
                          "stratified": True},
            "delong": {k: test[k] for k in ("se", "z", "p_value", "ci")}}
