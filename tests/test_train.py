"""End-to-end: real training runs on generated images with timm's tiny test models."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

import melanoma.crossval as crossval
from melanoma.checkpoint import load_checkpoint
from melanoma.cli.train import train
from melanoma.errors import ConfigError, DataError
from melanoma.metrics import METRICS

from conftest import TINY, make_config


def _train(data: Path, run_dir: Path, *extra: str) -> dict:
    return train(make_config([f"data.root={data}", *TINY, *extra]), run_dir)


@pytest.fixture(scope="module")
def tiny_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, _train(tiny_data, run_dir, "trainer.epochs=6", "augmentation=dermoscopy")


def test_every_output_is_written(tiny_run: tuple[Path, dict], tiny_data: Path) -> None:
    run_dir, metrics = tiny_run
    folds = pd.read_csv(run_dir / "folds.csv")
    assert list(folds.columns) == ["path", "label", "fold", "group"] and len(folds) == 150
    assert sorted(folds["fold"].unique()) == [0, 1, 2]
    for k in range(3):
        history = pd.read_csv(run_dir / f"fold{k}" / "history.csv")
        assert list(history.columns) == ["epoch", "train_loss", "val_loss", "val_auc", "val_accuracy", "lr",
                                         "seconds"]
        assert history["epoch"].tolist() == [1, 2, 3, 4, 5, 6]
        ckpt = load_checkpoint(run_dir / f"fold{k}" / "best.pt")
        assert ckpt["fold"] == k and ckpt["config"]["model"]["name"] == "test_efficientnet"
        assert ckpt["epoch"] == metrics["folds"][k]["best_epoch"]
        best_auc = history.loc[history["epoch"] == ckpt["epoch"], "val_auc"].item()
        assert best_auc == pytest.approx(history["val_auc"].max())  # best.pt is the best epoch by AUC
        assert ckpt["metrics"]["auc"] == pytest.approx(best_auc)
        assert metrics["folds"][k]["last_epoch_auc"] == pytest.approx(history["val_auc"].iloc[-1])
        Image.open(run_dir / f"fold{k}" / "confusion_matrix.png").verify()
    for name in ("confusion_matrix.png", "loss_curves.png", "roc_curve.png"):
        Image.open(run_dir / name).verify()
    oof = pd.read_csv(run_dir / "oof_predictions.csv")
    assert list(oof.columns) == ["path", "label", "fold", "prob", "prob_uncalibrated", "prob_flip"]
    assert sorted(oof["path"]) == sorted(folds["path"])  # every training image predicted exactly once
    assert oof.merge(folds, on=["path", "label", "fold"]).shape[0] == 150  # by the model that never saw it
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert on_disk["n_images"] == 150 and on_disk["n_skipped"] == 0 and len(on_disk["folds"]) == 3
    if not torch.cuda.is_available():  # what trainer.precision=auto resolved to, recorded: fp32 at 32 px
        assert on_disk["runtime"] == {"device": "cpu", "precision": "fp32", "channels_last": True}
    for key in METRICS:
        assert math.isfinite(on_disk["mean"][key]) and math.isfinite(on_disk["std"][key])
        assert math.isfinite(on_disk["oof"][key])
    assert on_disk["mean"]["last_epoch_auc"] == pytest.approx(np.mean([f["last_epoch_auc"] for f in on_disk["folds"]]))
    assert on_disk["mean"]["last_epoch_auc"] <= on_disk["mean"]["auc"]  # the best epoch's AUC bounds the last's


def test_the_summary_says_how_much_best_epoch_selection_flatters_the_cv_auc() -> None:
    from melanoma.cli.train import _selection_note

    metrics = {"mean": {"auc": 0.804, "last_epoch_auc": 0.763}}
    assert _selection_note(metrics) == ("\nmean AUC at each fold's last epoch: 0.7630 (the best epochs were chosen on "
                                        "the validation folds themselves, so the CV AUC above is optimistic by up to "
                                        "+0.0410)")
    assert _selection_note({"mean": {"auc": 0.8, "last_epoch_auc": 0.8}}) == ""  # every last epoch was the best
    assert _selection_note({"mean": {"auc": None, "last_epoch_auc": None}}) == ""


def test_the_run_records_its_resolved_config_and_preprocessing(tiny_run: tuple[Path, dict], tiny_data: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, _ = tiny_run
    text = (run_dir / "config.yaml").read_text()
    assert "${" not in text  # every interpolation resolved when it trained
    config = yaml.safe_load(text)
    assert config["data"]["root"] == str(tiny_data) and config["cv"]["seed"] == config["seed"] == 42
    assert config["data"]["cache_dir"].endswith("/decoded") and not config["data"]["cache_dir"].startswith("~")
    assert config == load_checkpoint(run_dir / "fold0" / "best.pt")["config"]
    monkeypatch.setenv("MELANOMA_CACHE", "/elsewhere")  # the reader's environment changes nothing
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == config
    preprocess = json.loads((run_dir / "preprocess.json").read_text())
    # test_efficientnet's own timm preprocessing: crop 0.95, bicubic, ImageNet statistics
    assert preprocess == {"image_size": 32, "resize": 33, "crop_pct": 0.95, "interpolation": "bicubic",
                          "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert load_checkpoint(run_dir / "fold2" / "best.pt")["preprocess"] == preprocess


def test_learns_above_chance(tiny_run: tuple[Path, dict]) -> None:
    _, metrics = tiny_run
    assert metrics["oof"]["auc"] > 0.6 and metrics["mean"]["auc"] > 0.6


def test_folds_never_see_their_validation_images(tiny_data: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real_fit = crossval.fit

    def spy(model, train_loader, val_loader, *args, **kwargs):
        seen.append((set(train_loader.dataset.paths), set(val_loader.dataset.paths)))
        return real_fit(model, train_loader, val_loader, *args, **kwargs)

    monkeypatch.setattr(crossval, "fit", spy)
    _train(tiny_data, tmp_path, "trainer.epochs=1")
    assert len(seen) == 3
    everything = set().union(*(t | v for t, v in seen))
    assert len(everything) == 150
    for train_paths, val_paths in seen:
        assert not train_paths & val_paths and train_paths | val_paths == everything
    assert set().union(*(v for _, v in seen)) == everything and sum(len(v) for _, v in seen) == 150


def test_augmentation_on_device_feeds_uint8_crops_and_stays_reproducible(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real_fit = crossval.fit

    def spy(model, train_loader, *args, **kwargs):
        images, _ = next(iter(train_loader))
        seen.append((images.dtype, kwargs["device_transform"]))
        return real_fit(model, train_loader, *args, **kwargs)

    monkeypatch.setattr(crossval, "fit", spy)
    runs = [_train(tiny_data, tmp_path / r, "augmentation.on_device=true", "trainer.epochs=1", "cv.folds=2")
            for r in "ab"]
    assert runs[0] == runs[1] and math.isfinite(runs[0]["oof"]["auc"])  # kornia draws from the seeded generators
    assert all(dtype == torch.uint8 and transform is not None for dtype, transform in seen) and len(seen) == 4
    assert load_checkpoint(tmp_path / "a" / "fold0" / "best.pt")["preprocess"]["mean"] == [0.485, 0.456, 0.406]


def test_deterministic_runs_are_identical(tiny_data: Path, tmp_path: Path) -> None:
    a = _train(tiny_data, tmp_path / "a")
    b = _train(tiny_data, tmp_path / "b")
    assert a == b
    pa, pb = (pd.read_csv(tmp_path / r / "oof_predictions.csv") for r in "ab")
    assert pa["prob"].tolist() == pb["prob"].tolist()


def test_bad_file_is_skipped_and_counted_or_refused(tiny_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    broken = data / "train" / "benign" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(DataError, match=r"broken\.jpg is not a readable image"):
        _train(data, tmp_path / "refused")
    assert not (tmp_path / "refused" / "folds.csv").exists()  # nothing half-written
    metrics = _train(data, tmp_path / "run", "data.on_bad_file=skip", "trainer.epochs=1")
    assert metrics["n_skipped"] == 1 and metrics["skipped_files"][0]["path"] == str(broken)
    assert str(broken) not in set(pd.read_csv(tmp_path / "run" / "folds.csv")["path"])


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("melanoma-train")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_cli_error_is_one_line_with_the_fix(tmp_path: Path) -> None:
    result = _cli(f"data.root={tmp_path / 'nowhere'}", "model.pretrained=false", f"hydra.run.dir={tmp_path / 'r'}",
                  cwd=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("melanoma-train: error: data.root=") and "data=demo" in last
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # nine training runs: the slow tier (scripts/test.sh -m slow)
def test_seed_grid_preset_launches_nine_runs(tiny_data: Path, tmp_path: Path) -> None:
    tiny = [o for o in TINY if not o.startswith("data.batch_size")]  # the grid sets it
    result = _cli("hparams=seed_grid", f"data.root={tiny_data}", *tiny, "trainer.epochs=1", "cv.folds=2",
                  f"hydra.sweep.dir={tmp_path / 'grid'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    points = set()
    for job in range(9):
        ckpt = load_checkpoint(tmp_path / "grid" / str(job) / "fold1" / "best.pt")
        points.add((ckpt["config"]["optimizer"]["lr"], ckpt["config"]["data"]["batch_size"]))
    assert points == {(lr, bs) for lr in (0.001, 0.01, 0.1) for bs in (16, 32, 64)}


def test_duplicates_share_a_fold_and_the_audit_can_be_skipped(tiny_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    originals = sorted((data / "train" / "malignant").iterdir())[:6]
    for i, path in enumerate(originals):  # copies of six lesions (48-px images are too small for near-copies)
        shutil.copyfile(path, path.with_name(f"copy{i}.jpg"))
    _train(data, tmp_path / "grouped", "trainer.epochs=1")
    folds = pd.read_csv(tmp_path / "grouped" / "folds.csv").set_index("path")
    for i, path in enumerate(originals):
        copy = str(path.with_name(f"copy{i}.jpg"))
        assert folds.loc[str(path), "group"] == folds.loc[copy, "group"]
        assert folds.loc[str(path), "fold"] == folds.loc[copy, "fold"]
    audit = json.loads((tmp_path / "grouped" / "audit.json").read_text())
    assert audit["exact_duplicate_pairs"] == 6 and audit["pairs_crossing_folds"] == 0
    assert len(pd.read_csv(tmp_path / "grouped" / "duplicates.csv")) == 6

    metrics = _train(data, tmp_path / "plain", "trainer.epochs=1", "audit.enabled=false")
    assert metrics["grouped_folds"] is False and not (tmp_path / "plain" / "audit.json").exists()
    assert list(pd.read_csv(tmp_path / "plain" / "folds.csv").columns) == ["path", "label", "fold"]


def test_divergence_stops_the_fold_with_the_way_out(tiny_data: Path, tmp_path: Path) -> None:
    from melanoma.errors import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"fold 0, epoch 1.*not finite; lower optimizer\.lr \(now 1e\+08\)"):
        _train(tiny_data, tmp_path, "optimizer=sgd", "optimizer.lr=1e8")


@pytest.mark.slow  # a 4-point sweep in a CLI process: the slow tier
def test_a_sweep_records_each_point_and_goes_on_past_failing_and_diverging_ones(tiny_data: Path,
                                                                              tmp_path: Path) -> None:
    # 2 x 2 points: a data root with no images fails at once, lr 1e8 diverges, only (tiny_data, 0.01) trains.
    # (A data root that does not exist is refused before the sweep starts: see test_hardening.)
    (tmp_path / "empty").mkdir()
    result = _cli("-m", f"data.root={tmp_path / 'empty'},{tiny_data}", "optimizer.lr=1e8,0.01", *TINY,
                  "trainer.epochs=1", "optimizer=sgd", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert result.returncode != 0  # the sweep reports its failed points ...
    assert f"melanoma-train: error: {tmp_path / 'empty'} has no" in result.stderr, result.stderr
    assert "lower optimizer.lr" in result.stderr
    finished = []
    for job in range(4):
        job_dir = tmp_path / "sweep" / str(job)
        overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
        point = (next(o for o in overrides if o.startswith("data.root=")) == f"data.root={tiny_data}",
                 float(next(o for o in overrides if o.startswith("optimizer.lr="))[13:]))
        if (job_dir / "metrics.json").is_file():  # ... after running the rest
            finished.append(point)
            assert json.loads((job_dir / "metrics.json").read_text())["n_images"] == 150
            assert yaml.safe_load((job_dir / "config.yaml").read_text())["optimizer"]["lr"] == 0.01
            assert load_checkpoint(job_dir / "fold0" / "best.pt")["config"]["optimizer"]["lr"] == 0.01
    assert finished == [(True, 0.01)]


def test_an_unknown_group_key_is_refused_before_anything_is_written(tiny_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trainer.epoch is not a key of trainer \(close: epochs\)"):
        _train(tiny_data, tmp_path / "run", "+trainer.epoch=3")
    with pytest.raises(ConfigError, match=r"optimizer.learning_rate is not a key of optimizer"):
        _train(tiny_data, tmp_path / "run", "+optimizer.learning_rate=0.1")
    assert not (tmp_path / "run").exists()  # nothing of a run was written, not even its lock
