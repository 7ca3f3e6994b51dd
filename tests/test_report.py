"""melanoma-report on a real 2 x 2 sweep (lr x batch size), an evaluation and broken inputs."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from pypdf import PdfReader

from melanoma.cli.evaluate import evaluate_run
from melanoma.cli.report import main, write_report
from melanoma.reporting.tables import CV_METRICS

from conftest import TINY, make_config

# title + table + skipped (a page of its own when over 12 lines) + heat map + per run (figures, config) + ROC
# + augmentation [+ activation maps]
FIXED_PAGES = 6


@pytest.fixture(scope="module")
def runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2 x 2 sweep plus, under extra/: a crashed run, a run without AUC, unreadable JSON, evaluations."""
    root = tmp_path_factory.mktemp("report")
    exe = Path(sys.executable).with_name("melanoma-train")
    result = subprocess.run([str(exe), "-m", f"data.root={tiny_data}", *TINY, "trainer.epochs=1", "cv.folds=2",
                             "optimizer.lr=0.001,0.01", "data.batch_size=16,32", f"hydra.sweep.dir={root / 'sweep'}"],
                            cwd=root, capture_output=True, text=True, timeout=600,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})  # tiny models: threads only contend
    assert result.returncode == 0, result.stderr[-2000:]
    extra = root / "extra"
    crashed = shutil.copytree(root / "sweep" / "1", extra / "crashed")
    (crashed / "metrics.json").unlink()
    with (crashed / "train.log").open("a") as log:
        log.write("[2026-01-01 00:00:00,000][melanoma-train][ERROR] - fold 1, epoch 1: the loss is not finite\n")
    legacy = shutil.copytree(root / "sweep" / "2", extra / "legacy")  # an older metrics.json without AUC
    metrics = json.loads((legacy / "metrics.json").read_text())
    for block in (metrics["mean"], metrics["std"], *metrics["folds"]):
        del block["auc"]
    (legacy / "metrics.json").write_text(json.dumps(metrics))
    garbled = shutil.copytree(root / "sweep" / "3", extra / "garbled")
    (garbled / "metrics.json").write_text('{"folds": [')
    cfg = make_config([f"ckpt={root / 'sweep' / '0'}", "eval.n_resamples=50", "eval.num_workers=0"], "eval")
    evaluate_run(cfg, extra / "eval_old")
    # The same evaluation, as melanoma-eval run from `root` with a relative ckpt would record it.
    newer = shutil.copytree(extra / "eval_old", extra / "eval_new")
    metrics = json.loads((newer / "metrics.json").read_text())
    (newer / "metrics.json").write_text(json.dumps(metrics | {"ckpt": "sweep/0/fold1/best.pt"}))
    for name, change in (("eval_train_split", {"split": "train"}), ("eval_one_fold", {"models": ["fold0/best.pt"]}),
                         ("eval_other_data", {"data": {"layout": "folder", "root": "/elsewhere"}}),
                         ("eval_stacked", {"stack": {"columns": ["age_approx"]}})):
        other = shutil.copytree(extra / "eval_old", extra / name)  # newer, yet none is the run's test result
        (other / "metrics.json").write_text(json.dumps(json.loads((other / "metrics.json").read_text()) | change))
    (root / "empty").mkdir()
    return root


@pytest.fixture(scope="module")
def report(runs: Path):
    paths = [runs / "sweep", runs / "extra", runs / "empty", runs / "sweep" / "0"]  # overlapping: one row each
    return write_report([str(p) for p in paths], runs / "out")


def _metrics(runs: Path, label: str) -> dict:
    return json.loads((runs / label / "metrics.json").read_text())


def test_table_rows_and_values_match_the_metrics_files(runs: Path, report) -> None:
    table = pd.read_csv(runs / "out" / "results.csv")
    assert sorted(table["run"]) == ["extra/legacy", "sweep/0", "sweep/1", "sweep/2", "sweep/3"]
    for _, row in table.iterrows():
        metrics = _metrics(runs, row["run"])
        for key in CV_METRICS:
            if key in metrics["mean"]:
                assert row[f"{key}_mean"] == pytest.approx(metrics["mean"][key], rel=1e-9, abs=1e-12)
                assert row[f"{key}_std"] == pytest.approx(metrics["std"][key], rel=1e-9, abs=1e-12)
            else:
                assert math.isnan(row[f"{key}_mean"])
        assert row["best_epochs"] == ", ".join(str(f["best_epoch"]) for f in metrics["folds"])
        assert row["model"] == "test_efficientnet" and row["folds"] == 2
    grid = table[table["run"].str.startswith("sweep/")]
    assert set(zip(grid["lr"], grid["batch_size"], strict=True)) == {(0.001, 16), (0.001, 32), (0.01, 16),
                                                                     (0.01, 32)}
    assert (table.loc[table["run"] == "sweep/0", ["lr", "batch_size"]].to_numpy() == [[0.001, 16]]).all()


def test_sorted_by_auc_with_the_best_marked(runs: Path, report) -> None:
    table = pd.read_csv(runs / "out" / "results.csv")
    aucs = table["auc_mean"].tolist()
    assert aucs[:4] == sorted(aucs[:4], reverse=True) and math.isnan(aucs[4])  # no AUC: last
    assert table["best"].tolist() == [True, False, False, False, False]
    markdown = (runs / "out" / "results.md").read_text()
    best_line = next(line for line in markdown.splitlines() if line.startswith("| ★"))
    assert f"| {table.loc[0, 'run']} |" in best_line


def test_evaluation_joins_its_run(runs: Path, report) -> None:
    table = pd.read_csv(runs / "out" / "results.csv").set_index("run")
    evaluation = json.loads((runs / "extra" / "eval_old" / "metrics.json").read_text())
    auc = evaluation["thresholds"][evaluation["operating_point"]]["metrics"]["auc"]
    row = table.loc["sweep/0"]
    assert row["eval_dir"] == str(runs / "extra" / "eval_new")  # the newer of the two, found by a relative ckpt
    assert row["test_auc"] == pytest.approx(auc["value"]) and row["test_auc_low"] == pytest.approx(auc["ci"][0])
    assert table.drop(index="sweep/0")["test_auc"].isna().all()
    assert "test AUC (95% CI)" in (runs / "out" / "results.md").read_text()


def test_skipped_inputs_are_listed_with_the_reason(runs: Path, report) -> None:
    reasons = {Path(s.path).name: s.reason for s in report.skipped}
    assert "crashed" in reasons["crashed"] and "the loss is not finite" in reasons["crashed"]
    assert "cannot be read" in reasons["garbled"]
    assert reasons["empty"].startswith("no runs found")
    assert reasons["legacy"] == "metrics.json has no auc (shown as n/a)"
    assert reasons["eval_old"].startswith("evaluation superseded")
    assert "split=train" in reasons["eval_train_split"] and "1 of the run's 2 fold models" in reasons["eval_one_fold"]
    assert "other data (/elsewhere" in reasons["eval_other_data"]
    assert "it scored the stacked model (eval.stack=true)" in reasons["eval_stacked"]
    assert reasons["activation maps"] == ("no run has explain/activation_maps.png: "
                                          f"run melanoma-explain ckpt={report.runs[0].dir}")
    assert "heat map" not in reasons  # 2 learning rates x 2 batch sizes
    markdown = (runs / "out" / "results.md").read_text()
    assert all(reason in markdown for reason in reasons.values())


def test_pdf_has_one_page_per_section_and_two_per_run(runs: Path, report) -> None:
    pages = len(PdfReader(runs / "out" / "report.pdf").pages)
    assert pages == FIXED_PAGES + 1 + 2 * 5  # the subgroup card of the evaluated run, five runs; no activation maps
    assert sorted(p.name for p in (runs / "out").iterdir()) == ["MODEL_CARD.md", "report.pdf", "results.csv",
                                                                 "results.md"]
    card = (runs / "out" / "MODEL_CARD.md").read_text()  # the best run's, with its test evaluation
    best = report.runs[0]
    assert f"# Model card: {best.metrics['model']} ({best.dir.name})" in card
    assert f"AUC {best.metrics['mean']['auc']:.3f} ± {best.metrics['std']['auc']:.3f}" in card
    ran = best.metrics["runtime"]
    assert f"it trained in {ran['precision']} on the " in card and f"trainer.precision={ran['precision']}" in card
    if best.evaluation is not None:
        assert f"{best.evaluation.metrics['n_images']} images" in card


def test_cli_defaults_to_the_sweep_and_embeds_activation_maps(runs: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = runs / "sweep"
    for job in range(4):  # where melanoma-explain ckpt=RUN puts its figure
        (sweep / str(job) / "explain").mkdir()
        Image.new("RGB", (300, 200), "orange").save(sweep / str(job) / "explain" / "activation_maps.png")
        pd.DataFrame({"path": ["a.jpg", "b.jpg"], "cam_lesion": [0.6, 0.4], "lesion_area": [0.3, 0.3],
                      "cam_corners": [0.1, 0.3], "corner_area": [0.215, 0.215], "peak": ["lesion", "corner"]}
                     ).to_csv(sweep / str(job) / "explain" / "explain.csv", index=False)
        (sweep / str(job) / "explain" / "occlusion.json").write_text(json.dumps(
            {"n_images": 20, "auc": {"none": 0.8, "corners": 0.75, "centre": 0.55},
             "difference": {r: {"difference": {"value": d, "ci": [d - 0.05, d + 0.05]}}
                            for r, d in (("corners", -0.05), ("centre", -0.25))}}))
    main([str(sweep), "--figures", str(runs / "assets")])
    printed = capsys.readouterr().out
    assert "| ★ |" in printed and "Skipped" in printed and str(sweep / "report.pdf") in printed
    reader = PdfReader(sweep / "report.pdf")
    # the few skipped items sit on the title page (no near-empty page); the activation maps add one
    assert len(reader.pages) == FIXED_PAGES - 1 + 1 + 2 * 4
    assert "skipped or incomplete" in reader.pages[0].extract_text()
    text = " ".join(" ".join(page.extract_text().split()) for page in reader.pages)
    assert "Grad-CAM mass on the lesion 0.50 (its area: 0.30), in the corners 0.20" in text  # what explain measured
    assert "Occlusion test on 20 images: AUC 0.800 as is; corners hidden 0.750 (-0.050 [-0.100, +0.000])" in text
    assert len(pd.read_csv(sweep / "results.csv")) == 4
    for name in ("sample_augmented", "loss_curve", "roc_curve", "confusion_matrix", "activation_map"):
        Image.open(runs / "assets" / f"{name}.png").verify()


def test_a_run_directory_alone_redraws_every_figure_and_the_report(runs: Path, tmp_path: Path) -> None:
    alone = shutil.copytree(runs / "sweep" / "1", tmp_path / "alone")
    shutil.rmtree(alone / ".hydra")  # no Hydra files, no checkpoints, no figures: only the run's records
    for path in [*alone.rglob("*.pt"), *alone.rglob("*.png")]:
        path.unlink()
    report = write_report([str(alone)], tmp_path / "out", figures=tmp_path / "figures")
    assert {s.path for s in report.skipped} == {"heat map", "activation maps", "subgroup card",
                                                str(tmp_path / "figures" / "activation_map.png")}
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    assert (table.loc[0, "lr"], table.loc[0, "batch_size"]) == (0.01, 16)  # job 1 of the sweep, from config.yaml
    for name in ("sample_augmented", "loss_curve", "roc_curve", "confusion_matrix"):
        Image.open(tmp_path / "figures" / f"{name}.png").verify()
    reader = PdfReader(tmp_path / "out" / "report.pdf")
    assert len(reader.pages) == FIXED_PAGES - 2 + 2  # no heat map, skipped on the title page; one run
    assert "config.yaml" in reader.pages[-1].extract_text() and "lr: 0.01" in reader.pages[-1].extract_text()


def test_a_run_from_before_config_yaml_reads_hydras_copy_as_written(runs: Path, tmp_path: Path) -> None:
    from melanoma.reporting.runs import collect

    old = shutil.copytree(runs / "sweep" / "2", tmp_path / "old")
    (old / "config.yaml").unlink()
    (found,), _ = collect([old], eval_dirs=())
    assert found.config["optimizer"]["lr"] == 0.001 and found.config["data"]["batch_size"] == 32
    assert found.config["data"]["cache_dir"] is None  # ${oc.env:...} never resolved: unknown, not guessed here
    assert "optimizer.lr=0.001" in found.overrides


def test_no_runs_is_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("melanoma-report: error: no finished training run")
    assert "missing: does not exist" in err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit):  # several PATHs need --out
        main([str(tmp_path), str(tmp_path)])
    assert "--out" in capsys.readouterr().err


def test_figure_titles_name_the_run_an_evaluation_scored(tmp_path: Path) -> None:
    from melanoma.plots import _figure_label

    for folder, metrics, label in [
        ("run7", {"model": "m"}, "m, trained in run7"),
        ("eval", {"model": "m", "ckpt": "/x/run7"}, "m, run run7, evaluated in eval"),
        ("eval2", {"model": "m", "ckpt": "/x/run7/fold1/best.pt"}, "m, run run7/fold1/best.pt, evaluated in eval2"),
        ("eval3", {"model": "m", "ckpt": "fold1/best.pt"}, "m, run fold1/best.pt, evaluated in eval3"),  # relative
        ("eval4", {"model": "m", "ckpt": "."}, "m, run ., evaluated in eval4"),
    ]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "metrics.json").write_text(json.dumps(metrics))
        verb = "evaluated" if "ckpt" in metrics else "trained"
        assert _figure_label(tmp_path / folder, verb) == label


def test_a_crashed_runs_last_error_is_shortened_at_a_word(tmp_path: Path) -> None:
    from melanoma.reporting.runs import last_error

    log = tmp_path / "train.log"
    log.write_text("[2026-12-04 04:00:00,000][melanoma][INFO] - fold 0\n"
                   "[2026-12-04 04:00:01,000][melanoma][ERROR] - " + "missing file data.on_bad_file " * 20 + "\n")
    error = last_error(log)
    assert error.startswith("missing file data.on_bad_file") and error.endswith(" ...") and len(error) <= 300
    assert error.removesuffix(" ...").split()[-1] in {"missing", "file", "data.on_bad_file"}  # cut between words
    log.write_text("[x][melanoma][INFO] - fine\n")
    assert last_error(log) is None


def test_confusion_matrices_are_drawn_at_the_runs_operating_point(runs: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The matrices sit beside ROC and calibration plots that mark the operating point, and beside the test
    split's matrix at it: they use it too, not 0.5 (where a calibrated model may call nothing malignant)."""
    import melanoma.plots as plots
    import melanoma.reporting.figures as figures
    from melanoma.reporting.model_card import find_run

    drawn = []

    def record(labels, probs, path, threshold, title) -> None:
        drawn.append((Path(path).parent.name, threshold, title))

    monkeypatch.setattr(plots, "plot_confusion_matrix", record)
    monkeypatch.setattr(figures, "plot_confusion_matrix", record)
    alone = shutil.copytree(runs / "sweep" / "1", tmp_path / "alone")
    metrics = _metrics(runs, "sweep/1")
    point, threshold = metrics["operating_point"], metrics["thresholds"][metrics["operating_point"]]
    assert point == "sens95" and threshold != 0.5
    plots.plot_run(alone)
    assert [d[:2] for d in drawn] == [("alone", threshold), ("fold0", threshold), ("fold1", threshold)]
    assert all(f"{point} threshold {threshold:.3g}" in title for _, _, title in drawn)
    drawn.clear()
    plots.plot_run(alone, threshold=0.5)  # a caller's own threshold stands
    assert {d[1] for d in drawn} == {0.5} and "sens95" not in drawn[0][2]
    drawn.clear()
    figures.write_figures(find_run(alone), tmp_path / "figures")  # the run has no evaluation: out of fold
    assert drawn[0][1] == threshold and drawn[0][2].startswith(f"Out-of-fold predictions, {point} threshold")


def test_a_run_page_title_keeps_its_best_epochs_on_one_line(runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import melanoma.reporting.pdf as pdf
    from melanoma.reporting.model_card import find_run

    titles = []
    monkeypatch.setattr(pdf, "TITLE_CHARS", 40)  # narrow enough to wrap inside the list
    real_page = pdf._page
    monkeypatch.setattr(pdf, "_page", lambda title: titles.append(title) or real_page(title))
    run = find_run(runs / "sweep" / "1")
    row = pd.Series({"model": "m", "lr": 0.01, "batch_size": 16, "auc_mean": 0.8, "auc_std": 0.01,
                     "best_epochs": "3, 3, 2"})
    pdf._run_page(run, row)
    wrapped = textwrap.wrap(titles[0], 40)
    assert any("3,\u00a03,\u00a02" in line for line in wrapped)
