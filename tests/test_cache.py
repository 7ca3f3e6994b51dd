"""Decode-once cache: same tensors as decoding every time, and never a stale image."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from melanoma.cache import build_cache, cache_key, file_digest
from melanoma.data import ImageDataset, load_records
from melanoma.errors import ConfigError
from melanoma.transforms import build_transforms, eval_resize

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE, CROP = 40, 0.86  # the cache edge: floor(40 / 0.86) = 46 px, from 48 px sources
EDGE = eval_resize(SIZE, CROP)


@pytest.fixture()
def images(tiny_data: Path, tmp_path: Path) -> list[str]:
    """A private copy of some tiny-set images (tests modify them), one of them not square."""
    paths = load_records("kaggle", tiny_data)["path"].tolist()[:12]
    out = []
    for i, src in enumerate(paths):
        dst = tmp_path / "img" / f"{i:02d}.jpg"
        dst.parent.mkdir(exist_ok=True)
        shutil.copy(src, dst)
        out.append(str(dst))
    Image.open(out[0]).resize((60, 44)).save(out[0], quality=90)  # landscape: the short side is resized
    return out


def _tensors(paths: list[str], transform, decoded=None, seed: int = 0) -> list[torch.Tensor]:
    dataset = ImageDataset(paths, [0] * len(paths), transform, decoded)
    torch.manual_seed(seed)
    return [dataset[i][0] for i in range(len(dataset))]


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_eval_tensors_are_bit_identical(images: list[str], tmp_path: Path, mode: str) -> None:
    eval_tf = build_transforms(SIZE, train=False, mean=MEAN, std=STD, crop_pct=CROP)
    decoded = build_cache(images, EDGE, mode, tmp_path / "cache", workers=2)
    assert len(decoded) == len(images) and decoded[images[0]].shape[:2] == (3, EDGE) < decoded[images[0]].shape[1:]
    for plain, cached in zip(_tensors(images, eval_tf), _tensors(images, eval_tf, decoded), strict=True):
        assert plain.shape == (3, SIZE, SIZE)
        assert torch.equal(plain, cached)


def test_train_augmentation_is_statistically_equivalent(images: list[str]) -> None:
    """Same random draws, cached source 46 px instead of 48: crops agree up to resampling error."""
    train_tf = build_transforms(SIZE, train=True, mean=MEAN, std=STD, crop_pct=CROP, rotation=15,
                                color_jitter=[0.2, 0.2, 0.2, 0.02])
    decoded = build_cache(images, EDGE, "memory", workers=2)
    plain, cached = [], []
    for seed in range(8):
        plain += _tensors(images[1:], train_tf, seed=seed)
        cached += _tensors(images[1:], train_tf, decoded, seed=seed)
    plain, cached = torch.stack(plain), torch.stack(cached)
    assert plain.shape == cached.shape == (8 * 11, 3, SIZE, SIZE)
    # Per-channel statistics over the whole augmented sample agree closely. The spread is a few
    # percent lower from the cache: the downsized source has less fine texture to crop from.
    assert torch.allclose(plain.mean((0, 2, 3)), cached.mean((0, 2, 3)), atol=0.02)
    assert torch.allclose(plain.std((0, 2, 3)), cached.std((0, 2, 3)), rtol=0.06)
    # ...and each augmented image shows the same crop: near-identical pixels, far below image-to-image change.
    same = (plain - cached).abs().mean()
    other = (plain - cached.roll(1, 0)).abs().mean()
    assert same < 0.5 * other  # 48 -> 46 px moves crop edges by up to a pixel at this tiny size


def test_changed_image_or_edge_invalidates_the_disk_cache(images: list[str], tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    first = build_cache(images, EDGE, "disk", folder, workers=2)
    assert build_cache(images, EDGE, "disk", folder, workers=2).file == first.file  # a hit: same file
    assert len(list(folder.glob("*.u8"))) == 1

    other_edge = build_cache(images, EDGE + 4, "disk", folder, workers=2)
    assert other_edge.key != first.key and other_edge[images[3]].shape[1] == EDGE + 4

    before = first[images[5]].clone()
    Image.new("RGB", (48, 48), (250, 10, 10)).save(images[5])  # same name, new content
    fresh = build_cache(images, EDGE, "disk", folder, workers=2)
    assert fresh.key != first.key and fresh.file != first.file
    assert not torch.equal(fresh[images[5]], before)
    assert fresh[images[5]][0].float().mean() > 200  # the new, red image: not the stale pixels
    assert torch.equal(fresh[images[4]], first[images[4]])


def test_key_depends_on_content_not_names(images: list[str], tmp_path: Path) -> None:
    renamed = tmp_path / "renamed.jpg"
    shutil.copy(images[2], renamed)
    assert file_digest(renamed) == file_digest(images[2]) != file_digest(images[3])
    digests = [file_digest(p) for p in images]
    assert cache_key(digests, EDGE) != cache_key(digests[::-1], EDGE) != cache_key(digests, EDGE + 1)


def test_disk_cache_survives_pickling_to_workers(images: list[str], tmp_path: Path) -> None:
    import pickle

    decoded = build_cache(images, EDGE, "disk", tmp_path / "c", workers=2)
    decoded[images[0]]  # opens the map in this process
    clone = pickle.loads(pickle.dumps(decoded))
    assert clone._map is None and torch.equal(clone[images[7]], decoded[images[7]])


def test_bad_settings_name_the_key(images: list[str], tmp_path: Path) -> None:
    assert build_cache(images, EDGE, "none") is None
    with pytest.raises(ConfigError, match="data.cache='ram'"):
        build_cache(images, EDGE, "ram")
    with pytest.raises(ConfigError, match="data.cache_edge"):
        build_cache(images, 0, "memory")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="data.cache_dir=.*file/sub"):
        build_cache(images, EDGE, "disk", blocker / "sub")
    assert not np.any([p.name.endswith(".tmp") for p in tmp_path.rglob("*")])


def test_training_from_the_cache_repeats_training_from_files(tiny_data: Path, tmp_path: Path) -> None:
    """Without random augmentation the cached pipeline feeds the very same tensors: same run, same numbers."""
    from melanoma.cli.train import train

    from conftest import TINY, make_config

    runs = {}
    for cache in ("none", "disk"):
        cfg = make_config([f"data.root={tiny_data}", *TINY, "augmentation=none", "cv.folds=2", f"data.cache={cache}",
                           f"data.cache_dir={tmp_path / 'decoded'}"])
        runs[cache] = train(cfg, tmp_path / cache)
    assert runs["none"]["folds"] == runs["disk"]["folds"]
    assert runs["none"]["oof"] == runs["disk"]["oof"]
    assert len(list((tmp_path / "decoded").glob("*.u8"))) == 1
