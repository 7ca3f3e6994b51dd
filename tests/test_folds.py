"""Folds: stratified, disjoint, covering, reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from melanoma.errors import ConfigError, DataError
from melanoma.folds import make_folds


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
