"""hparams=optuna: the search composes and is checked like any sweep, a diverging trial fails without stopping it,
every trial is its own tracked run, and melanoma-report ranks the trials with the optimisation history."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image
from pypdf import PdfReader

from melanoma.cli import check_overrides
from melanoma.reporting.search import find_search
from melanoma.reporting.tables import build_report, to_markdown

from conftest import make_config

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")  # the optuna extra: scripts/setup.sh dev installs it


def test_the_preset_is_a_seeded_tpe_search_over_the_recipe() -> None:
    from hydra import compose, initialize_config_module

    with initialize_config_module("melanoma.configs", version_base="1.3"):
        cfg = compose("train", overrides=["hparams=optuna", "seed=7"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 7
    assert sweeper.max_failure_rate == 1.0 and sweeper.n_trials == 20
    assert set(sweeper.params) == {"optimizer.lr", "optimizer.weight_decay", "data.batch_size",
                                   "scheduler.warmup_epochs"}
    assert str(cfg.hydra.mode).endswith("MULTIRUN")


def test_search_values_are_checked_without_dash_m(capsys: pytest.CaptureFixture) -> None:
    check_overrides("melanoma-train", "train", ["hparams=optuna", "optimizer.lr=tag(log, interval(1e-5, 1e-2))",
                                                "data.batch_size=choice(16,32)"])  # the preset sweeps: no -m needed
    check_overrides("melanoma-train", "train", ["hparams=optuna", "data.batch_size=interval(16, 64)"])  # int ends
    check_overrides("melanoma-train", "train", ["hparams=seed_grid", "optimizer.lr=0.1,0.01"])
    for argv, message in [(["hparams=optuna", "data.batch_size=choice(16,abc)"],
                           "data.batch_size='abc' must be an integer >= 1"),
                          (["hparams=optuna", "optimzer.lr=interval(1e-5, 1e-2)"], "optimzer"),
                          (["hparams=optuna", "optimizer.lr=interval(-1, 1e-2)"], "optimizer.lr=-1 must be a number"),
                          (["hparams=optuna", "data.batch_size=interval(0, 64)"], "data.batch_size=0 must be")]:
        with pytest.raises(SystemExit) as refused:
            check_overrides("melanoma-train", "train", argv)
        err = capsys.readouterr().err
        assert refused.value.code == 2 and message in err, err


def _trial(sweep: Path, job: int, auc: float | None) -> None:
    d = sweep / str(job)
    d.mkdir(parents=True)
    if auc is None:
        (d / "train.log").write_text("[2026-01-01][melanoma-train][ERROR] - fold 0, epoch 1: training diverged\n")
        return
    (d / "metrics.json").write_text(json.dumps({"model": "m", "folds": [{"fold": 0, "auc": auc}],
                                                "mean": {"auc": auc}, "std": {"auc": 0.0}}))
    (d / "config.yaml").write_text(yaml.safe_dump({"trainer": {"monitor": "auc"}, "optimizer": {"lr": 0.001 * job}}))


def test_a_sweep_folder_reads_back_as_a_search(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for job, auc in enumerate([0.61, None, 0.72, 0.65]):
        _trial(sweep, job, auc)
    assert find_search([sweep]) is None  # not a search without the sweeper's results
    (sweep / "optimization_results.yaml").write_text(yaml.safe_dump({"name": "optuna", "best_params": {
        "optimizer.lr": 0.002}, "best_value": 0.72}))
    search = find_search([sweep])
    assert search.trials["trial"].tolist() == [0, 1, 2, 3]
    assert search.trials["state"].tolist() == ["complete", "failed", "complete", "complete"]
    assert search.trials["value"].tolist()[2] == 0.72 and search.best_params == {"optimizer.lr": 0.002}
    assert search.trials["reason"][1] == "fold 0, epoch 1: training diverged"
    markdown = to_markdown(build_report([sweep]))
    assert "4 trials, 3 complete, 1 failed; best value 0.7200 with optimizer.lr=0.002" in markdown
    assert "- trial 1 failed: fold 0, epoch 1: training diverged" in markdown
    assert make_config(["hparams=optuna"]).optimizer.lr  # the preset leaves the base config intact


def test_the_objective_is_higher_is_better_for_every_monitor() -> None:
    from melanoma.metrics import objective

    metrics = {"mean": {"auc": 0.8, "f1": None}, "folds": [{"loss": 0.5}, {"loss": 0.7}, {"loss": None}]}
    assert objective(metrics, "auc") == 0.8 and objective(metrics, "f1") is None
    assert objective(metrics, "loss") == pytest.approx(-0.6)  # Optuna maximises: minus the mean loss


@pytest.mark.slow  # three trainings and a report in subprocesses: the slow tier
def test_a_three_trial_search_records_a_diverging_trial_as_failed(tmp_path: Path) -> None:
    """Optuna through Hydra's joblib launcher: each trial is its own MLflow run in one fresh SQLite store."""
    pytest.importorskip("optuna")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    exe = Path(sys.executable).with_name("melanoma-train")
    args = [str(exe), "hparams=optuna", "hydra.sweeper.n_trials=3", "seed=42", "data=synthetic",
            f"data.root={tmp_path / 'syn'}", "data.synthetic.n_train=60", "data.synthetic.n_test=10",
            "data.synthetic.size=40", "model.name=test_efficientnet", "model.pretrained=false", "data.image_size=32",
            "data.num_workers=0", "trainer.epochs=1", "cv.folds=2", "optimizer.lr=choice(0.001,1000000.0)",
            "logger=mlflow", "hydra.sweep.dir=sweep",
            "hydra/launcher=parallel", "hydra.sweeper.n_jobs=3"]  # 3 trials at once: a fresh store, opened by 3 jobs
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    search = find_search([tmp_path / "sweep"])
    states = search.trials.set_index("trial")["state"].to_dict()
    assert len(states) == 3 and set(states.values()) == {"complete", "failed"}, states
    assert all("lower optimizer.lr (now 1e+06)" in r for r in search.trials.loc[search.trials["state"] == "failed",
                                                                                 "reason"])
    assert search.best_params["optimizer.lr"] == 0.001
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("melanoma").experiment_id])
    assert len(runs) == 3 and {r.data.tags["sweep"] for r in runs} == {str((tmp_path / "sweep").resolve())}
    by_job = {int(r.data.tags["job"]): r.info.status for r in runs}  # each trial its own run, failed ones FAILED
    assert by_job == {job: "FINISHED" if state == "complete" else "FAILED" for job, state in states.items()}

    report = subprocess.run([str(exe.with_name("melanoma-report")), "sweep"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    Image.open(tmp_path / "sweep" / "optimization_history.png").verify()
    text = "".join(page.extract_text() for page in PdfReader(tmp_path / "sweep" / "report.pdf").pages)
    assert "Optuna search: 3 trials" in text
    assert "★" in (tmp_path / "sweep" / "results.md").read_text()  # the trials ranked, the best marked
