"""Data layer: layouts, manifests, and every kind of bad input named in the training issue."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from melanoma.data import (
    ImageDataset,
    load_image,
    load_records,
    make_loader,
    readable_images,
    scan_images,
    split_records,
)
from melanoma.errors import ConfigError, DataError

CLASSES = ("benign", "malignant")


def _jpeg(path: Path, colour: tuple[int, int, int] = (200, 120, 90), size: tuple[int, int] = (20, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _kaggle(root: Path, n: int = 3, splits: tuple[str, ...] = ("train", "test")) -> Path:
    for split in splits:
        for cls in CLASSES:
            for i in range(n):
                _jpeg(root / split / cls / f"{i}.jpg")
    return root


def test_kaggle_layout_reads_both_splits_and_ignores_stray_files(tmp_path: Path) -> None:
    root = _kaggle(tmp_path / "set")
    (root / "train" / "benign" / ".DS_Store").write_bytes(b"\0\1")
    (root / "train" / "malignant" / "Thumbs.db").write_bytes(b"\0\1")
    (root / "train" / "malignant" / "notes.txt").write_text("hi")
    records = load_records("kaggle", root, CLASSES)
    assert len(records) == 12
    assert records.groupby(["split", "label"]).size().tolist() == [3, 3, 3, 3]
    assert all(p.endswith(".jpg") for p in records["path"])
    assert records[records["path"].str.contains("/malignant/")]["label"].eq(1).all()


def test_missing_root_names_the_key_and_the_demo(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.root=.*nowhere.*data=demo"):
        load_records("kaggle", tmp_path / "nowhere", CLASSES)


def test_kaggle_root_without_train_folder(tmp_path: Path) -> None:
    _jpeg(tmp_path / "benign" / "a.jpg")
    with pytest.raises(DataError, match="no train/ folder.*data=folder"):
        load_records("kaggle", tmp_path, CLASSES)


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    root = _kaggle(tmp_path / "set", splits=("train",))
    for f in (root / "train" / "malignant").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"malignant holds no images"):
        load_records("kaggle", root, CLASSES)


def test_wrong_class_folder_names_suggest_data_classes(tmp_path: Path) -> None:
    _jpeg(tmp_path / "nevus" / "a.jpg")
    _jpeg(tmp_path / "melanoma" / "a.jpg")
    with pytest.raises(DataError, match=r"found: melanoma, nevus.*data\.classes"):
        load_records("folder", tmp_path, CLASSES)
    records = load_records("folder", tmp_path, ("nevus", "melanoma"))
    assert dict(zip(records["path"].map(lambda p: Path(p).parent.name), records["label"], strict=True)) == {"nevus": 0,
                                                                                              "melanoma": 1}


def test_split_with_one_class_is_refused(tmp_path: Path) -> None:
    records = pd.DataFrame({"path": ["a", "b"], "label": [0, 0], "split": ["train", "train"]})
    with pytest.raises(DataError, match="only 'benign'.*both"):
        split_records(records, "train", CLASSES)
    with pytest.raises(DataError, match="no test images"):
        split_records(records, "test", CLASSES)


def test_csv_manifest_with_relative_paths_names_and_split(tmp_path: Path) -> None:
    _jpeg(tmp_path / "img" / "a.jpg")
    _jpeg(tmp_path / "img" / "b.jpg")
    _jpeg(tmp_path / "img" / "c.jpg")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split\nimg/a.jpg,benign,train\nimg/b.jpg,1,train\nimg/c.jpg,Malignant,test\n")
    records = load_records("csv", None, CLASSES, manifest)
    assert records["label"].tolist() == [0, 1, 1]
    assert records["split"].tolist() == ["train", "train", "test"]
    assert records["path"].tolist() == [str(tmp_path / "img" / n) for n in ("a.jpg", "b.jpg", "c.jpg")]


def test_csv_manifest_errors_name_the_row_or_column(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.jpg,benign\nb.jpg,mole\n")
    with pytest.raises(DataError, match=r"m\.csv:3: label 'mole'"):
        load_records("csv", None, CLASSES, manifest)
    manifest.write_text("file,label\na.jpg,0\n")
    with pytest.raises(DataError, match="no 'path' column"):
        load_records("csv", None, CLASSES, manifest)
    with pytest.raises(DataError, match=r"data\.manifest=.*does not exist"):
        load_records("csv", None, CLASSES, tmp_path / "missing.csv")


def test_not_an_image_errors_or_is_skipped(tmp_path: Path) -> None:
    good = _jpeg(tmp_path / "good.jpg")
    fake = tmp_path / "fake.jpg"
    fake.write_text("this is not a jpeg")
    truncated = tmp_path / "truncated.jpg"
    _jpeg(tmp_path / "big.jpg", size=(300, 300))
    data = (tmp_path / "big.jpg").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"fake\.jpg is not a readable image.*data\.on_bad_file=skip.*2 bad"):
        scan_images([str(good), str(fake), str(truncated)], "error")
    bad = scan_images([str(good), str(fake), str(truncated)], "skip")
    assert [Path(p).name for p, _ in bad] == ["fake.jpg", "truncated.jpg"]
    assert all(reason for _, reason in bad)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "P+transparency", "CMYK", "1", "I;16"])
def test_any_mode_loads_as_rgb(tmp_path: Path, mode: str) -> None:
    arr = (np.arange(16 * 16).reshape(16, 16) % 256).astype(np.uint8)
    if mode == "I;16":
        img = Image.fromarray(arr.astype(np.uint16) * 257)  # a 16-bit grayscale image
        path = tmp_path / "x.png"
    elif mode == "P+transparency":
        img = Image.fromarray(arr).convert("P")
        img.info["transparency"] = 0
        path = tmp_path / "x.png"
    else:
        img = Image.fromarray(arr).convert(mode)
        path = tmp_path / ("x.jpg" if mode in ("L", "CMYK") else "x.png")
    img.save(path, **({"transparency": 0} if mode == "P+transparency" else {}))
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (16, 16)
    if mode == "I;16":  # 16-bit values are scaled down, not clipped to white
        assert np.array_equal(np.asarray(out)[..., 0], arr)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    out = load_image(path)
    assert out.size == (20, 40)
    top = np.asarray(out)[:8].reshape(-1, 3).mean(0)
    assert top[2] > 150 and top[0] < 100  # the stripe now runs along the top


def test_dataset_and_loader(tmp_path: Path) -> None:
    paths = [str(_jpeg(tmp_path / f"{i}.jpg", size=(8, 8))) for i in range(5)]
    ds = ImageDataset(paths, [0, 1, 0, 1, 1], transform=lambda im: torch.from_numpy(np.asarray(im).copy()))
    image, label = ds[1]
    assert image.shape == (8, 8, 3) and label.item() == 1.0 and label.dtype == torch.float32
    order = [torch.cat([y for _, y in make_loader(ds, 2, train=True, num_workers=0, seed=3)]) for _ in range(2)]
    assert torch.equal(order[0], order[1])  # same seed, same shuffle
    assert sum(len(y) for _, y in make_loader(ds, 2, train=True, num_workers=0, seed=3)) == 4  # drop_last


LEFT_RUNNING = """
import sys, torch
from melanoma.data import make_loader
class Numbers(torch.utils.data.Dataset):
    def __len__(self): return 64
    def __getitem__(self, i): return torch.zeros(2), torch.tensor(0.0)
batches = iter(make_loader(Numbers(), 4, train=True, num_workers=2, seed=0))
next(batches)  # workers running at exit, as when an exception's traceback holds the iterator
sys.exit(3)
"""


def test_an_exit_with_loader_workers_running_does_not_hang() -> None:
    """Workers ignore SIGTERM, and multiprocessing's exit handler would wait for them forever (a hang seen
    after SIGTERM in test_resume); melanoma.data kills them at exit instead, quietly."""
    done = subprocess.run([sys.executable, "-c", LEFT_RUNNING], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and done.stderr == ""


def test_readable_images_skip_what_does_not_decode(tmp_path: Path) -> None:
    good = _jpeg(tmp_path / "in" / "good.jpg", size=(8, 8))
    (tmp_path / "in" / "broken.jpg").write_bytes(b"not a jpeg")
    paths, bad = readable_images(tmp_path / "in")
    assert paths == [str(good)] and [Path(p).name for p, _ in bad] == ["broken.jpg"]
    (tmp_path / "in" / "good.jpg").write_bytes(b"nor this")
    with pytest.raises(DataError, match=r"^none of the images in images=.*in could be read$"):
        readable_images(tmp_path / "in", "images")


def test_balanced_sampler_draws_each_class_equally_often() -> None:
    labels = [0] * 90 + [1] * 10
    ds = ImageDataset([f"{i}.jpg" for i in range(100)], labels)
    loader = make_loader(ds, 10, train=True, num_workers=0, seed=3, balanced=True)
    assert len(loader) == 10  # the epoch keeps its length, so the schedule's steps do not change

    def draw(sampler, epoch):
        sampler.set_epoch(epoch)  # as the training loop does
        return list(sampler)

    drawn = [draw(loader.sampler, epoch) for epoch in range(40)]
    share = np.mean([labels[i] for epoch in drawn for i in epoch])
    assert abs(share - 0.5) < 0.03  # 4,000 draws: the malignant 10% now make half of them
    assert drawn[0] != drawn[1]  # a new draw every epoch ...
    again = make_loader(ds, 10, train=True, num_workers=0, seed=3, balanced=True)
    assert draw(again.sampler, 7) == drawn[7]  # ... that only seed and epoch decide: a resumed run draws the same
    assert draw(make_loader(ds, 10, train=True, num_workers=0, seed=4, balanced=True).sampler, 7) != drawn[7]
    ranks = [draw(make_loader(ds, 10, train=True, num_workers=0, seed=3, balanced=True, rank=r,
                              world_size=2).sampler, 7) for r in (0, 1)]
    assert len(ranks[0]) == 50 and ranks[0] != ranks[1]  # under torchrun each rank draws its own half
    assert list(make_loader(ds, 10, train=False, num_workers=0, seed=3, balanced=True).sampler) == list(range(100))
    with pytest.raises(ConfigError, match="data.sampler=balanced needs images of both classes"):
        make_loader(ImageDataset(["a.jpg"] * 4, [0] * 4), 2, train=True, num_workers=0, seed=3, balanced=True)
