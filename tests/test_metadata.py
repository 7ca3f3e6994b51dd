"""Clinical metadata (#15): the encoding, fused image + metadata models, and reading the columns everywhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from sklearn.metrics import roc_auc_score

from melanoma.checkpoint import load_checkpoint
from melanoma.cli.evaluate import evaluate_run
from melanoma.cli.predict import predict_images
from melanoma.cli.stack import main as stack_main
from melanoma.cli.stack import stack_run
from melanoma.cli.train import train
from melanoma.data import load_records
from melanoma.errors import ConfigError, DataError
from melanoma.fusion import FusionNet
from melanoma.inference import load_ensemble, predict_paths
from melanoma.metadata import MetadataEncoder, parse_columns
from melanoma.optim import create_optimizer
from melanoma.runtime import resolve_runtime
from melanoma.stacking import fit_stacker, stacker_from_run
from melanoma.synthetic import generate_dataset

from conftest import TINY, make_config

CPU = resolve_runtime("cpu", "fp32")
COLUMNS = "data.metadata=[age_approx,sex,anatom_site]"


def test_numeric_columns_are_standardised_with_a_missing_indicator() -> None:
    train_rows = pd.DataFrame({"age": ["30", "50", "", "70", "unknown"]})
    encoder = MetadataEncoder.fit(train_rows, {"age": None})
    assert encoder.columns == {"age": "numeric"} and encoder.feature_names == ["age", "age=missing"]
    mean, std = encoder.stats["age"]
    assert mean == pytest.approx(50) and std == pytest.approx(np.std([30, 50, 70]))
    out = encoder.transform(pd.DataFrame({"age": ["50", "NaN", "90", " 30 "]}))
    assert out.dtype == np.float32 and out.shape == (4, 2)
    assert out[:, 0] == pytest.approx([0, 0, 40 / std, -20 / std]) and out[:, 1].tolist() == [0, 1, 0, 0]


def test_categorical_levels_come_from_the_training_rows_only() -> None:
    """A level first seen at validation (or missing) is 'unknown': nothing of the validation rows leaks in."""
    encoder = MetadataEncoder.fit(pd.DataFrame({"site": ["back", "torso", "back", "", "?"]}), {"site": None})
    assert encoder.levels["site"] == ["back", "torso", "unknown"]
    out = encoder.transform(pd.DataFrame({"site": ["torso", "palms/soles", "", "back"]}))
    assert out.tolist() == [[0, 1, 0], [0, 0, 1], [0, 0, 1], [1, 0, 0]]
    again = MetadataEncoder.from_dict(json.loads(json.dumps(encoder.to_dict())))  # as stored in best.pt
    assert np.array_equal(again.transform(pd.DataFrame({"site": ["torso", "x"]})), out[:2])


def test_kinds_are_detected_or_declared() -> None:
    assert parse_columns(["age", "site:categorical", " zip : numeric "]) == {"age": None, "site": "categorical",
                                                                              "zip": "numeric"}
    frame = pd.DataFrame({"age": ["1", "2"], "code": ["10", "20"], "sex": ["male", ""]})
    encoder = MetadataEncoder.fit(frame, {"age": None, "code": "categorical", "sex": None})
    assert encoder.columns == {"age": "numeric", "code": "categorical", "sex": "categorical"}
    assert encoder.width == 2 + 3 + 2
    with pytest.raises(ConfigError, match=r"column 'sex' is declared numeric but holds 'male'; declare it "
                                          r"sex:categorical"):
        MetadataEncoder.fit(frame, {"sex": "numeric"})
    with pytest.raises(ConfigError, match=r"'ordinal' is not one of numeric, categorical"):
        parse_columns(["age:ordinal"])
    with pytest.raises(ConfigError, match=r"names the column 'age' twice"):
        parse_columns(["age", "age:numeric"])


def test_manifest_columns_are_read_and_a_missing_one_is_named(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,age_approx,sex\na.jpg,0,55,female\nb.jpg,1,,\n")
    records = load_records("csv", None, manifest=manifest, columns=["age_approx", "sex"])
    assert records[["age_approx", "sex"]].values.tolist() == [["55", "female"], ["", ""]]
    with pytest.raises(DataError, match=r"m.csv has no column 'age' \(close: age_approx; columns: path, "
                                        r"label, age_approx, sex\); fix data.metadata or data.group_column"):
        load_records("csv", None, manifest=manifest, columns=["age"])
    with pytest.raises(ConfigError, match=r"data.metadata and data.group_column \(age\) need data=csv"):
        load_records("kaggle", tmp_path, columns=["age"])
    with pytest.raises(ConfigError, match=r"the column 'group' .* has a name melanoma uses itself"):
        load_records("csv", None, manifest=manifest, columns=["group"])


def test_the_fused_model_keeps_timm_layer_decay_and_starts_at_one_half() -> None:
    model = FusionNet(timm.create_model("test_efficientnet", num_classes=1), n_metadata=5)
    images, metadata = torch.randn(4, 3, 32, 32), torch.randn(4, 5)
    model.eval()
    assert model(images, metadata).shape == (4, 1) and torch.all(model(images, metadata) == 0)  # zero head
    opt = create_optimizer(model, "adamw", 1e-3, weight_decay=0.05, layer_decay=0.5)
    lr = {id(p): group["lr"] for group in opt.param_groups for p in group["params"]}
    named = {name: lr[id(p)] for name, p in model.named_parameters()}
    assert named["head.weight"] == named["meta.0.weight"] == pytest.approx(1e-3)  # new parts: the full rate
    assert named["backbone.conv_stem.weight"] < named["backbone.blocks.3.0.conv_pw.weight"] < 1e-3  # stem least


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext", "test_vit"])
def test_fusion_works_with_every_kind_of_timm_backbone(name: str) -> None:
    """CNNs, ConvNeXt and ViTs alike: one logit, gradients into both branches, timm's layer groups kept."""
    torch.manual_seed(0)
    model = FusionNet(timm.create_model(name, num_classes=1), n_metadata=3)
    with torch.no_grad():
        model.head.weight.normal_()  # the zero head would stop every gradient below it
    images = torch.randn(4, 3, *model.pretrained_cfg["input_size"][1:])
    model(images, torch.randn(4, 3)).sum().backward()
    assert model(images, torch.randn(4, 3)).shape == (4, 1)
    assert model.meta[0].weight.grad.abs().sum() > 0
    assert sum(p.grad.abs().sum() for p in model.backbone.parameters() if p.grad is not None) > 0
    opt = create_optimizer(model, "adamw", 1e-3, weight_decay=0.05, layer_decay=0.5)
    assert len({group["lr"] for group in opt.param_groups}) > 2  # the backbone's depth groups, then the head


@pytest.fixture(scope="module")
def meta_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic set whose label depends partly on age and site (generate_dataset(metadata=True))."""
    return generate_dataset(tmp_path_factory.mktemp("meta") / "set", n_train=300, n_test=100, size=64, seed=0,
                            metadata=True)


def _train(meta_data: Path, out: Path, *extra: str) -> dict:
    args = ["data=csv", f"data.manifest={meta_data / 'manifest.csv'}", *TINY, "trainer.epochs=4", "cv.folds=3",
            COLUMNS, "audit.enabled=false", *extra]
    return train(make_config(args), out)


@pytest.fixture(scope="module")
def runs(meta_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("runs")
    for fusion in ("none", "concat"):
        _train(meta_data, out / fusion, f"model.fusion={fusion}")
    return {fusion: out / fusion for fusion in ("none", "concat")}


def test_a_fused_model_beats_image_only_when_the_label_depends_on_metadata(runs: dict[str, Path]) -> None:
    auc = {f: json.loads((run / "metrics.json").read_text())["oof"]["auc"] for f, run in runs.items()}
    assert auc["concat"] > auc["none"] + 0.04, auc


def test_each_fold_fits_its_encoding_on_its_training_part_only(runs: dict[str, Path], meta_data: Path) -> None:
    folds = pd.read_csv(runs["concat"] / "folds.csv")
    manifest = pd.read_csv(meta_data / "manifest.csv", dtype=str, keep_default_na=False)
    manifest["path"] = [str(meta_data / p) for p in manifest["path"]]
    rows = folds.merge(manifest, on="path")
    for k in range(3):
        stored = MetadataEncoder.from_dict(load_checkpoint(runs["concat"] / f"fold{k}" / "best.pt")["metadata"])
        expected = MetadataEncoder.fit(rows[rows["fold"] != k], parse_columns(["age_approx", "sex", "anatom_site"]))
        assert stored == expected
        assert stored.stats != MetadataEncoder.fit(rows, stored.columns).stats  # not the whole set's


def test_a_fused_model_predicts_after_loading_as_it_validated(runs: dict[str, Path], meta_data: Path) -> None:
    """best.pt reloaded: its predictions on its own validation fold are the OOF predictions training wrote."""
    oof = pd.read_csv(runs["concat"] / "oof_predictions.csv")
    part = oof[oof["fold"] == 1]
    manifest = pd.read_csv(meta_data / "manifest.csv", dtype=str, keep_default_na=False)
    manifest["path"] = [str(meta_data / p) for p in manifest["path"]]
    rows = part[["path"]].merge(manifest, on="path")
    ensemble = load_ensemble(runs["concat"] / "fold1" / "best.pt", CPU)
    assert ensemble.metadata_columns == ["age_approx", "sex", "anatom_site"]
    probs = predict_paths(ensemble, rows["path"].tolist(), CPU, num_workers=0, metadata=rows)[0]
    assert probs == pytest.approx(part["prob"].to_numpy(), abs=1e-5)
    with pytest.raises(DataError, match=r"the.csv has no metadata column 'sex', which the fused models of .* read"):
        predict_paths(ensemble, rows["path"].tolist(), CPU, num_workers=0, metadata=rows.drop(columns="sex"),
                      source="the.csv")


@pytest.mark.slow  # four evaluations and three predictions: the slow tier
def test_eval_and_predict_read_the_metadata_columns(runs: dict[str, Path], meta_data: Path, tmp_path: Path) -> None:
    fused = evaluate_run(make_config([f"ckpt={runs['concat']}", "eval.n_resamples=50", "eval.num_workers=0"], "eval"),
                         tmp_path / "eval")
    image_only = evaluate_run(make_config([f"ckpt={runs['none']}", "eval.n_resamples=50", "eval.num_workers=0"],
                                          "eval"), tmp_path / "eval_none")
    assert fused["n_images"] == image_only["n_images"] == 100
    card = fused["subgroups"]  # the subgroup card: every metadata column and the estimated skin tone
    assert {r["column"] for r in card["rows"]} == {"age_approx", "sex", "anatom_site", "skin tone"}
    assert sum(r["n"] for r in card["rows"] if r["column"] == "sex") == 100
    table = pd.read_csv(tmp_path / "eval" / "subgroups.csv")
    assert len(table) == len(card["rows"]) and (tmp_path / "eval" / "subgroups.png").is_file()
    assert "ita" in pd.read_csv(tmp_path / "eval" / "predictions.csv").columns
    assert {r["column"] for r in image_only["subgroups"]["rows"]} == {"age_approx", "sex", "anatom_site",
                                                                       "skin tone"}  # the run's data.metadata
    other = evaluate_run(make_config([f"ckpt={runs['none']}", "data=csv", f"data.manifest={meta_data / 'manifest.csv'}",
                                      "eval.n_resamples=50", "eval.num_workers=0", "eval.dedup=false"], "eval"),
                         tmp_path / "eval_other")  # data=csv brings data.metadata=[]: the run's columns still count
    assert {r["column"] for r in other["subgroups"]["rows"]} == {"age_approx", "sex", "anatom_site", "skin tone"}
    assert fused["thresholds"]["0.5"]["metrics"]["auc"]["value"] > image_only["thresholds"]["0.5"]["metrics"]["auc"][
        "value"]
    folder = meta_data / "test" / "malignant"
    table = predict_images(make_config([f"ckpt={runs['concat']}", f"input={folder}", "num_workers=0",
                                        f"metadata={meta_data / 'manifest.csv'}"], "predict"), tmp_path / "p")
    assert len(table) == len(list(folder.iterdir())) and table["prob"].between(0, 1).all()
    with pytest.raises(DataError, match=r"also read metadata \(age_approx, sex, anatom_site\); pass metadata=CSV"):
        predict_images(make_config([f"ckpt={runs['concat']}", f"input={folder}", "num_workers=0"], "predict"),
                       tmp_path / "p2")
    partial = tmp_path / "partial.csv"
    pd.read_csv(meta_data / "manifest.csv").assign(path=lambda t: [str(meta_data / p) for p in t["path"]]).head(
        150).to_csv(partial, index=False)
    with pytest.raises(DataError, match=r"partial.csv has no row for .*test_.*\.jpg \(\d+ of \d+ images have none\)"):
        predict_images(make_config([f"ckpt={runs['concat']}", f"input={folder}", "num_workers=0",
                                    f"metadata={partial}"], "predict"), tmp_path / "p3")
    # image-only models ignore metadata
    assert len(predict_images(make_config([f"ckpt={runs['none']}", f"input={folder}", "num_workers=0"], "predict"),
                              tmp_path / "p4")) == len(table)


def test_a_fused_run_resumes_from_its_files(runs: dict[str, Path], meta_data: Path) -> None:
    before = json.loads((runs["concat"] / "metrics.json").read_text())
    again = _train(meta_data, runs["concat"], "model.fusion=concat", f"resume={runs['concat']}")
    assert again["folds"] == before["folds"] and again["oof"] == before["oof"]


def test_stacking_beats_the_image_model_on_metadata_driven_labels(runs: dict[str, Path]) -> None:
    metrics = stack_run(runs["none"], n_resamples=200)
    assert metrics["oof"]["auc"] > metrics["oof_image"]["auc"] + 0.04
    assert metrics["oof_difference"]["difference"]["ci"][0] > 0  # paired, on the same OOF images
    assert metrics["test"]["n_images"] == 100 and metrics["test"]["difference"]["auc_b"] > metrics["test"][
        "difference"]["auc_a"]
    oof = pd.read_csv(runs["none"] / "stack" / "oof_predictions.csv")
    assert list(oof.columns) == ["path", "label", "fold", "prob_image", "prob"]
    assert oof["prob_image"].tolist() == pd.read_csv(runs["none"] / "oof_predictions.csv")["prob"].tolist()
    assert (runs["none"] / "stack" / "test_predictions.csv").is_file()


def test_eval_and_predict_apply_the_stacker_to_other_images(runs: dict[str, Path], meta_data: Path,
                                                           tmp_path: Path) -> None:
    metrics = evaluate_run(make_config([f"ckpt={runs['none']}", "eval.stack=true", "eval.n_resamples=50",
                                        "eval.num_workers=0", "eval.dedup=false", "eval.subgroups=false"], "eval"),
                           tmp_path / "eval")
    fitted = stacker_from_run(runs["none"])  # refitted from the run's files: the same trees every time
    assert metrics["stack"]["columns"] == ["age_approx", "sex", "anatom_site"]
    assert {k: v["threshold"] for k, v in metrics["thresholds"].items()} == fitted.thresholds | {
        "0.5": 0.5}  # operating points chosen on the stacked OOF predictions
    assert metrics["promises"]["sens95"]["oof"]["specificity"] == fitted.oof_at_thresholds["sens95"]["specificity"]
    scored = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    test_set = pd.read_csv(meta_data / "manifest.csv", dtype=str, keep_default_na=False).query("split == 'test'")
    test_set = test_set.assign(path=[str((meta_data / p).resolve()) for p in test_set["path"]]).set_index("path")
    rows = test_set.loc[[str(Path(p).resolve()) for p in scored["path"]]].reset_index()
    expected = fitted.stacker.predict(scored["image_prob"].to_numpy(), rows)
    assert np.allclose(scored["prob"], expected) and not np.allclose(scored["prob"], scored["image_prob"])
    difference = metrics["stack"]["difference"]
    assert difference["auc_b"] == pytest.approx(roc_auc_score(scored["label"], scored["prob"]))
    assert difference["auc_b"] > difference["auc_a"]  # the label depends on the metadata here
    folder = meta_data / "test" / "malignant"
    table = predict_images(make_config([f"ckpt={runs['none']}", f"input={folder}", "num_workers=0", "stack=true",
                                        f"metadata={meta_data / 'manifest.csv'}"], "predict"), tmp_path / "p")
    same = scored.set_index("path").loc[table["path"], "prob"].to_numpy()
    assert np.allclose(table["prob"], same, atol=1e-6)  # predict and eval score an image alike
    assert np.allclose(table["image_prob"], scored.set_index("path").loc[table["path"], "image_prob"], atol=1e-6)
    assert len(test_set) == len(scored)
    with pytest.raises(DataError, match=r"the run's stacked trees also read metadata \(age_approx, sex, anatom_site\)"):
        predict_images(make_config([f"ckpt={runs['none']}", f"input={folder}", "num_workers=0", "stack=true"],
                                   "predict"), tmp_path / "p2")
    no_site = tmp_path / "no_site.csv"
    test_set.reset_index().drop(columns="anatom_site").to_csv(no_site, index=False)
    with pytest.raises(DataError, match=r"metadata=.*no_site.csv has no metadata column 'anatom_site', which the "
                                        r"stacked model reads"):
        predict_images(make_config([f"ckpt={runs['none']}", f"input={folder}", "num_workers=0", "stack=true",
                                    f"metadata={no_site}"], "predict"), tmp_path / "p3")


def test_the_stacked_oof_predictions_are_honest() -> None:
    """Noise in, chance out: each fold's trees never fit the rows they predict (else they would memorise them)."""
    rng = np.random.default_rng(0)
    n = 400
    oof = pd.DataFrame({"label": rng.integers(0, 2, n), "fold": np.arange(n) % 5, "prob": rng.random(n),
                        "age": rng.normal(50, 10, n).round().astype(str), "site": rng.choice(["a", "b", "c"], n)})
    stacker, stacked = fit_stacker(oof, {"age": None, "site": None})
    assert abs(roc_auc_score(oof["label"], stacked) - 0.5) < 0.08
    in_sample = stacker.trees[0].predict_proba(stacker.features(0, oof["prob"].to_numpy(), oof))[:, 1]
    assert roc_auc_score(oof["label"][oof["fold"] != 0], in_sample[oof["fold"] != 0]) > 0.7  # what a leak looks like


def test_stacking_needs_metadata(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as refused:
        stack_main([str(tmp_path)])
    assert refused.value.code == 2 and "holds no finished melanoma-train run" in capsys.readouterr().err


@pytest.mark.slow
def test_a_fused_model_trains_with_the_batched_device_augmentation(meta_data: Path, tmp_path: Path) -> None:
    metrics = _train(meta_data, tmp_path / "run", "model.fusion=concat", "augmentation=dermoscopy",
                     "augmentation.on_device=true", "trainer.epochs=1", "cv.folds=2")
    assert metrics["oof"]["auc"] is not None and len(metrics["folds"]) == 2


def test_fusion_without_metadata_is_refused(meta_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.fusion=concat needs metadata columns: data=csv"):
        train(make_config([f"data.root={meta_data}", *TINY, "model.fusion=concat"]), tmp_path / "run")


@pytest.mark.slow  # two torchrun processes: the slow tier
def test_a_fused_model_trains_under_torchrun(meta_data: Path, tmp_path: Path) -> None:
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    run = tmp_path / "ddp"
    result = subprocess.run([torchrun, "--nproc_per_node=2", "-m", "melanoma.cli.train", "data=csv",
                             f"data.manifest={meta_data / 'manifest.csv'}", *TINY, "trainer.epochs=1", COLUMNS,
                             "model.fusion=concat", f"hydra.run.dir={run}"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1 of 2" in (run / "train.rank1.log").read_text()
    assert len(pd.read_csv(run / "oof_predictions.csv")) == 300
    assert load_checkpoint(run / "fold0" / "best.pt")["fusion"] == "concat"
