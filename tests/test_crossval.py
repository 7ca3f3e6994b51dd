"""The fold loop called as a plain function, without Hydra: what a notebook user does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from melanoma import crossval
from melanoma.checkpoint import load_checkpoint
from melanoma.crossval import (
    LoaderSettings,
    TrainSettings,
    cross_validate,
    load_training_set,
    record_run,
    tta_oof_probs,
    write_results,
)
from melanoma.data import make_loader
from melanoma.folds import make_folds
from melanoma.metrics import choose_thresholds
from melanoma.models import create_model, model_data_config
from melanoma.optim import OptimizerSettings, ScheduleSettings
from melanoma.runtime import resolve_runtime
from melanoma.transforms import build_pipeline, resolve_preprocess


def test_cross_validate_with_plain_arguments(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    training = load_training_set("kaggle", tiny_data, ("benign", "malignant"), audit=True, audit_workers=1)
    records = training.records
    assert len(records) == 150 and {"path", "label", "group", "sha256"} <= set(records.columns)
    assert training.summary["n_images"] == 170 and training.skipped == []  # the audit saw the test split too
    fold_of = make_folds(records["label"], folds=2, seed=0, groups=records["group"])

    def model_factory():
        return create_model("test_efficientnet", num_classes=1)

    preprocess = resolve_preprocess(32, model_data_config(model_factory()))
    pipeline = build_pipeline(preprocess, augment=False)
    samplers = []  # the training loaders draw balanced classes (data.sampler=balanced), the validation ones do not

    def recording_loader(*args, **kwargs):
        loader = make_loader(*args, **kwargs)
        samplers.append(type(loader.sampler).__name__)
        return loader

    monkeypatch.setattr(crossval, "make_loader", recording_loader)
    cv = cross_validate(records[["path", "label"]], fold_of, model_factory, pipeline, resolve_runtime("cpu", "fp32"),
                        tmp_path, optimizer=OptimizerSettings("adam", lr=1e-3), schedule=ScheduleSettings(),
                        train=TrainSettings(epochs=1, deterministic=True),
                        loader=LoaderSettings(batch_size=16, balanced=True), seed=3,
                        config={"note": "a notebook run", "model": {"name": "test_efficientnet"}})
    assert samplers == ["BalancedSampler", "SequentialSampler"] * 2
    assert len(cv.folds) == 2 and [f["fold"] for f in cv.folds] == [0, 1] and len(cv.temperatures) == 2
    assert sorted(cv.oof["path"]) == sorted(records["path"])  # every image predicted once ...
    assert np.array_equal(cv.oof.sort_index()["fold"].to_numpy(), fold_of)  # ... by the model that never saw it
    assert cv.oof["prob"].between(0, 1).all() and cv.oof["prob_uncalibrated"].between(0, 1).all()
    metrics = write_results(cv, tmp_path, "test_efficientnet", "youden", n_images=len(records))
    assert metrics == json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n_images"] == 150 and metrics["operating_point"] == "youden" and len(metrics["folds"]) == 2
    ckpt = load_checkpoint(tmp_path / "fold1" / "best.pt")
    assert ckpt["config"] == {"note": "a notebook run", "model": {"name": "test_efficientnet"}}
    assert ckpt["preprocess"] == preprocess.to_dict()
    assert ckpt["thresholds"] == metrics["thresholds"] and ckpt["operating_point"] == "youden"
    assert ckpt["temperature"] == pytest.approx(cv.temperatures[1])
    assert metrics["thresholds_by_tta"] == {} and ckpt["thresholds_by_tta"] == {}  # none asked for

    # The OOF images scored again the way melanoma-eval scores: without views it reproduces training's
    # calibrated validation probabilities; with flips it differs, and gets thresholds of its own.
    tta = tta_oof_probs(cv, records[["path", "label"]], tmp_path, resolve_runtime("cpu", "fp32"), ["none", "flip"],
                        num_workers=0)
    assert np.allclose(tta["none"], cv.oof["prob"], atol=1e-5)
    assert not np.allclose(tta["flip"], cv.oof["prob"], atol=1e-4) and np.all((tta["flip"] > 0) & (tta["flip"] < 1))
    metrics = write_results(cv, tmp_path, "test_efficientnet", "sens95", tta_probs=tta)
    assert list(metrics["thresholds_by_tta"]) == ["flip"]  # "none" is the run's own thresholds
    flip = metrics["thresholds_by_tta"]["flip"]
    assert flip == pytest.approx(choose_thresholds(cv.oof["label"], tta["flip"]))
    assert metrics["oof_at_thresholds_by_tta"]["flip"]["sens95"]["sensitivity"] >= 0.95
    assert np.allclose(pd.read_csv(tmp_path / "oof_predictions.csv")["prob_flip"], tta["flip"], atol=1e-6)
    ckpt = load_checkpoint(tmp_path / "fold0" / "best.pt")
    assert ckpt["thresholds_by_tta"] == metrics["thresholds_by_tta"]
    assert ckpt["oof_at_thresholds_by_tta"] == metrics["oof_at_thresholds_by_tta"]


def test_a_differing_record_is_not_overwritten_unless_asked(tmp_path: Path) -> None:
    record_run(tmp_path, {"optimizer": {"lr": 0.001}, "resume": None}, {"image_size": 32})
    record_run(tmp_path, {"optimizer": {"lr": 0.001}, "resume": str(tmp_path)}, {"image_size": 32}, overwrite=False)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["resume"] == str(tmp_path)  # same run: updated
    record_run(tmp_path, {"optimizer": {"lr": 0.1}, "resume": str(tmp_path)}, {"image_size": 32}, overwrite=False)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optimizer"]["lr"] == 0.001  # a refused resume
    record_run(tmp_path, {"optimizer": {"lr": 0.1}}, {"image_size": 64})
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {"optimizer": {"lr": 0.1}}
    assert json.loads((tmp_path / "preprocess.json").read_text()) == {"image_size": 64}
