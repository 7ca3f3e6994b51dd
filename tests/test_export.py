"""melanoma-export: the ONNX and TorchScript files reproduce melanoma-eval, say how to feed them, carry a model card."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from melanoma.cli.evaluate import evaluate_run
from melanoma.cli.export import export_run
from melanoma.cli.train import train
from melanoma.errors import ConfigError, ExportError
from melanoma.export import _views, export_ensemble, image_batch, run_exported
from melanoma.inference import load_ensemble, predict_paths, tta_views
from melanoma.runtime import resolve_runtime
from melanoma.synthetic import generate_dataset
from melanoma.transforms import eval_pixels, eval_transform

from conftest import TINY, make_config, noise_image

CPU = resolve_runtime("cpu", "fp32", channels_last=False)
pytest.importorskip("onnxruntime")  # the export extra: installed by scripts/setup.sh dev and in CI


@pytest.fixture(scope="module")
def run_dir(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-fold tiny run, and its melanoma-eval of the test split (with flip TTA) under it."""
    out = tmp_path_factory.mktemp("exported")
    train(make_config([f"data.root={tiny_data}", *TINY, "trainer.epochs=1"]), out)
    for tta in ("none", "flip", "d4"):
        evaluate_run(make_config([f"ckpt={out}", "eval.n_resamples=50", "eval.num_workers=0", f"eval.tta={tta}",
                                  "eval.dedup=false", "eval.subgroups=false"], "eval"), out / f"eval_{tta}")
    return out


def _export(run_dir: Path, out: Path, *extra: str) -> dict:
    return export_run(make_config([f"ckpt={run_dir}", *extra], "export"), out)


@pytest.mark.parametrize(("fmt", "tta"), [("onnx", "none"), pytest.param("onnx", "flip", marks=pytest.mark.slow),
                                          ("torchscript", "none"), ("torchscript", "flip"), ("torchscript", "d4")])
def test_the_export_gives_melanoma_evals_probabilities(run_dir: Path, tmp_path: Path, fmt: str, tta: str) -> None:
    description = _export(run_dir, tmp_path, f"format={fmt}", f"tta={tta}", "n_images=4")
    file = tmp_path / description["file"]
    assert file.is_file() and description["format"] == fmt and description["tta"] == tta
    assert description["check"]["max_abs_diff"] <= 1e-4 and description["check"]["n_images"] == 4
    metrics = json.loads((run_dir / "metrics.json").read_text())  # flips have thresholds of their own, d4 not
    chosen = metrics["thresholds_by_tta"]["flip"] if tta == "flip" else metrics["thresholds"]
    assert {k: v["threshold"] for k, v in description["thresholds"].items()} == chosen
    assert description["thresholds_tta"] == ("flip" if tta == "flip" else "none")
    # against melanoma-eval's own predictions.csv, on images the export check did not pick
    scored = pd.read_csv(run_dir / f"eval_{tta}" / "predictions.csv")
    pre = load_ensemble(run_dir, CPU).preprocess
    for batch in (scored.head(7), scored.tail(1)):  # a batch of 7, and of 1: the batch axis is dynamic
        probs = run_exported(file, fmt, image_batch(batch["path"].tolist(), pre))
        assert probs.shape == (len(batch),) and probs.dtype == np.float32
        assert np.abs(probs - batch["prob"].to_numpy()).max() <= 1e-4


def test_model_json_and_the_card_name_the_runs_numbers(run_dir: Path, tmp_path: Path) -> None:
    (run_dir / "explain").mkdir(exist_ok=True)  # what melanoma-explain's occlusion test found: a corner shortcut
    (run_dir / "explain" / "occlusion.json").write_text(json.dumps(
        {"n_images": 20, "corner_area": 0.215, "auc": {"none": 0.8, "corners": 0.7, "centre": 0.55},
         "difference": {r: {"difference": {"value": d, "ci": [d - 0.05, d + 0.04]}}
                        for r, d in (("corners", -0.1), ("centre", -0.25))}}))
    description = _export(run_dir, tmp_path, "format=torchscript", "n_images=2")
    assert json.loads((tmp_path / "model.json").read_text()) == description
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert description["inputs"][0] | {"preprocessing": None} == {
        "name": "images", "dtype": "uint8", "layout": "NCHW", "channels": "RGB", "shape": ["batch", 3, 32, 32],
        "preprocessing": None}
    resize = json.loads((run_dir / "preprocess.json").read_text())["resize"]
    assert f"resize the short side to {resize} px" in description["inputs"][0]["preprocessing"]
    assert description["classes"] == ["benign", "malignant"] and description["n_models"] == 3
    assert {k: v["threshold"] for k, v in description["thresholds"].items()} == metrics["thresholds"]
    assert description["recommended_threshold"] == metrics["operating_point"] == "sens95"
    assert description["thresholds"]["sens95"]["oof_sensitivity"] == metrics["oof_at_thresholds"]["sens95"][
        "sensitivity"]
    assert description["temperatures"] == [f["temperature"] for f in metrics["folds"]]
    assert {"melanoma", "torch", "timm"} <= set(description["versions"])

    card = (tmp_path / "MODEL_CARD.md").read_text()
    for section in ("Model details", "Intended use", "Factors", "Metrics", "Evaluation data", "Training data",
                    "Quantitative analyses", "Ethical considerations", "Caveats and recommendations",
                    "How to reproduce"):
        assert f"## {section}" in card
    assert "Not for diagnosis" in card
    assert f"AUC {metrics['mean']['auc']:.3f} ± {metrics['std']['auc']:.3f}" in card
    assert f"pooled OOF AUC {metrics['oof']['auc']:.3f}" in card
    assert f"{metrics['n_images']} training images, {metrics['n_positive']} malignant" in card
    at = metrics["oof_at_thresholds"]["sens95"]
    assert (f"| sens95 (recommended) | {metrics['thresholds']['sens95']:.4g} | {at['sensitivity']:.3f} | "
            f"{at['specificity']:.3f} |") in card
    # the newest test evaluation under the run is the card's (eval_d4, written last), and its TTA is named
    evaluation = json.loads((run_dir / "eval_d4" / "metrics.json").read_text())
    assert "the test numbers below are melanoma-eval's with TTA d4, not none" in card
    assert f"melanoma-eval ckpt={run_dir} eval.tta=d4 hydra.run.dir={run_dir / 'eval_d4'}\n" in card  # reproduced
    auc = evaluation["thresholds"]["sens95"]["metrics"]["auc"]
    assert f"Test AUC {auc['value']:.3f} [{auc['ci'][0]:.3f}, {auc['ci'][1]:.3f}]" in card
    sens = evaluation["thresholds"]["sens95"]["metrics"]["sensitivity"]
    assert f"{sens['value']:.3f} [{sens['ci'][0]:.3f}, {sens['ci'][1]:.3f}]" in card
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert provenance["versions"]["torch"] == importlib.metadata.version("torch")
    assert (provenance["commit"] or "not recorded") in card
    assert "not started by melanoma-train (no .hydra/overrides.yaml)" in card  # train() called from Python
    assert f"melanoma-eval ckpt={run_dir}" in card
    assert ("- Hiding the image corners (22% of the image: vignette, rulers, borders) costs 0.100 AUC (CI -0.150 to "
            "-0.060): the model reads the lesion's surroundings, a possible shortcut (Occlusion test on 20 images: "
            "AUC 0.800 as is; corners hidden 0.700") in card


@pytest.mark.slow  # a fused training and two exports: the slow tier
def test_a_fused_run_exports_with_its_metadata_input(tmp_path: Path) -> None:
    data = generate_dataset(tmp_path / "set", n_train=60, n_test=20, size=40, seed=1, metadata=True)
    run = tmp_path / "run"
    train(make_config(["data=csv", f"data.manifest={data / 'manifest.csv'}", *TINY, "trainer.epochs=1", "cv.folds=2",
                       "data.metadata=[age_approx,sex,anatom_site]", "model.fusion=concat", "audit.enabled=false"]),
          run)
    for fmt in ("onnx", "torchscript"):
        description = _export(run, tmp_path / fmt, f"format={fmt}", "n_images=5")
        assert [i["name"] for i in description["inputs"]] == ["images", "metadata"]
        meta = description["inputs"][1]
        assert meta["columns"] == ["age_approx", "sex", "anatom_site"] and len(meta["encoders"]) == 2
        assert meta["shape"][1] == sum(e.width for e in load_ensemble(run, CPU).encoders)
        assert description["check"]["max_abs_diff"] <= 1e-4 and description["check"]["max_abs_diff_batch1"] <= 1e-4


def test_an_export_that_differs_from_eval_is_not_written(run_dir: Path, tmp_path: Path) -> None:
    ensemble = load_ensemble(run_dir, CPU)
    paths = pd.read_csv(run_dir / "eval_none" / "predictions.csv")["path"].head(3).tolist()
    reference = predict_paths(ensemble, paths, CPU, num_workers=0).mean(0)
    with pytest.raises(ExportError, match=r"up to 0.01 away from melanoma-eval's on 3 images .*nothing was written"):
        export_ensemble(ensemble, tmp_path / "model.pt", "torchscript", image_batch(paths, ensemble.preprocess),
                        reference + 0.01)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


def test_a_missing_onnx_package_names_the_extra(run_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ImportError
    with pytest.raises(ConfigError, match=r"format=onnx needs the onnxscript package: pip install 'melanoma\[export"):
        _export(run_dir, tmp_path, "n_images=2")
    assert list(tmp_path.iterdir()) == []


def test_the_graphs_views_and_pixels_are_evals() -> None:
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    for tta in ("none", "flip", "d4"):  # rot90 is no ONNX operator: flips and transposes give the same views
        assert all(torch.equal(a, b) for a, b in zip(_views(x, tta), tta_views(x, tta), strict=True))
    pre = {"image_size": 24, "resize": 27, "crop_pct": 0.875, "interpolation": "bicubic", "mean": [0.4, 0.5, 0.6],
           "std": [0.2, 0.25, 0.3]}
    pixels = eval_pixels(pre)(noise_image())
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 24, 24)
    mean, std = torch.tensor(pre["mean"]).view(3, 1, 1), torch.tensor(pre["std"]).view(3, 1, 1)
    assert torch.allclose((pixels.float() / 255 - mean) / std, eval_transform(pre)(noise_image()), atol=1e-6)


def test_cli_mistakes_are_one_line_and_leave_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    from melanoma.cli import export

    monkeypatch.chdir(tmp_path)
    for args, message in [([f"ckpt={tmp_path / 'typo'}"], "does not exist"),
                          ([f"ckpt={tmp_path}", "format=tflite"], "format='tflite' must be one of onnx, torchscript"),
                          ([f"ckpt={tmp_path}", "n_images=1"], "n_images=1 must be an integer >= 2")]:
        monkeypatch.setattr(sys, "argv", ["melanoma-export", *args])
        with pytest.raises(SystemExit) as refused:
            export.main()
        err = capsys.readouterr().err
        assert refused.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_the_card_of_a_flip_evaluation_shows_the_flip_thresholds(run_dir: Path) -> None:
    """An evaluation with eval.tta=flip scored at the thresholds chosen on flipped OOF predictions: the card's
    table shows those, beside that evaluation's test values; one without TTA shows the plain set."""
    from dataclasses import replace

    from melanoma.reporting.model_card import find_run, model_card
    from melanoma.reporting.runs import Evaluation

    metrics = json.loads((run_dir / "metrics.json").read_text())
    run = find_run(run_dir)
    for tta, chosen in (("flip", metrics["thresholds_by_tta"]["flip"]), ("none", metrics["thresholds"])):
        evaluation = json.loads((run_dir / f"eval_{tta}" / "metrics.json").read_text())
        assert evaluation["thresholds_tta"] == tta and evaluation["threshold"] == pytest.approx(chosen["sens95"])
        card = model_card(replace(run, evaluation=Evaluation(run_dir / f"eval_{tta}", evaluation)))
        row = next(line for line in card.splitlines() if line.startswith("| sens95 (recommended) |"))
        assert row.split(" | ")[1] == f"{chosen['sens95']:.4g}"
        assert ("with TTA `flip`, as the evaluation scored" in card) == (tta == "flip")
    assert metrics["thresholds_by_tta"]["flip"]["sens95"] != metrics["thresholds"]["sens95"]


def test_the_cards_recipe_names_the_vignette_and_counts_epochs(run_dir: Path) -> None:
    from dataclasses import replace

    from melanoma.reporting.model_card import find_run, model_card

    run = find_run(run_dir)
    recipe = next(line for line in model_card(run).splitlines() if line.startswith("- Recipe:"))
    assert "vignette" not in recipe  # the tiny run draws none
    config = run.config | {"augmentation": run.config["augmentation"] | {"vignette": 0.5, "vignette_radius": [1, 1.35]},
                           "trainer": run.config["trainer"] | {"epochs": 1}}
    recipe = next(line for line in model_card(replace(run, config=config)).splitlines() if line.startswith("- Recipe:"))
    assert recipe.startswith("- Recipe: 1 epoch, batch") and recipe.endswith(", vignette 0.5 (radius 1-1.35)).")


def test_the_cards_reproduce_step_replays_the_evaluations_own_command_line(run_dir: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from melanoma.reporting.model_card import find_run, model_card
    from melanoma.reporting.runs import Evaluation

    evaluated = shutil.copytree(run_dir / "eval_flip", tmp_path / "eval_cli")
    (evaluated / ".hydra").mkdir(exist_ok=True)
    (evaluated / ".hydra" / "overrides.yaml").write_text(
        "- ckpt=somewhere\n- eval.tta=flip\n- eval.threshold=youden\n- hydra.run.dir=elsewhere\n")
    evaluation = json.loads((evaluated / "metrics.json").read_text())
    card = model_card(replace(find_run(run_dir), evaluation=Evaluation(evaluated, evaluation)))
    assert f"melanoma-eval ckpt={run_dir} eval.tta=flip eval.threshold=youden hydra.run.dir={evaluated}\n" in card
