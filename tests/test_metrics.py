"""Metrics equal scikit-learn's and the hand-computed confusion-matrix ratios."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from melanoma.metrics import METRICS, binary_metrics, summarize


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_binary_metrics_match_sklearn(threshold: float) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = np.clip(0.35 * y + rng.uniform(0, 0.65, 500), 0, 1)
    pred = (p >= threshold).astype(int)
    m = binary_metrics(y, p, threshold)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn)) == pytest.approx(m["recall"])
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert (m["n"], m["n_positive"]) == (500, int(y.sum()))


def test_hand_computed_example() -> None:
    m = binary_metrics([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9])
    assert (m["accuracy"], m["precision"], m["recall"], m["specificity"], m["auc"]) == (0.5, 0.5, 0.5, 0.5, 0.75)


def test_one_class_gives_none_not_nan() -> None:
    m = binary_metrics([0, 0, 0], [0.2, 0.7, 0.1])
    assert m["auc"] is None and m["sensitivity"] is None and m["balanced_accuracy"] is None
    assert m["specificity"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(2 / 3)


def test_summarize_mean_and_sample_std() -> None:
    folds = [{k: v for k in METRICS} for v in (0.6, 0.8, 1.0)]
    folds[2]["auc"] = None
    mean, std = summarize(folds)
    assert mean["accuracy"] == pytest.approx(0.8) and std["accuracy"] == pytest.approx(0.2)
    assert mean["auc"] == pytest.approx(0.7) and std["auc"] == pytest.approx(np.std([0.6, 0.8], ddof=1))
