"""Test-set metrics with stratified bootstrap confidence intervals.

Every metric is computed for all resamples at once on a (resamples x images) matrix, so
1,000+ resamples of a 1,000-image test set take about a second. The point estimate is the
same code applied to the unresampled set; ``tests/test_confidence.py`` checks it against
scikit-learn. Sensitivity, recall and specificity are the exception: each is a proportion of one
class's fixed count, and gets Wilson's score interval (:func:`proportion_interval`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import binomtest, norm, rankdata

from melanoma.metrics import pauc_above_tpr, predictive_values

THRESHOLD_METRICS = ("accuracy", "f1", "precision", "recall", "sensitivity", "specificity", "balanced_accuracy",
                     "ppv_at_prevalence", "npv_at_prevalence")
RANKING_METRICS = ("auc", "pauc_80", "ece", "brier")
PROPORTIONS = {"sensitivity": 1, "recall": 1, "specificity": 0}  # metric -> the class it is a proportion of


def _div(num: np.ndarray, den: np.ndarray, empty: float = np.nan) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), empty)


def auc_rows(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The ROC AUC of each row of ``y`` and ``p`` (shape resamples x images) at once; NaN for a one-class row.

    Average ranks for ties: the Mann-Whitney form, equal to scikit-learn's ``roc_auc_score``.
    """
    n_pos = y.sum(1)
    n_neg = y.shape[1] - n_pos
    ranks = rankdata(p, axis=1)
    return _div((ranks * y).sum(1) - n_pos * (n_pos + 1) / 2, n_pos * n_neg)


def _ranking(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Threshold-free metrics of each row of ``y`` and ``p`` (shape resamples x images)."""
    rows, n = y.shape
    n_pos = y.sum(1)
    n_neg = n - n_pos
    auc = auc_rows(y, p)
    both = (n_pos > 0) & (n_neg > 0)
    pauc = np.array([pauc_above_tpr(y[i], p[i]) if both[i] else np.nan for i in range(rows)])
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1) + n_bins * np.arange(rows)[:, None]
    gap = (np.bincount(bins.ravel(), weights=p.ravel(), minlength=rows * n_bins)
           - np.bincount(bins.ravel(), weights=y.ravel().astype(float), minlength=rows * n_bins))
    ece = np.abs(gap.reshape(rows, n_bins)).sum(1) / n
    return {"auc": auc, "pauc_80": pauc, "ece": ece, "brier": ((p - y) ** 2).mean(1)}


def _at_threshold(y: np.ndarray, p: np.ndarray, threshold: float, prevalence: float) -> dict[str, np.ndarray]:
    """Confusion-matrix metrics of each row at one threshold; undefined values are NaN."""
    pred, truth = p >= threshold, y.astype(bool)
    tp, fp = (pred & truth).sum(1), (pred & ~truth).sum(1)
    fn, tn = (~pred & truth).sum(1), (~pred & ~truth).sum(1)
    sens, spec = _div(tp, tp + fn), _div(tn, tn + fp)
    ppv, npv = predictive_values(sens, spec, prevalence)
    return {
        "accuracy": (tp + tn) / y.shape[1],
        "f1": _div(2 * tp, 2 * tp + fp + fn, empty=0.0),  # scikit-learn's zero_division=0
        "precision": _div(tp, tp + fp, empty=0.0),
        "recall": sens,
        "sensitivity": sens,
        "specificity": spec,
        "balanced_accuracy": (sens + spec) / 2,
        "ppv_at_prevalence": ppv,
        "npv_at_prevalence": npv,
    }


def stratified_resamples(labels: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Index matrix (resamples x images): each row redraws positives among positives and
    negatives among negatives, so every resample keeps the test set's class counts."""
    rng = np.random.default_rng(seed)
    columns = []
    for cls in (0, 1):
        members = np.flatnonzero(labels == cls)
        if len(members):
            columns.append(rng.choice(members, size=(n_resamples, len(members)), replace=True))
    return np.concatenate(columns, axis=1)


def bc_interval(point: float, samples: np.ndarray, level: float) -> dict:
    """Point estimate and its bias-corrected percentile interval.

    Plain percentiles fail for biased statistics such as the ECE, whose resamples mostly lie
    above the point estimate; the bias correction shifts the percentiles by how far the
    bootstrap distribution sits off the point (Efron's BC interval; BCa without the
    acceleration term, which would need a jackknife over every image). When nearly every
    resample lies on one side of the point (a well-calibrated model's ECE), even the corrected
    interval can miss it; it is then widened to reach the point, a conservative choice.
    """
    finite = samples[np.isfinite(samples)]
    if not np.isfinite(point) or len(finite) == 0:
        return {"value": None, "ci": None}
    below = np.mean(finite < point) + 0.5 * np.mean(finite == point)
    z0 = norm.ppf(np.clip(below, 0.5 / len(finite), 1 - 0.5 / len(finite)))
    z = norm.ppf(0.5 + level / 2)
    lo, hi = np.quantile(finite, [norm.cdf(2 * z0 - z), norm.cdf(2 * z0 + z)])
    return {"value": float(point), "ci": [float(min(lo, point)), float(max(hi, point))]}


def proportion_interval(hits: int, n: int, level: float) -> dict:
    """A proportion ``hits / n`` and its Wilson score interval (scipy's ``binomtest``).

    Sensitivity and specificity are proportions of one class's images, whose count the stratified
    resamples keep fixed, so their bootstrap is a binomial resample with a percentile (Wald-like)
    interval, which collapses to a point at 0 or 1: five of five malignant images found gave
    ``[1, 1]``. Wilson's interval does not (5 of 5: ``[0.57, 1]``; 1 of 1: ``[0.21, 1]``) and stays
    near its level for small ``n`` (Brown, Cai and DasGupta, 2001). ``None`` for ``n = 0``.
    """
    if n == 0:
        return {"value": None, "ci": None}
    ci = binomtest(int(hits), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return {"value": hits / n, "ci": [float(ci.low), float(ci.high)]}


def proportions_at(labels: np.ndarray, probs: np.ndarray, threshold: float, level: float) -> dict[str, dict]:
    """Sensitivity, recall and specificity at ``threshold``, each with :func:`proportion_interval`."""
    called = np.asarray(probs) >= threshold
    out = {}
    for key, cls in PROPORTIONS.items():
        members = np.asarray(labels) == cls
        out[key] = proportion_interval(int((called[members] == bool(cls)).sum()), int(members.sum()), level)
    return out


def metrics_with_ci(labels: Sequence[int], probs: Sequence[float], thresholds: Mapping[str, float],
                    prevalence: float = 0.05, n_resamples: int = 1000, level: float = 0.95,
                    seed: int = 0) -> dict:
    """Every metric at every threshold, each with a bootstrap confidence interval (stratified, BC;
    Wilson's for sensitivity, recall and specificity).

    Args:
        labels: true 0/1 labels of the test images.
        probs: predicted probabilities of malignancy.
        thresholds: named operating points, e.g. ``{"0.5": 0.5, "youden": 0.41, "sens95": 0.2}``.
        prevalence: clinical prevalence for ``ppv_at_prevalence`` and ``npv_at_prevalence``.
        n_resamples: bootstrap resamples (stratified by class).
        level: confidence level of the intervals.
        seed: seed of the resampling; the same seed gives the same intervals.

    Returns:
        ``{name: {"threshold": t, "metrics": {metric: {"value": v, "ci": [lo, hi]}}}}`` plus
        ``"unavailable": {metric: reason}`` for metrics the labels cannot support (a test set
        with one class has no AUC); those have ``value`` and ``ci`` set to ``None``.
    """
    y = np.asarray(labels, dtype=int)
    p = np.asarray(probs, dtype=float)
    idx = stratified_resamples(y, n_resamples, seed)
    yb, pb = y[idx], p[idx]
    ranking_point, ranking_boot = _ranking(y[None], p[None]), _ranking(yb, pb)
    out: dict = {}
    for name, threshold in thresholds.items():
        point = ranking_point | _at_threshold(y[None], p[None], threshold, prevalence)
        boot = ranking_boot | _at_threshold(yb, pb, threshold, prevalence)
        proportions = proportions_at(y, p, threshold, level)
        out[name] = {"threshold": float(threshold),
                     "metrics": {k: proportions[k] if k in proportions else bc_interval(point[k][0], boot[k], level)
                                 for k in (*THRESHOLD_METRICS, *RANKING_METRICS)}}
    missing = sorted({k for block in out.values() for k, v in block["metrics"].items() if v["value"] is None})
    if missing:
        reason = (f"the test set holds only {'malignant' if y.any() else 'benign'} images"
                  if len(set(y.tolist())) < 2 else "undefined at some threshold (no positive predictions)")
        out["unavailable"] = dict.fromkeys(missing, reason)
    return out


def held_promises(results: dict, ensemble_oof: dict) -> dict:
    """What each OOF-chosen operating point promised, beside what it reached on the scored images.

    Returns:
        ``{name: {"oof": {"sensitivity", "specificity"}, "test": {"sensitivity", "specificity"}}}``,
        the test values with their bootstrap CIs, for every point that training measured.
    """
    keys = ("sensitivity", "specificity")
    return {name: {"oof": {k: ensemble_oof[name].get(k) for k in keys},
                   "test": {k: results[name]["metrics"][k] for k in keys}}
            for name in results if name in ensemble_oof}
