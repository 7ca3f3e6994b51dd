"""melanoma-eval and melanoma-predict on real tiny runs: ensembles, TTA, thresholds, bad input."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from melanoma.checkpoint import load_checkpoint
from melanoma.cli.evaluate import evaluate_run
from melanoma.cli.predict import predict_images
from melanoma.cli.train import train
from melanoma.errors import ConfigError, WeightsError
from melanoma.inference import load_ensemble, predict_probs, tta_views
from melanoma.metrics import choose_thresholds
from melanoma.models import create_model
from melanoma.runtime import resolve_runtime

from conftest import TINY, make_config

CPU = resolve_runtime("cpu", "fp32")


@pytest.fixture(scope="module")
def run_dir(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    train(make_config([f"data.root={tiny_data}", *TINY, "trainer.epochs=2", "augmentation=dermoscopy"]), out)
    return out


def _eval_cfg(ckpt: Path | str, *extra: str):
    return make_config([f"ckpt={ckpt}", "eval.n_resamples=200", "eval.num_workers=0", *extra], "eval")


def test_training_stores_oof_thresholds_in_metrics_and_every_checkpoint(run_dir: Path) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    oof = pd.read_csv(run_dir / "oof_predictions.csv")
    assert metrics["thresholds"] == pytest.approx(choose_thresholds(oof["label"], oof["prob"]), rel=1e-6)
    assert metrics["operating_point"] == "sens95"
    for k in range(3):
        ckpt = load_checkpoint(run_dir / f"fold{k}" / "best.pt")
        assert ckpt["thresholds"] == metrics["thresholds"] and ckpt["operating_point"] == "sens95"
        assert ckpt["preprocess"]["image_size"] == 32 and len(ckpt["preprocess"]["mean"]) == 3


def test_ensemble_is_the_mean_of_its_fold_models(run_dir: Path, tmp_path: Path) -> None:
    metrics = evaluate_run(_eval_cfg(run_dir), tmp_path / "ens")
    pred = pd.read_csv(tmp_path / "ens" / "predictions.csv")
    assert list(pred.columns) == ["path", "label", "prob", "prob_fold0", "prob_fold1", "prob_fold2",
                                  "has_train_duplicate", "ita"]
    assert len(pred) == 20 and metrics["n_images"] == 20 and metrics["n_positive"] == 10
    assert np.allclose(pred["prob"], pred[["prob_fold0", "prob_fold1", "prob_fold2"]].mean(axis=1), atol=1e-6)
    single = evaluate_run(_eval_cfg(run_dir / "fold1" / "best.pt"), tmp_path / "one")
    one = pd.read_csv(tmp_path / "one" / "predictions.csv")
    assert np.allclose(one["prob"], pred["prob_fold1"], atol=1e-6) and single["models"] == [
        str(run_dir / "fold1" / "best.pt")]
    for name in ("confusion_matrix.png", "roc_curve.png", "pr_curve.png", "calibration.png"):
        Image.open(tmp_path / "ens" / name).verify()


def test_eval_metrics_json_has_every_metric_threshold_and_ci(run_dir: Path, tmp_path: Path) -> None:
    evaluate_run(_eval_cfg(run_dir, "eval.threshold=0.3"), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["thresholds"]) == {"0.5", "youden", "sens95", "0.3"}
    assert metrics["operating_point"] == "0.3" and metrics["threshold"] == 0.3
    assert metrics["bootstrap"] == {"n_resamples": 200, "level": 0.95, "seed": 0, "stratified": True}
    block = metrics["thresholds"]["youden"]["metrics"]
    for key in ("accuracy", "f1", "precision", "recall", "auc", "sensitivity", "specificity", "balanced_accuracy",
                "pauc_80", "ece", "brier", "ppv_at_prevalence", "npv_at_prevalence"):
        assert key in block
        if block[key]["value"] is not None:
            lo, hi = block[key]["ci"]
            assert lo <= block[key]["value"] <= hi


def test_d4_views_are_the_eight_symmetries_and_eval_records_tta(run_dir: Path, tmp_path: Path) -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    views = tta_views(x, "d4")
    expected = [x, x.transpose(-1, -2).flip(-1), x.flip(-1).flip(-2), x.transpose(-1, -2).flip(-2),
                x.flip(-1), x.flip(-2), x.transpose(-1, -2), x.flip(-1).flip(-2).transpose(-1, -2)]
    assert len(views) == 8
    for e in expected:  # each of the 8 symmetries of the square appears exactly once
        assert sum(torch.equal(v, e) for v in views) == 1
    assert [torch.equal(a, b) for a, b in zip(tta_views(x, "flip"), [x, x.flip(-1)], strict=True)] == [True, True]
    evaluate_run(_eval_cfg(run_dir, "eval.tta=d4"), tmp_path / "d4")
    assert json.loads((tmp_path / "d4" / "metrics.json").read_text())["tta"] == "d4"


def test_eval_and_predict_with_flips_use_thresholds_chosen_on_flipped_oof_predictions(
        run_dir: Path, tiny_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture) -> None:
    """cv.oof_tta=[flip] (the default): training scores its OOF images again with flips and picks thresholds on
    those; eval.tta=flip and predict tta=flip apply them, and a mode the run lacks (d4) warns in one line."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    oof = pd.read_csv(run_dir / "oof_predictions.csv")
    flip = metrics["thresholds_by_tta"]["flip"]
    assert list(metrics["thresholds_by_tta"]) == ["flip"]
    assert flip == pytest.approx(choose_thresholds(oof["label"], oof["prob_flip"]), rel=1e-6)
    assert flip["sens95"] != metrics["thresholds"]["sens95"]  # the views moved it (little, for this tiny model)
    caplog.set_level("WARNING")
    result = evaluate_run(_eval_cfg(run_dir, "eval.tta=flip"), tmp_path / "flip")
    assert result["threshold"] == pytest.approx(flip["sens95"])
    promised = metrics["oof_at_thresholds_by_tta"]["flip"]["sens95"]
    assert result["promises"]["sens95"]["oof"] == {k: promised[k] for k in ("sensitivity", "specificity")}
    assert "cv.oof_tta" not in caplog.text
    result = evaluate_run(_eval_cfg(run_dir, "eval.tta=d4"), tmp_path / "d4")
    assert result["threshold"] == pytest.approx(metrics["thresholds"]["sens95"])  # no d4 set: the plain one
    warned = [r.getMessage() for r in caplog.records if "cv.oof_tta=[d4]" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0]
    table = predict_images(make_config([f"ckpt={run_dir}", f"input={tiny_data / 'test'}", "num_workers=0",
                                        "tta=flip"], "predict"), tmp_path / "predict")
    assert (table["decision"] == np.where(table["prob"] >= flip["sens95"], "malignant", "benign")).all()
    if f"{flip['sens95']:.4f}" != f"{metrics['thresholds']['sens95']:.4f}":  # the printed line tells them apart
        assert f"at the sens95 threshold {flip['sens95']:.4f} " in capsys.readouterr().out


def test_predict_probs_averages_views_per_model_from_one_decoded_batch() -> None:
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Conv2d(3, 1, 3), torch.nn.Flatten(), torch.nn.LazyLinear(1))
              for _ in range(2)]
    images = torch.randn(5, 3, 8, 8)
    for m in models:
        m(images)  # materialise the lazy layer
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(5)), batch_size=2)
    out = predict_probs(models, loader, CPU, "d4")
    for i, m in enumerate(models):
        expected = torch.stack([torch.sigmoid(m(v).squeeze(1)) for v in tta_views(images, "d4")]).mean(0)
        assert np.allclose(out[i], expected.detach().numpy(), atol=1e-6)
    assert not np.allclose(out, predict_probs(models, loader, CPU, "none"))


def test_a_saturated_logit_is_calibrated_at_test_time_as_its_oof_twin_was() -> None:
    """OOF probabilities are clipped to [1e-7, 1 - 1e-7] before the temperature: inference clips the logits to
    the same range, so a threshold chosen among saturated OOF scores means the same on the test set."""
    from melanoma.calibration import apply_temperature

    logits = torch.tensor([-20.0, -3.0, 0.5, 25.0])

    class Fixed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return logits[: len(x), None] + 0 * x.sum((1, 2, 3))[:, None]

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 3, 4, 4), torch.zeros(4)),
                                         batch_size=4)
    out = predict_probs([Fixed(), Fixed()], loader, CPU, "none", [3.0, 1.0])
    oof = apply_temperature(torch.sigmoid(logits).numpy(), 3.0)  # what training stores for the same model
    assert np.allclose(out[0], oof, rtol=1e-5) and out[0][0] == pytest.approx(0.0046, abs=1e-4)
    assert np.allclose(out[1], torch.sigmoid(logits).numpy())  # temperature 1: untouched, as in training


def test_another_labelled_set_via_data_override(run_dir: Path, tiny_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "other"
    for cls in ("benign", "malignant"):
        shutil.copytree(tiny_data / "test" / cls, folder / cls)
    (folder / "benign" / "corrupt.jpg").write_bytes(b"not an image")
    shutil.copyfile(sorted((tiny_data / "train" / "benign").iterdir())[5], folder / "benign" / "seen.jpg")
    metrics = evaluate_run(_eval_cfg(run_dir, "data=folder", f"data.root={folder}", "data.on_bad_file=skip"),
                           tmp_path / "out")
    assert metrics["n_images"] == 21 and metrics["n_skipped"] == 1 and metrics["data"]["layout"] == "folder"
    # dedup compares against the images the run trained on, not the other set's own splits
    assert metrics["dedup"]["n_removed"] == 1 and metrics["dedup"]["n_images"] == 20


def test_one_class_test_set_reports_unavailable_metrics(run_dir: Path, tiny_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "benign_only"
    shutil.copytree(tiny_data / "test" / "benign", folder / "benign")
    (folder / "malignant").mkdir()
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": sorted(str(p) for p in (folder / "benign").iterdir()), "label": 0}).to_csv(manifest,
                                                                                                     index=False)
    metrics = evaluate_run(_eval_cfg(run_dir, "data=csv", f"data.manifest={manifest}", "eval.split=all"),
                           tmp_path / "out")
    assert metrics["n_positive"] == 0
    assert metrics["unavailable"]["auc"] == "the test set holds only benign images"
    assert metrics["thresholds"]["0.5"]["metrics"]["auc"] == {"value": None, "ci": None}
    assert metrics["thresholds"]["0.5"]["metrics"]["specificity"]["value"] is not None


def test_predict_writes_one_row_per_readable_image(run_dir: Path, tiny_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    shutil.copytree(tiny_data / "test" / "malignant", folder / "nested")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (folder / ".DS_Store").write_bytes(b"x")
    cfg = make_config([f"ckpt={run_dir}", f"input={folder}", "num_workers=0"], "predict")
    table = predict_images(cfg, tmp_path / "out")
    written = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert list(written.columns) == ["path", "prob", "decision"] and len(written) == 10 == len(table)
    threshold = load_checkpoint(run_dir / "fold0" / "best.pt")["thresholds"]["sens95"]
    assert (written["decision"] == np.where(written["prob"] >= threshold, "malignant", "benign")).all()
    one = predict_images(make_config([f"ckpt={run_dir}", f"input={written['path'][0]}", "num_workers=0",
                                      "threshold=0.5"], "predict"), tmp_path / "one")
    assert len(one) == 1 and one["prob"][0] == pytest.approx(written["prob"][0], abs=1e-6)


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_bad_checkpoints_are_refused_with_one_line(run_dir: Path, tmp_path: Path) -> None:
    evil, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    with open(evil, "wb") as f:
        pickle.dump({"model": _Evil(str(marker))}, f)
    truncated = tmp_path / "cut.pt"
    data = (run_dir / "fold0" / "best.pt").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    other = load_checkpoint(run_dir / "fold0" / "best.pt")
    other["config"]["model"]["name"] = "test_resnet"  # weights of another architecture
    torch.save(other, tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("hello")
    cases = {evil: "not a loadable checkpoint", truncated: "not a loadable checkpoint",
             tmp_path / "other.pt": "do not fit test_resnet", tmp_path / "text.pt": "not a loadable checkpoint",
             tmp_path / "missing.pt": "does not exist", tmp_path: "holds no fold"}
    for path, message in cases.items():
        with pytest.raises(WeightsError, match=message) as info:
            load_ensemble(path, CPU)
        assert "\n" not in str(info.value)
    assert not marker.exists()


def test_folds_of_two_architectures_are_not_one_ensemble(run_dir: Path, tmp_path: Path) -> None:
    mixed = shutil.copytree(run_dir, tmp_path / "mixed")
    payload = load_checkpoint(mixed / "fold1" / "best.pt")  # same preprocessing, another network
    payload["config"]["model"]["name"] = "test_resnet"
    payload["model"] = create_model("test_resnet").state_dict()
    torch.save(payload, mixed / "fold1" / "best.pt")
    with pytest.raises(ConfigError, match=r"fold1/best.pt is a test_resnet, .*fold0/best.pt a test_efficientnet: "
                                          r"one ensemble holds one architecture"):
        load_ensemble(mixed, CPU)


@pytest.mark.slow  # a CLI process: the slow tier (check_overrides' in-process tests cover the same lines)
def test_eval_cli_error_is_one_line(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("melanoma-eval")
    result = subprocess.run([str(exe), f"ckpt={tmp_path / 'nothing'}", f"hydra.run.dir={tmp_path / 'o'}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("melanoma-eval: error: ckpt=")


def test_eval_and_predict_configs_compose() -> None:
    cfg = make_config(["ckpt=x"], "eval")
    assert cfg.eval.tta == "none" and cfg.eval.prevalence == 0.05 and cfg.eval.n_resamples >= 1000
    assert OmegaConf.select(cfg, "data.root") is None  # falls back to the run's data
    assert make_config(["ckpt=x", "input=y"], "predict").threshold is None


def test_each_image_is_decoded_once_per_ensemble(run_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import melanoma.data

    calls = []
    real = melanoma.data.load_image
    monkeypatch.setattr(melanoma.data, "load_image", lambda path: calls.append(path) or real(path))
    evaluate_run(_eval_cfg(run_dir, "eval.tta=flip"), tmp_path)
    assert len(calls) == 20 == len(set(calls))  # 3 models x 2 views, one decode per image


def test_a_kaggle_test_split_of_one_class_is_scored_not_refused(run_dir: Path, tiny_data: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    data = shutil.copytree(tiny_data, tmp_path / "data")
    for image in (data / "test" / "malignant").iterdir():
        image.unlink()
    metrics = evaluate_run(_eval_cfg(run_dir, f"data.root={data}"), tmp_path / "out")
    assert metrics["n_images"] == 10 and metrics["n_positive"] == 0
    assert metrics["unavailable"]["auc"] == "the test set holds only benign images"
    assert metrics["dedup"]["n_removed"] == 0
    printed = capsys.readouterr().out
    assert "auc: unavailable" in printed and "Without the" not in printed  # no second, identical table


@pytest.mark.parametrize("split", ["all", "train"])
def test_dedup_leaves_out_the_training_images_themselves(run_dir: Path, tmp_path: Path, split: str,
                                                         capsys: pytest.CaptureFixture) -> None:
    """eval.split=all scores the run's own training images: the deduplicated metrics are the test split's."""
    metrics = evaluate_run(_eval_cfg(run_dir, f"eval.split={split}"), tmp_path / "out")
    pred = pd.read_csv(tmp_path / "out" / "predictions.csv")
    train_paths = set(pd.read_csv(run_dir / "oof_predictions.csv")["path"])
    assert set(pred.loc[pred["has_train_duplicate"], "path"]) == train_paths & set(pred["path"])
    assert metrics["dedup"]["n_removed"] == len(train_paths)
    printed = capsys.readouterr().out
    if split == "all":
        test = pred[~pred["path"].isin(train_paths)]
        assert metrics["dedup"]["n_images"] == len(test) == metrics["n_images"] - len(train_paths) > 0
        from sklearn.metrics import roc_auc_score

        auc = metrics["dedup"]["thresholds"]["0.5"]["metrics"]["auc"]["value"]
        assert auc == pytest.approx(roc_auc_score(test["label"], test["prob"]))
    else:
        assert metrics["dedup"]["n_images"] == 0 and metrics["dedup"]["thresholds"] == {}
        assert "No deduplicated metrics: all" in printed


def test_dedup_metrics_leave_out_exactly_the_test_copies_of_train_images(run_dir: Path, tiny_data: Path,
                                                                          tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    leaked = [data / "test" / "benign" / "leak0.jpg", data / "test" / "malignant" / "leak1.jpg"]
    shutil.copyfile(sorted((data / "train" / "benign").iterdir())[0], leaked[0])
    shutil.copyfile(sorted((data / "train" / "malignant").iterdir())[3], leaked[1])
    metrics = evaluate_run(_eval_cfg(run_dir, f"data.root={data}"), tmp_path / "out")
    pred = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert set(pred.loc[pred["has_train_duplicate"], "path"]) == {str(p) for p in leaked}
    assert metrics["n_images"] == 22 and metrics["dedup"]["n_removed"] == 2 and metrics["dedup"]["n_images"] == 20
    kept = pred[~pred["has_train_duplicate"]]
    auc = metrics["dedup"]["thresholds"]["0.5"]["metrics"]["auc"]["value"]
    from sklearn.metrics import roc_auc_score

    assert auc == pytest.approx(roc_auc_score(kept["label"], kept["prob"]))


def test_stacked_thresholds_under_tta_warn_that_none_matches_them(run_dir: Path) -> None:
    """A stacker's thresholds were chosen without views: under tta=flip the warning says so, and does not tell the
    user to retrain with cv.oof_tta (which the run already had)."""
    from melanoma.stacking import RunStacker

    ensemble = load_ensemble(run_dir, CPU)
    assert ensemble.for_tta("flip")[1] is None and ensemble.for_tta("flip")[0].thresholds_tta == "flip"
    stacked = RunStacker(None, pd.DataFrame(), {"0.5": 0.5, "sens95": 0.2}, {}, 0, {}).operating_points_of(ensemble)
    same, warning = stacked.for_tta("flip")
    assert same.thresholds == {"0.5": 0.5, "sens95": 0.2} and same.thresholds_tta == "none"
    assert warning.startswith("tta=flip: the stacked thresholds") and "tta=none matches them" in warning
    assert "cv.oof_tta" not in warning and stacked.for_tta("none") == (stacked, None)
