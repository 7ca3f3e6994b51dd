"""The audit finds planted duplicates (and nothing else), groups them, and caches its hashes."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import melanoma.audit as audit
from melanoma.audit import audit_records, hash_distances, leaked_test_paths, near_duplicate_pairs, perceptual_hashes
from melanoma.cli.audit import run_audit
from melanoma.data import DEMO_DATA, load_records
from melanoma.folds import make_folds
from melanoma.synthetic import render_lesion

from conftest import make_config

SIZE = 300  # the seed dataset's image size


def _save(img: Image.Image, path: Path, quality: int = 92) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=quality)
    return path


def _jpeg_bytes(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[frozenset[str]]]:
    """A kaggle-layout set of distinct look-alike lesions plus planted copies; returns the pairs."""
    root = tmp_path_factory.mktemp("planted")
    originals = []
    for i in range(40):  # look-alikes: same renderer, similar severities
        label = i % 2
        img = render_lesion(np.random.default_rng([99, i]), SIZE, 0.35 + 0.3 * label + 0.02 * (i % 5))
        originals.append((_save(img, root / "train" / ("benign", "malignant")[label] / f"o{i:02d}.jpg"), label))
    for i in range(6):
        label = i % 2
        img = render_lesion(np.random.default_rng([98, i]), SIZE, 0.5)
        _save(img, root / "test" / ("benign", "malignant")[label] / f"t{i:02d}.jpg")
    pairs = set()

    def plant(source: tuple[Path, int], img: Image.Image, split: str, name: str, flip_label: bool = False,
              raw: bytes | None = None) -> None:
        path, label = source
        label = 1 - label if flip_label else label
        target = root / split / ("benign", "malignant")[label] / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(raw) if raw is not None else _save(img, target)
        pairs.add(frozenset({str(path), str(target)}))

    src = {k: Image.open(p).convert("RGB") for k, (p, _) in enumerate(originals)}
    plant(originals[0], None, "test", "exact.jpg", raw=originals[0][0].read_bytes())
    plant(originals[1], _jpeg_bytes(src[1], 60), "test", "q60.jpg")
    plant(originals[2], src[2].resize((int(SIZE * 0.9),) * 2, Image.Resampling.LANCZOS), "test", "resized.jpg")
    shifted = Image.fromarray(np.pad(np.asarray(src[3]), ((0, 0), (4, 0), (0, 0)), mode="edge")[:, :SIZE])
    plant(originals[3], shifted, "train", "shifted.jpg")
    plant(originals[4], src[4].crop((4, 4, SIZE, SIZE)), "train", "cropped.jpg")
    plant(originals[5], src[5].transpose(Image.Transpose.FLIP_LEFT_RIGHT), "test", "flipped.jpg")
    plant(originals[6], src[6].rotate(90), "train", "rotated.jpg")
    plant(originals[7], _jpeg_bytes(src[7], 85), "train", "conflict.jpg", flip_label=True)
    (root / "train" / "benign" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root, pairs


def _audit(root: Path, tmp: Path, **kw) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    return audit_records(load_records("kaggle", root), cache_dir=tmp / "cache", workers=1, **kw)


def test_detector_finds_exactly_the_planted_pairs(planted, tmp_path: Path) -> None:
    root, expected = planted
    images, pairs, summary = _audit(root, tmp_path)
    found = {frozenset({a, b}) for a, b in zip(pairs["path_a"], pairs["path_b"], strict=True)}
    assert found == expected  # precision and recall 1.0 on the planted cases
    names = [{Path(a).name, Path(b).name} for a, b in zip(pairs["path_a"], pairs["path_b"], strict=True)]
    kinds = {name: kind for pair, kind in zip(names, pairs["kind"], strict=True) for name in pair}
    assert kinds["exact.jpg"] == "exact" and kinds["q60.jpg"] == "near"
    assert summary["exact_duplicate_pairs"] == 1 and summary["near_duplicate_pairs"] == 7
    assert summary["label_conflicts"] == 1
    conflict = pairs[pairs["label_conflict"]].iloc[0]
    assert {Path(conflict["path_a"]).name, Path(conflict["path_b"]).name} == {"o07.jpg", "conflict.jpg"}
    assert summary["test_with_train_duplicate"] == 4 and summary["test_with_train_duplicate_share"] == 4 / 10
    assert summary["unreadable"][0]["path"].endswith("broken.jpg") and summary["unreadable"][0]["reason"]
    assert summary["counts"] == {"test": {"benign": 5, "malignant": 5},
                                 "train": {"benign": 24, "malignant": 21}}


def test_grouped_folds_never_split_a_group(planted, tmp_path: Path) -> None:
    root, _ = planted
    images, _, _ = _audit(root, tmp_path)
    train = images[(images["split"] == "train") & images["error"].isna()]
    folds = make_folds(train["label"].to_numpy(), 3, seed=0, groups=train["group"].to_numpy())
    per_group = pd.DataFrame({"group": train["group"], "fold": folds}).groupby("group")["fold"].nunique()
    assert (per_group == 1).all() and (train["group"].value_counts() > 1).sum() == 4


def test_leaked_test_images_are_the_cross_split_copies(planted, tmp_path: Path) -> None:
    root, _ = planted
    _, pairs, _ = _audit(root, tmp_path)
    assert {Path(p).name for p in leaked_test_paths(pairs)} == {"exact.jpg", "q60.jpg", "resized.jpg",
                                                                         "flipped.jpg"}


def test_hashes_are_cached_by_content(planted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = planted
    data = tmp_path / "data"
    shutil.copytree(root, data)
    _audit(data, tmp_path)
    calls = []
    real = audit._hash_file
    monkeypatch.setattr(audit, "_hash_file", lambda p: calls.append(p) or real(p))
    _audit(data, tmp_path)
    assert calls == []  # unchanged dataset: nothing decoded again
    changed = data / "train" / "benign" / "o00.jpg"
    _save(render_lesion(np.random.default_rng(5), SIZE, 0.1), changed)
    _, pairs, _ = _audit(data, tmp_path)
    assert calls == [str(changed)]  # only the changed file is hashed again
    assert not any(str(changed) in (a, b) for a, b in zip(pairs["path_a"], pairs["path_b"], strict=True))


def test_pair_search_is_vectorised_and_symmetric_in_flips() -> None:
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=(50, 8, 3), dtype=np.uint64)
    hashes[7] = hashes[3][[4, 5, 6, 7, 0, 1, 2, 3]]  # 7 is a mirror image of 3
    pairs = near_duplicate_pairs(hashes, threshold=5, chunk=8)
    assert pairs[["i", "j"]].values.tolist() == [[3, 7]] and pairs["distance"].tolist() == [0]


def test_a_centre_crop_hash_pairs_images_in_either_direction() -> None:
    rng = np.random.default_rng(1)
    hashes = rng.integers(0, 2**63, size=(40, 11, 3), dtype=np.uint64)
    hashes[30, 9] = hashes[4, 2]  # 30's crop is 4 rotated: a rotated re-crop, found from the later image
    hashes[6, 10] = hashes[21, 5]  # and from the earlier one
    pairs = near_duplicate_pairs(hashes, threshold=5, chunk=7)  # chunks of one image's 4 query rows
    assert pairs[["i", "j"]].values.tolist() == [[4, 30], [6, 21]]
    assert pairs["distance"].tolist() == [audit.CROP_PENALTY] * 2  # a match through a crop costs 2 bits
    assert near_duplicate_pairs(hashes[:, :8], threshold=5).empty  # the 8 variants alone: no pair
    bits = np.unpackbits(hashes.view(np.uint8), axis=-1)[..., :143]

    def by_hand(a: int, b: int) -> int:  # every query row of one against every variant of the other
        return min(int((bits[x, q] != bits[y, v]).sum()) + (q > 0) * audit.CROP_PENALTY for x, y in ((a, b), (b, a))
                   for q in (0, 8, 9, 10) for v in range(8))

    i, j = np.array([4, 6, 0, 1, 12]), np.array([30, 21, 1, 2, 13])
    assert hash_distances(hashes, i, j).tolist() == [by_hand(a, b) for a, b in zip(i, j, strict=True)]


def test_centre_crop_hashes_equal_the_hashes_of_the_cropped_image() -> None:
    image = render_lesion(np.random.default_rng(2), 256, 0.1)
    hashes = perceptual_hashes(image)
    assert hashes.shape == (11, 3) and hashes.dtype == np.uint64
    crop = image.crop((8, 8, 248, 248))  # 2/64 of each side: audit.ZOOMS[1]
    assert (hashes[9] == perceptual_hashes(crop)[0]).all()
    lesion = Image.open(DEMO_DATA / "isic-uda1" / "images" / "ISIC_0000002.jpg").convert("RGB")  # 299 x 224
    copy = _jpeg_bytes(lesion.crop((7, 7, 292, 217)).resize(lesion.size, Image.Resampling.BICUBIC), 92)
    pair = np.stack([perceptual_hashes(lesion), perceptual_hashes(copy)])  # a re-crop the hash once missed:
    distance = hash_distances(pair, np.array([0]), np.array([1]))[0]
    plain = hash_distances(pair[:, :8], np.array([0]), np.array([1]))[0]
    assert distance <= 8 < 14 < plain  # 4 bits (2 + the crop penalty), and 30 by the whole image alone


def test_audit_cli_writes_its_report(planted, tmp_path: Path) -> None:
    root, _ = planted
    summary = run_audit(make_config([f"data.root={root}"], "audit_run"), tmp_path)
    on_disk = json.loads((tmp_path / "audit.json").read_text())
    assert on_disk == json.loads(json.dumps(summary)) and on_disk["pairs_crossing_folds"] is not None
    assert len(pd.read_csv(tmp_path / "duplicates.csv")) == 8


def test_empty_or_missing_splits_are_reported_not_assumed(planted, tmp_path: Path) -> None:
    root, _ = planted
    data = tmp_path / "data"
    shutil.copytree(root / "train", data / "train")
    for f in (data / "train" / "malignant").iterdir():
        f.unlink()
    summary = run_audit(make_config([f"data.root={data}"], "audit_run"), tmp_path / "out")
    assert summary["missing_splits"] == ["test"] and summary["empty_classes"] == ["train/malignant"]
    assert summary["test_with_train_duplicate_share"] is None and summary["pairs_crossing_folds"] is None


def test_shared_patients_are_the_test_images_of_training_patients() -> None:
    records = pd.DataFrame({
        "path": [f"{i}.jpg" for i in range(8)],
        "split": ["train", "train", "train", "test", "test", "test", "test", "test"],
        "patient_id": ["p1", "p2", "", "p1", " p2", "p3", "", "unknown"],
    })
    # p1 and p2 (stripped) have train images; an empty or "unknown" id joins no patient, not even another empty one
    assert audit.shared_patient_paths(records[:3], records[3:], "patient_id") == {"3.jpg", "4.jpg"}
    leaks = audit.patient_leaks(records, "patient_id")
    assert leaks == {"column": "patient_id", "patients_in_both_splits": 2, "test_with_train_patient": 2,
                     "test_with_train_patient_share": 0.4}
    assert audit.patient_warning(leaks).startswith("2 test images (40.0%) share one of 2 patients "
                                                   "(data.group_column=patient_id)")
    apart = records.assign(patient_id=["p1", "p2", "", "p4", "p5", "p3", "", ""])
    assert audit.patient_leaks(apart, "patient_id")["test_with_train_patient"] == 0
    assert audit.patient_warning(audit.patient_leaks(apart, "patient_id")) is None
    assert audit.patient_warning(None) is None


def test_audit_cli_counts_test_images_of_training_patients(planted, tmp_path: Path, capsys) -> None:
    root, _ = planted
    records = load_records("kaggle", root)
    test = records.index[records["split"] == "test"]
    records["patient_id"] = [f"p{i}" for i in range(len(records))]  # every image its own patient ...
    records.loc[test[:3], "patient_id"] = records["patient_id"].iloc[0]  # ... but 3 test images are train's first
    records.to_csv(tmp_path / "m.csv", index=False)
    summary = run_audit(make_config(["data=csv", f"data.manifest={tmp_path / 'm.csv'}", "data.root=/",
                                     "data.group_column=patient_id"], "audit_run"), tmp_path / "out")
    assert summary["patients"]["test_with_train_patient"] == 3 and summary["patients"]["patients_in_both_splits"] == 1
    assert json.loads((tmp_path / "out" / "audit.json").read_text())["patients"] == summary["patients"]
    printed = capsys.readouterr().out
    assert "3 test images share a patient (patient_id) with train" in printed
    assert "warning: 3 test images" in printed
