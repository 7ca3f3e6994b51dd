"""The subgroup report card (#15): skin tone (ITA) and per-subgroup metrics with CIs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from kornia.color import lab_to_rgb, rgb_to_lab
from sklearn.metrics import recall_score, roc_auc_score

from melanoma.confidence import stratified_resamples
from melanoma.skin_tone import category, ita, skin_mask
from melanoma.subgroups import age_bin, card_table, report_card, subgroup_columns


def _lab_image(skin: tuple[float, float, float], lesion: tuple[float, float, float] | None = None,
               size: int = 64) -> torch.Tensor:
    """A CIELAB image of uniform skin, with a dark round lesion in the middle and a black vignette, via RGB."""
    lab = torch.tensor(skin, dtype=torch.float32)[:, None, None].repeat(1, size, size)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    radius = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2).sqrt()
    if lesion is not None:
        lab[:, radius < size / 5] = torch.tensor(lesion, dtype=torch.float32)[:, None]
    lab[:, radius > size * 0.68] = torch.tensor([0.0, 0.0, 0.0])[:, None]  # the dermoscope's black corners
    rgb = lab_to_rgb(lab[None]).clamp(0, 1)
    return rgb_to_lab(rgb)[0]  # what an RGB photograph of it gives


@pytest.mark.parametrize(("skin", "expected"), [((80, 8, 14), "very light"), ((65, 10, 16), "light"),
                                                ((58, 12, 18), "tan"), ((40, 12, 20), "brown"),
                                                ((25, 10, 18), "dark")])
def test_ita_of_a_skin_patch_is_the_hand_computed_angle(skin: tuple, expected: str) -> None:
    lab = _lab_image(skin, lesion=(skin[0] - 22, 20, 25))
    angle = math.degrees(math.atan((skin[0] - 50) / skin[2]))  # ITA = arctan((L* - 50) / b*)
    assert ita(lab) == pytest.approx(angle, abs=0.5)
    assert category(ita(lab)) == expected == category(angle)


def test_the_lesion_and_the_vignette_are_not_skin() -> None:
    lab = _lab_image((70, 10, 15), lesion=(35, 20, 25))
    mask = skin_mask(lab).numpy()
    lesion = (np.abs(lab[0].numpy() - 35) < 1)
    vignette = lab[0].numpy() < 1
    assert lesion.any() and vignette.any()
    assert not (mask & lesion).any() and not (mask & vignette).any()
    assert mask.sum() > 0.9 * (~lesion & ~vignette).sum()
    assert category(math.nan) == "unknown"


def _scored(n: int = 600, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    group = rng.choice(["a", "b", "c"], n, p=[0.45, 0.45, 0.1])
    # the model sees malignancy in groups a and b, and is blind to it in group b's twin "c"
    p = np.where(group == "c", rng.random(n), 1 / (1 + np.exp(-(3 * y - 1.5 + rng.normal(0, 1, n)))))
    return y, p, pd.Series(group)


def test_subgroup_metrics_equal_scikit_learns_on_the_subset() -> None:
    y, p, group = _scored()
    card = report_card(y, p, 0.5, {"g": group}, n_resamples=300)
    assert [(r["column"], r["level"]) for r in card["rows"]] == [("g", "a"), ("g", "b"), ("g", "c")]
    for row in card["rows"]:
        mask = (group == row["level"]).to_numpy()
        assert row["n"] == mask.sum() and row["n_positive"] == y[mask].sum()
        assert row["auc"]["value"] == pytest.approx(roc_auc_score(y[mask], p[mask]))
        assert row["sensitivity"]["value"] == pytest.approx(recall_score(y[mask], p[mask] >= 0.5))
        assert row["specificity"]["value"] == pytest.approx(recall_score(1 - y[mask], p[mask] < 0.5))
        assert row["auc"]["ci"][0] <= row["auc"]["value"] <= row["auc"]["ci"][1]
    assert card["overall"]["auc"]["value"] == pytest.approx(roc_auc_score(y, p))


def test_a_failing_subgroup_is_flagged_and_a_tiny_one_is_unavailable() -> None:
    y, p, group = _scored()
    group = group.copy()
    tiny = np.flatnonzero((group == "a").to_numpy() & (y == 1))[:3]
    group.iloc[tiny] = "tiny"  # three malignant images, no benign one
    card = report_card(y, p, 0.5, {"g": group}, n_resamples=300)
    rows = {r["level"]: r for r in card["rows"]}
    assert rows["c"]["flagged"] and not rows["a"]["flagged"] and not rows["b"]["flagged"]
    assert rows["tiny"]["auc"]["value"] is None
    assert rows["tiny"]["unavailable"]["auc"] == "3 malignant and 0 benign images; an AUC needs at least 5 of each"
    assert rows["tiny"]["unavailable"]["specificity"] == "no benign images"
    table = card_table(card)
    assert table.loc[table["level"] == "tiny", "auc"].isna().all() and table["flagged"].tolist().count(True) == 1


def test_a_subgroup_too_small_for_an_auc_is_not_bootstrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The AUC of a subgroup under MIN_PER_CLASS of a class is never reported, so it is never resampled either:
    only the overall set and the large groups are, and their values stay scikit-learn's."""
    import melanoma.subgroups as subgroups

    y, p, group = _scored()
    group = group.copy()
    group.iloc[np.flatnonzero((group == "a").to_numpy())[:6]] = "tiny"
    resampled = []

    def counting(labels: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
        resampled.append(len(labels))
        return stratified_resamples(labels, n_resamples, seed)

    monkeypatch.setattr(subgroups, "stratified_resamples", counting)
    card = report_card(y, p, 0.5, {"g": group}, n_resamples=200)
    sizes = {r["level"]: r["n"] for r in card["rows"]}
    assert sorted(resampled) == sorted([len(y), sizes["a"], sizes["b"], sizes["c"]])
    for row in card["rows"]:  # the others are unchanged: scikit-learn's AUC, and the tiny group's proportions
        mask = (group == row["level"]).to_numpy()
        if row["level"] != "tiny":
            assert row["auc"]["value"] == pytest.approx(roc_auc_score(y[mask], p[mask]))
            assert row["auc"]["ci"][0] <= row["auc"]["value"] <= row["auc"]["ci"][1]
        assert row["sensitivity"]["value"] == pytest.approx(recall_score(y[mask], p[mask] >= 0.5, zero_division=0))
    assert {r["level"]: r["auc"]["value"] is None for r in card["rows"]} == {"a": False, "b": False, "c": False,
                                                                              "tiny": True}


def test_a_small_subgroup_gets_a_wide_interval_and_no_flag() -> None:
    """Three malignant images, all missed: sensitivity 0 with Wilson's [0, 0.56], not the bootstrap's [0, 0];
    under MIN_PER_CLASS malignant images it is reported but never flagged. Four of four found: [0.51, 1]."""
    y, p, group = _scored()
    group, p = group.copy(), p.copy()
    missed = np.flatnonzero((group == "a").to_numpy() & (y == 1))[:3]
    found = np.flatnonzero((group == "a").to_numpy() & (y == 1))[3:7]
    p[missed], p[found] = 0.01, 0.99
    group.iloc[missed], group.iloc[found] = "missed", "found"
    rows = {r["level"]: r for r in report_card(y, p, 0.5, {"g": group}, n_resamples=300)["rows"]}
    assert rows["missed"]["sensitivity"]["value"] == 0 and rows["missed"]["sensitivity"]["ci"][1] == pytest.approx(
        0.5615, abs=1e-4)
    assert not rows["missed"]["flagged"]
    assert rows["found"]["sensitivity"]["ci"] == pytest.approx([0.5101, 1.0], abs=1e-4)


def test_ages_are_binned_and_unknowns_kept() -> None:
    ages = pd.Series(["5", "30", "44", "45", "60", "75", "90", "", "unknown"])
    assert age_bin(ages).tolist() == ["<30", "30-44", "30-44", "45-59", "60-74", "75+", "75+", "unknown", "unknown"]
    assert age_bin(pd.Series(["-1"])).tolist() == ["unknown"]  # outside every bin: unknown, not "nan"
    frame = pd.DataFrame({"age_approx": ages, "sex": ["male", "female", "", "male", "female", "male", "x", "y", "z"],
                          "score": [str(i) for i in range(9)]})
    groups = subgroup_columns(frame, {"age_approx": None, "sex": None, "score": None})
    assert list(groups) == ["age_approx", "sex"]  # a numeric column without standard bins is left out
    assert groups["sex"].tolist()[:3] == ["male", "female", "unknown"]
    y = np.array([0, 1] * 5)
    levels = {"age": pd.Series(["75+", "<30", "45-59", "unknown", "30-44"] * 2),
              "tone": pd.Series(["dark", "very light", "tan", "light", "x"] * 2)}
    card = report_card(y, np.linspace(0, 1, 10), 0.5, levels, n_resamples=50)
    assert [r["level"] for r in card["rows"]] == ["<30", "30-44", "45-59", "75+", "unknown",
                                                  "very light", "light", "tan", "dark", "x"]  # natural order first
