"""The synthetic generator: deterministic, in the kaggle layout, written once."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from melanoma.data import load_records
from melanoma.synthetic import generate_dataset, render_lesion


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.jpg")):
        h.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    a = generate_dataset(tmp_path / "a", n_train=12, n_test=4, size=40, seed=3, workers=1)
    b = generate_dataset(tmp_path / "b", n_train=12, n_test=4, size=40, seed=3, workers=2)
    c = generate_dataset(tmp_path / "c", n_train=12, n_test=4, size=40, seed=4, workers=1)
    assert _digest(a) == _digest(b) != _digest(c)


def test_kaggle_layout_class_ratio_and_size(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "s", n_train=40, n_test=10, size=36, seed=0)
    records = load_records("kaggle", root)
    train, test = records[records.split == "train"], records[records.split == "test"]
    assert len(train) == 40 and len(test) == 10
    assert train.label.sum() == 40 - round(40 * 5000 / 9605) and test.label.sum() == 5
    assert Image.open(train.path.iloc[0]).size == (36, 36)
    assert not list(tmp_path.glob("*.tmp-*"))  # built aside, then renamed into place


def test_written_once_and_foreign_folders_refused(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "s", n_train=6, n_test=2, size=32, seed=0)
    stamp = (root / "train").stat().st_mtime_ns
    generate_dataset(tmp_path / "s", n_train=6, n_test=2, size=32, seed=0)
    assert (root / "train").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="delete it or choose another root"):
        generate_dataset(tmp_path / "s", n_train=6, n_test=2, size=32, seed=1)


def test_severity_drives_the_abcd_features() -> None:
    """Malignant-looking lesions are larger and darker: the signal a model can learn."""
    def lesion_stats(severity: float) -> tuple[float, float]:
        areas, darkness = [], []
        for i in range(12):
            img = np.asarray(render_lesion(np.random.default_rng(i), 96, severity), dtype=float).mean(-1)
            mask = img < np.median(img[:8]) - 25
            areas.append(mask.mean())
            darkness.append(255 - img[mask].mean() if mask.any() else 0)
        return float(np.mean(areas)), float(np.mean(darkness))
    low, high = lesion_stats(0.1), lesion_stats(0.9)
    assert high[0] > 1.5 * low[0] and high[1] > low[1]
