"""Paired model comparison (#15): the AUC difference on the same images, bootstrap CI and DeLong's test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from melanoma.cli.compare import compare_runs, main
from melanoma.compare import delong, paired_auc_difference
from melanoma.errors import DataError


def _scores(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, a weak model and a strong model of the same images (the strong one sees the label more clearly)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(int)
    shared = rng.normal(size=n)  # both models see some of the same evidence: correlated scores
    weak = 1 / (1 + np.exp(-(0.5 * y + shared + rng.normal(size=n))))
    strong = 1 / (1 + np.exp(-(2.0 * y + shared + 0.5 * rng.normal(size=n))))
    return y, weak, strong


def _delong_by_definition(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """The difference and its DeLong variance from the pairwise kernel itself, O(m n), no ranks."""
    comps = []
    for p in (a, b):
        x, z = p[y == 1][:, None], p[y == 0][None, :]
        psi = (x > z) + 0.5 * (x == z)
        comps.append((psi.mean(), psi.mean(1), psi.mean(0)))
    m, n = (y == 1).sum(), (y == 0).sum()
    s10 = np.cov(np.stack([comps[0][1], comps[1][1]]))
    s01 = np.cov(np.stack([comps[0][2], comps[1][2]]))
    s = s10 / m + s01 / n
    return comps[1][0] - comps[0][0], s[0, 0] + s[1, 1] - 2 * s[0, 1]


def test_delong_matches_its_definition_and_scikit_learn() -> None:
    y, weak, strong = _scores()
    strong = np.round(strong, 2)  # ties, which the midranks must count as halves
    test = delong(y, weak, strong)
    assert test["auc_a"] == pytest.approx(roc_auc_score(y, weak)) and test["auc_b"] == pytest.approx(
        roc_auc_score(y, strong))
    difference, variance = _delong_by_definition(y, weak, strong)
    assert test["difference"] == pytest.approx(difference) and test["se"] ** 2 == pytest.approx(variance)


def test_identical_models_differ_by_nothing() -> None:
    y, weak, _ = _scores()
    result = paired_auc_difference(y, weak, weak, n_resamples=500)
    assert result["difference"]["value"] == 0 and result["difference"]["ci"][0] <= 0 <= result["difference"]["ci"][1]
    assert result["delong"]["p_value"] == 1.0


def test_a_better_model_is_found_better_and_a_noisy_one_is_not_claimed() -> None:
    y, weak, strong = _scores()
    better = paired_auc_difference(y, weak, strong, n_resamples=1000)
    assert better["difference"]["value"] > 0.1 and better["difference"]["ci"][0] > 0
    assert better["delong"]["p_value"] < 1e-4 and better["delong"]["ci"][0] > 0
    # the paired bootstrap and DeLong agree on the spread
    width = better["difference"]["ci"][1] - better["difference"]["ci"][0]
    assert width == pytest.approx(2 * 1.96 * better["delong"]["se"], rel=0.3)
    rng = np.random.default_rng(1)
    jittered = np.clip(weak + rng.normal(0, 0.01, len(weak)), 0, 1)  # the same model, re-run
    same = paired_auc_difference(y, weak, jittered, n_resamples=1000)
    assert same["difference"]["ci"][0] < 0 < same["difference"]["ci"][1] and same["delong"]["p_value"] > 0.05


def _oof(folder: Path, y: np.ndarray, p: np.ndarray, paths: list[str] | None = None) -> Path:
    folder.mkdir(parents=True)
    pd.DataFrame({"path": paths or [f"img{i}.jpg" for i in range(len(y))], "label": y, "fold": 0, "prob": p,
                  "prob_uncalibrated": p}).sample(frac=1, random_state=0).to_csv(folder / "oof_predictions.csv",
                                                                                   index=False)
    return folder


def test_the_cli_pairs_images_by_path_and_refuses_other_images(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    y, weak, strong = _scores(120)
    a, b = _oof(tmp_path / "a", y, weak), _oof(tmp_path / "b", y, strong)
    result = compare_runs(a, b, n_resamples=300)
    assert result["predictions"] == "out-of-fold" and result["n_images"] == 120
    assert result["auc_b"] == pytest.approx(roc_auc_score(y, strong))  # rows were shuffled, then matched by path
    main([str(a), str(b), "--n-resamples", "300", "--out", str(tmp_path / "ab.json")])
    out = capsys.readouterr().out
    assert "B - A = +" in out and "paired bootstrap CI" in out and "DeLong z" in out
    assert json.loads((tmp_path / "ab.json").read_text())["difference"] == result["difference"]
    other = _oof(tmp_path / "c", y, strong, [f"other{i}.jpg" for i in range(120)])
    with pytest.raises(SystemExit) as refused:
        main([str(a), str(other)])
    err = capsys.readouterr().err.strip()
    assert refused.value.code == 2 and len(err.splitlines()) == 1
    assert "scored other images (120 only in A, 120 only in B" in err
    with pytest.raises(DataError, match=r"holds no predictions.csv \(melanoma-eval\) or oof_predictions.csv"):
        compare_runs(a, tmp_path)
