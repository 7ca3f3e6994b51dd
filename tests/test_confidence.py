"""Operating points, test metrics and their bootstrap confidence intervals."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from melanoma.confidence import metrics_with_ci, stratified_resamples
from melanoma.metrics import choose_thresholds, pauc_above_tpr, predictive_values


def _scores(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2 == 0).astype(int)
    return y, 1 / (1 + np.exp(-(1.5 * (2 * y - 1) + rng.normal(0, 1.5, n))))


def test_thresholds_on_constructed_oof_predictions() -> None:
    labels = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    probs = [0.1, 0.2, 0.3, 0.6, 0.25, 0.4, 0.7, 0.8, 0.9, 0.95]
    t = choose_thresholds(labels, probs)
    # By hand, J = sensitivity + specificity - 1 at each candidate threshold:
    # 0.95: 1/6+1-1=.17  0.9: .33  0.8: .50  0.7: 4/6+4/4-1=.67  0.6: 4/6+3/4-1=.42  0.4: .58  0.3: .33  0.25: .50
    assert t["youden"] == 0.7
    # sens95: the highest threshold that keeps all six malignant (5 of 6 = 0.83 is below 0.95)
    assert t["sens95"] == 0.25 and t["0.5"] == 0.5


def test_point_metrics_match_sklearn_and_hand_computation() -> None:
    y, p = _scores(400)
    res = metrics_with_ci(y, p, {"0.5": 0.5}, prevalence=0.05, n_resamples=200, seed=1)["0.5"]["metrics"]
    pred = (p >= 0.5).astype(int)
    assert res["accuracy"]["value"] == pytest.approx(skm.accuracy_score(y, pred))
    assert res["f1"]["value"] == pytest.approx(skm.f1_score(y, pred))
    assert res["precision"]["value"] == pytest.approx(skm.precision_score(y, pred))
    assert res["specificity"]["value"] == pytest.approx(skm.recall_score(1 - y, 1 - pred))
    assert res["balanced_accuracy"]["value"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert res["auc"]["value"] == pytest.approx(skm.roc_auc_score(y, p))
    assert res["brier"]["value"] == pytest.approx(skm.brier_score_loss(y, p))
    assert res["pauc_80"]["value"] == pytest.approx(pauc_above_tpr(y, p))
    bins = np.minimum((p * 10).astype(int), 9)  # ECE over 10 equal-width bins, one bin at a time
    ece = sum(abs(p[bins == b].sum() - y[bins == b].sum()) for b in range(10)) / len(y)
    assert res["ece"]["value"] == pytest.approx(ece)
    ppv, npv = predictive_values(res["sensitivity"]["value"], res["specificity"]["value"], 0.05)
    assert res["ppv_at_prevalence"]["value"] == pytest.approx(ppv)
    assert res["npv_at_prevalence"]["value"] == pytest.approx(npv)


def test_pauc_is_the_raw_area_above_80_percent_sensitivity() -> None:
    y = np.array([0] * 50 + [1] * 50)
    assert pauc_above_tpr(y, y + 0.0) == pytest.approx(0.2)  # perfect: the whole 0.2-high band
    rng = np.random.default_rng(0)
    assert pauc_above_tpr(y, rng.uniform(size=100)) < 0.05  # chance: 0.02 in expectation
    # brute force: integrate (TPR - 0.8)+ over FPR on the ROC curve
    yy, p = _scores(300, seed=3)
    fpr, tpr, _ = skm.roc_curve(yy, p)
    grid = np.linspace(0, 1, 200001)
    area = np.clip(np.interp(grid, fpr, tpr) - 0.8, 0, None).mean()
    assert pauc_above_tpr(yy, p) == pytest.approx(area, abs=2e-3)


def test_ece_hand_computed() -> None:
    # bin [0.1,0.2): p=0.15 x2, y=0,1 -> gap |0.3-1| ; bin [0.9,1]: p=0.95, y=1 -> |0.95-1|
    res = metrics_with_ci([0, 1, 1], [0.15, 0.15, 0.95], {"0.5": 0.5}, n_resamples=20, seed=0)
    assert res["0.5"]["metrics"]["ece"]["value"] == pytest.approx((0.7 + 0.05) / 3)


def test_prevalence_reweights_ppv() -> None:
    ppv, npv = predictive_values(0.9, 0.8, 0.05)
    assert ppv == pytest.approx(0.9 * 0.05 / (0.9 * 0.05 + 0.2 * 0.95))
    assert npv == pytest.approx(0.8 * 0.95 / (0.8 * 0.95 + 0.1 * 0.05))
    assert predictive_values(0.9, 0.8, 0.5)[0] > ppv  # a 50/50 test split inflates PPV


def test_resamples_are_stratified_and_seeded() -> None:
    y = np.array([0] * 30 + [1] * 10)
    idx = stratified_resamples(y, 50, seed=4)
    assert idx.shape == (50, 40) and (y[idx].sum(1) == 10).all()
    assert np.array_equal(idx, stratified_resamples(y, 50, seed=4))


def test_cis_contain_the_point_and_shrink_with_more_data() -> None:
    widths = []
    for n in (100, 1600):
        y, p = _scores(n)
        res = metrics_with_ci(y, p, {"0.5": 0.5}, n_resamples=1000, seed=0)["0.5"]["metrics"]
        for key, value in res.items():
            assert value["ci"][0] <= value["value"] <= value["ci"][1], key
        widths.append({k: v["ci"][1] - v["ci"][0] for k, v in res.items()})
    for key in ("accuracy", "auc", "sensitivity", "brier", "pauc_80"):
        assert widths[1][key] < 0.6 * widths[0][key], key  # ~1/4 expected for 16x the data


def test_one_class_reports_unavailable_not_nan() -> None:
    res = metrics_with_ci([0, 0, 0, 0], [0.1, 0.6, 0.3, 0.2], {"0.5": 0.5}, n_resamples=50)
    metrics = res["0.5"]["metrics"]
    assert metrics["auc"] == {"value": None, "ci": None} and metrics["sensitivity"]["value"] is None
    assert metrics["specificity"]["value"] == pytest.approx(0.75)
    assert res["unavailable"]["auc"] == "the test set holds only benign images"


def test_sensitivity_and_specificity_get_wilson_intervals_that_do_not_collapse_at_one() -> None:
    """Five of five malignant images found: the stratified bootstrap of a proportion at 1 is [1, 1]; Wilson's
    score interval for 5/5 at 95% is [0.566, 1] (by hand: (n + z^2/2 -+ z sqrt(z^2/4)) / (n + z^2) at p = 1)."""
    y = np.array([1] * 5 + [0] * 20)
    p = np.array([0.9] * 5 + [0.1] * 18 + [0.8, 0.7])  # two false positives
    block = metrics_with_ci(y, p, {"0.5": 0.5}, n_resamples=200, seed=0)["0.5"]["metrics"]
    z = 1.959963984540054
    assert block["sensitivity"]["value"] == block["recall"]["value"] == 1.0
    assert block["sensitivity"]["ci"] == pytest.approx([5 / (5 + z**2), 1.0])
    assert block["recall"]["ci"] == block["sensitivity"]["ci"]
    phat, n = 18 / 20, 20  # specificity 18/20, Wilson by its formula
    centre = (phat + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * np.sqrt(phat * (1 - phat) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    assert block["specificity"]["value"] == pytest.approx(0.9)
    assert block["specificity"]["ci"] == pytest.approx([centre - half, centre + half])
    assert block["accuracy"]["ci"][0] < block["accuracy"]["value"] < block["accuracy"]["ci"][1]  # still bootstrapped
