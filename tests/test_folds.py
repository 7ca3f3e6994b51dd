"""Folds: stratified, disjoint, covering, reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from melanoma.errors import ConfigError, DataError
from melanoma.folds import make_folds, merge_groups


def test_folds_are_stratified_disjoint_and_cover_everything() -> None:
    labels = np.array([0] * 520 + [1] * 461)  # the seed's ratio
    fold = make_folds(labels, 3, seed=1)
    assert sorted(np.unique(fold)) == [0, 1, 2]
    assert len(fold) == len(labels)  # every image in exactly one validation fold
    for k in range(3):
        share = labels[fold == k].mean()
        assert abs(share - labels.mean()) < 0.01
        assert abs((fold == k).sum() - len(labels) / 3) <= 1


def test_same_seed_same_folds_other_seed_other_folds() -> None:
    labels = np.tile([0, 1, 1, 0, 0], 40)
    assert np.array_equal(make_folds(labels, 3, 5), make_folds(labels, 3, 5))
    assert not np.array_equal(make_folds(labels, 3, 5), make_folds(labels, 3, 6))


def test_too_few_images_or_folds() -> None:
    with pytest.raises(DataError, match=r"fewer than cv\.folds=3"):
        make_folds([0, 0, 0, 1, 1], 3)
    with pytest.raises(ConfigError, match=r"cv\.folds=1"):
        make_folds([0, 1] * 5, 1)


def test_a_class_in_fewer_groups_than_folds_is_refused() -> None:
    """10 malignant images from 2 patients cannot fill 3 validation folds: scikit-learn counts images, not
    groups, so without the check one fold would validate on benign images only and keep its first epoch."""
    labels = np.array([1] * 10 + [0] * 100)
    groups = np.array([0] * 5 + [1] * 5 + [2 + i // 2 for i in range(100)])  # 2 malignant, 50 benign patients
    with pytest.raises(DataError, match=r"class 1's images lie in only 2 groups .* cv\.folds=3.*group_column=null"):
        make_folds(labels, 3, seed=0, groups=groups)
    fold = make_folds(labels, 2, seed=0, groups=groups)  # two folds: one malignant patient each
    for k in (0, 1):
        assert set(labels[fold == k].tolist()) == {0, 1}
    assert len({int(fold[0]), int(fold[5])}) == 2


def test_a_fold_left_without_a_class_is_refused() -> None:
    """Three groups per class for three folds, but two large mixed patients: StratifiedGroupKFold's greedy
    assignment leaves one fold with a single class (found by search), which is refused with the fold named."""
    labels = np.array([1] * 7 + [0] * 2 + [1] * 7 + [0, 1] + [0] * 12)
    groups = np.array([0] * 9 + [1] * 8 + [2, 2, 2, 3, 3, 3, 4, 5, 5, 6, 6, 7, 7])
    assert all(len(set(groups[labels == c].tolist())) >= 3 for c in (0, 1))  # passes the groups-per-class check
    with pytest.raises(DataError, match=r"validation fold \d holds no images of class \d .* cv\.folds=3"):
        make_folds(labels, 3, seed=0, groups=groups)


def test_groups_join_images_that_share_any_key() -> None:
    duplicates = [0, 0, 1, 2, 3, 4, 5]
    patients = ["p1", "p2", "p2", "", None, "p3", "p3"]
    # 0-1 are copies, 1-2 one patient: 0, 1, 2 together; 3 and 4 have no patient; 5-6 one patient
    assert merge_groups(duplicates, patients).tolist() == [0, 0, 0, 1, 2, 3, 3]
    assert merge_groups(patients).tolist() == [0, 1, 1, 2, 3, 4, 4]  # a missing key joins nothing
    assert merge_groups(["NA", "unknown", "NA", "p1", "p1"]).tolist() == [0, 1, 2, 3, 3]  # nor does "NA"


def test_patient_folds_keep_every_patient_in_one_fold(tiny_data, tmp_path, caplog) -> None:
    """data.group_column=patient_id: no patient is validated on by a model that trained on them (#15);
    test images of training patients are counted, warned of and left out of eval's deduplicated metrics."""
    import json

    import pandas as pd

    from melanoma.cli.evaluate import evaluate_run
    from melanoma.cli.train import train
    from melanoma.data import load_records

    from conftest import TINY, make_config

    records = load_records("kaggle", tiny_data)
    rng = np.random.default_rng(0)
    records["patient_id"] = [f"p{i}" for i in rng.integers(0, 40, len(records))]  # ~4 images per patient
    records.loc[records.index[::17], "patient_id"] = ""  # some unknown
    records.to_csv(tmp_path / "m.csv", index=False)
    metrics = train(make_config(["data=csv", f"data.manifest={tmp_path / 'm.csv'}", *TINY, "trainer.epochs=1",
                                 "cv.folds=3", "data.group_column=patient_id"]), tmp_path / "run")
    folds = pd.read_csv(tmp_path / "run" / "folds.csv", keep_default_na=False)
    assert list(folds.columns) == ["path", "label", "fold", "group", "patient_id"]
    known = folds[folds["patient_id"] != ""]
    assert known.groupby("patient_id")["fold"].nunique().max() == 1  # every patient in one fold
    assert known.groupby("patient_id")["group"].nunique().max() == 1
    assert metrics["grouped_folds"] is True and metrics["group_column"] == "patient_id"
    assert sorted(folds["fold"].unique()) == [0, 1, 2]

    # ~40 patients over train and test: many test images share a patient with train
    train_ids = set(records.loc[(records["split"] == "train") & (records["patient_id"] != ""), "patient_id"])
    test = records[records["split"] == "test"]
    shared = test[test["patient_id"].isin(train_ids)]
    assert 0 < len(shared) < len(test)
    expected = {"column": "patient_id", "patients_in_both_splits": shared["patient_id"].nunique(),
                "test_with_train_patient": len(shared), "test_with_train_patient_share": len(shared) / len(test)}
    assert metrics["patients"] == expected
    assert json.loads((tmp_path / "run" / "audit.json").read_text())["patients"] == expected
    assert any(f"{len(shared)} test images" in r.message and "share one of" in r.message for r in caplog.records)

    result = evaluate_run(make_config([f"ckpt={tmp_path / 'run'}", "eval.n_resamples=50", "eval.num_workers=0",
                                       "eval.subgroups=false"], "eval"), tmp_path / "eval")
    pred = pd.read_csv(tmp_path / "eval" / "predictions.csv", keep_default_na=False)
    assert set(pred.loc[pred["shares_train_patient"], "path"]) == set(shared["path"])
    dedup = result["dedup"]
    assert dedup["n_shared_patient"] == len(shared) and dedup["patient_column"] == "patient_id"
    removed = pred["shares_train_patient"] | pred["has_train_duplicate"]
    assert dedup["n_removed"] == removed.sum() and dedup["n_images"] == len(pred) - removed.sum()
    from melanoma.reporting.model_card import find_run, model_card

    card = model_card(find_run(tmp_path / "run", (tmp_path / "eval",)))
    assert f"{len(shared)} test images share a patient (`patient_id`) with the training split" in card
    assert "test images that have a near-duplicate in train or share a patient with it: AUC" in card
