"""Experiment tracking (logger=): what each offline backend recorded, resume into the same run, failures that warn."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from melanoma.checkpoint import load_checkpoint
from melanoma.cli.train import train
from melanoma.errors import TrainingInterrupted
from melanoma.provenance import git_commit
from melanoma.tracking import Trackers, final_numbers, flatten

from conftest import TINY, make_config

ARGS = [*TINY, "trainer.epochs=2", "cv.folds=2", "audit.enabled=false"]


def _mlflow(tmp_path: Path) -> list[str]:
    return [f"logger.mlflow.tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}",
            f"logger.mlflow.artifact_location={tmp_path / 'artifacts'}"]


def _histories(run: Path) -> dict[int, pd.DataFrame]:
    return {k: pd.read_csv(run / f"fold{k}" / "history.csv") for k in (0, 1)}


def test_flatten_and_the_final_numbers() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None, "f": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": None,
                                                                                 "f": {}}
    metrics = {"mean": {"auc": 0.8, "f1": None}, "std": {"auc": 0.1}, "oof": {"auc": 0.75, "n": 40},
               "thresholds": {"sens95": 0.2},
               "oof_at_thresholds": {"sens95": {"sensitivity": 0.95, "specificity": 0.3}},
               "thresholds_by_tta": {"flip": {"sens95": 0.25}},
               "oof_at_thresholds_by_tta": {"flip": {"sens95": {"sensitivity": 0.96, "specificity": 0.28}}},
               "folds": [{"fold": 0, "auc": 0.7, "loss": 0.5, "best_epoch": 2, "temperature": 1.5}]}
    assert final_numbers(metrics) == {"cv/auc_mean": 0.8, "cv/auc_std": 0.1, "oof/auc": 0.75, "oof/n": 40.0,
                                      "oof_sens95/sensitivity": 0.95, "oof_sens95/specificity": 0.3,
                                      "threshold/sens95": 0.2, "threshold_flip/sens95": 0.25,
                                      "oof_flip_sens95/sensitivity": 0.96, "oof_flip_sens95/specificity": 0.28,
                                      "fold0/best_auc": 0.7, "fold0/best_loss": 0.5,
                                      "fold0/best_epoch": 2.0, "fold0/temperature": 1.5}


@pytest.fixture(scope="module")
def tracked_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny run tracked by csv, tensorboard and mlflow at once (logger=[csv,tensorboard,mlflow])."""
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    out = tmp_path_factory.mktemp("tracked")
    train(make_config([f"data.root={tiny_data}", *ARGS, "logger=[csv,tensorboard,mlflow]", *_mlflow(out)]),
          out / "run")
    return out


def test_mlflow_holds_the_folds_metrics_params_artifacts_and_tags(tracked_run: Path) -> None:
    from mlflow.tracking import MlflowClient

    run_dir = tracked_run / "run"
    client = MlflowClient(tracking_uri=f"sqlite:///{tracked_run / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("melanoma").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id == json.loads((run_dir / "tracking.json").read_text())[
        "mlflow"]
    for k, history in _histories(run_dir).items():
        for column in ("train_loss", "val_loss", "val_auc", "lr"):
            logged = client.get_metric_history(run.info.run_id, f"fold{k}/{column}")
            assert [m.step for m in logged] == history["epoch"].tolist()
            assert [m.value for m in logged] == pytest.approx(history[column].tolist())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert run.data.metrics["cv/auc_mean"] == pytest.approx(metrics["mean"]["auc"])
    assert run.data.metrics["oof/auc"] == pytest.approx(metrics["oof"]["auc"])
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert run.data.params["optimizer.lr"] == str(config["optimizer"]["lr"])
    assert run.data.params["model.name"] == "test_efficientnet" and "logger.mlflow.tracking_uri" not in run.data.params
    assert run.data.tags["model"] == "test_efficientnet" and run.data.tags["run_dir"] == str(run_dir.resolve())
    assert run.data.tags.get("commit") == git_commit()[0]  # None (no tag) outside a git checkout
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "oof_predictions.csv", "config.yaml", "roc_curve.png", "loss_curves.png"} <= files
    assert (tracked_run / "artifacts").is_dir()  # the configured artifact folder, not ./mlruns


def test_tensorboard_events_hold_the_curves_config_and_figures(tracked_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tracked_run / "run"
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    for k, history in _histories(run_dir).items():
        scalars = events.Scalars(f"fold{k}/val_auc")
        assert [s.step for s in scalars] == history["epoch"].tolist()
        assert [s.value for s in scalars] == pytest.approx(history["val_auc"].tolist(), rel=1e-6)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert events.Scalars("cv/auc_mean")[0].value == pytest.approx(metrics["mean"]["auc"], rel=1e-6)
    assert "figures/roc_curve" in events.Tags()["images"] and "config/text_summary" in events.Tags()["tensors"]


def test_the_csv_logger_is_one_long_table_and_the_params(tracked_run: Path) -> None:
    run_dir = tracked_run / "run"
    table = pd.read_csv(run_dir / "csv" / "metrics.csv")
    for k, history in _histories(run_dir).items():
        auc = table[table["key"] == f"fold{k}/val_auc"]
        assert (auc["fold"] == k).all()
        assert auc["step"].tolist() == history["epoch"].tolist()
        assert auc["value"].tolist() == pytest.approx(history["val_auc"].tolist())
    final = table[table["key"] == "cv/auc_mean"]
    assert len(final) == 1 and final["value"].iloc[0] == pytest.approx(
        json.loads((run_dir / "metrics.json").read_text())["mean"]["auc"])
    params = yaml.safe_load((run_dir / "csv" / "params.yaml").read_text())
    assert params["params"]["cv.folds"] == 2 and params["tags"]["model"] == "test_efficientnet"


def test_resume_continues_the_same_mlflow_run(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted after fold 1's first epoch, resumed: one MLflow run, every epoch logged once (#16)."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    args = [f"data.root={tiny_data}", *ARGS, "logger=mlflow", *_mlflow(tmp_path)]
    original = Trackers.log_epoch

    def stop_in_fold_1(self: Trackers, fold: int, row: dict) -> None:
        original(self, fold, row)
        if fold == 1:
            raise TrainingInterrupted("SIGTERM")

    monkeypatch.setattr(Trackers, "log_epoch", stop_in_fold_1)
    with pytest.raises(TrainingInterrupted):
        train(make_config(args), tmp_path / "run")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    (killed,) = client.search_runs([client.get_experiment_by_name("melanoma").experiment_id])
    assert killed.info.status == "KILLED"
    assert load_checkpoint(tmp_path / "run" / "fold1" / "last.pt")["tracking"] == {"mlflow": killed.info.run_id}
    (tmp_path / "run" / "tracking.json").unlink()  # the id in last.pt is enough
    monkeypatch.setattr(Trackers, "log_epoch", original)
    train(make_config([*args, f"resume={tmp_path / 'run'}"]), tmp_path / "run")
    (run,) = client.search_runs([killed.info.experiment_id])
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    for k in (0, 1):
        assert [m.step for m in client.get_metric_history(run.info.run_id, f"fold{k}/val_auc")] == [1, 2]
    assert "cv/auc_mean" in run.data.metrics


def test_an_unreachable_server_or_a_failing_backend_is_one_warning(tiny_data: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("mlflow")
    from melanoma import tracking

    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tracking._Csv, "epoch", full_disk)
    with caplog.at_level(logging.WARNING, logger="melanoma.tracking"):
        metrics = train(make_config([f"data.root={tiny_data}", *ARGS, "logger=[mlflow,csv]",
                                     "logger.mlflow.tracking_uri=http://127.0.0.1:9", "logger.mlflow.request_retries=0",
                                     "logger.mlflow.request_timeout=2"]), tmp_path / "run")
    warnings = [r.getMessage() for r in caplog.records if r.name == "melanoma.tracking"]
    assert len(warnings) == 2, warnings  # one per backend, not one per epoch
    assert warnings[0].startswith("logger=mlflow failed at start") and "training goes on" in warnings[0]
    assert warnings[1].startswith("logger=csv failed at fold 0, epoch 1 (OSError") and "No space left" in warnings[1]
    assert (tmp_path / "run" / "metrics.json").is_file() and metrics["mean"]["auc"] is not None
    assert not (tmp_path / "run" / "tracking.json").exists()  # no run was opened


def test_a_server_that_never_answers_costs_the_timeout_not_minutes(tiny_data: Path, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A listening socket that never replies: MLflow's request times out once, tracking is off, training goes on."""
    pytest.importorskip("mlflow")
    import os
    import socket
    import time

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)  # connections complete in the backlog; nothing is ever read or sent
        start = time.perf_counter()
        with caplog.at_level(logging.WARNING, logger="melanoma.tracking"):
            train(make_config([f"data.root={tiny_data}", *ARGS, "logger=mlflow", "logger.mlflow.request_retries=0",
                               "logger.mlflow.request_timeout=2",
                               f"logger.mlflow.tracking_uri=http://127.0.0.1:{server.getsockname()[1]}"]), tmp_path)
        elapsed = time.perf_counter() - start
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "melanoma.tracking"]
    assert warning.startswith("logger=mlflow failed at start") and (tmp_path / "metrics.json").is_file()
    assert elapsed < 60, elapsed  # MLflow's defaults (7 retries with backoff, 120 s timeouts) would take minutes
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ  # the run's settings do not outlive it


def test_only_rank_0_tracks(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")  # what torchrun sets on the second process
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # no process group: the run itself goes through alone
    train(make_config([f"data.root={tiny_data}", *ARGS, "logger=csv"]), tmp_path / "run")
    assert not (tmp_path / "run" / "csv").exists() and not (tmp_path / "run" / "tracking.json").exists()
    monkeypatch.setenv("RANK", "0")
    train(make_config([f"data.root={tiny_data}", *ARGS, "logger=csv"]), tmp_path / "run0")
    assert (tmp_path / "run0" / "csv" / "metrics.csv").is_file()  # the same run on rank 0 is tracked


def test_wandb_runs_offline_with_the_config_and_the_summary(tiny_data: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    from melanoma import tracking

    seen = {}
    close = tracking._Wandb.close

    def keep(self: tracking._Wandb, status: str) -> None:  # what the run holds, read before it is closed
        seen.update(summary=dict(self.run.summary), config=dict(self.run.config), mode=self.run.settings.mode)
        close(self, status)

    monkeypatch.setattr(tracking._Wandb, "close", keep)
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(make_config([f"data.root={tiny_data}", *ARGS, "logger=wandb"]), tmp_path / "run")
    run_id = json.loads((tmp_path / "run" / "tracking.json").read_text())["wandb"]
    (offline,) = (tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}")
    assert (offline / f"run-{run_id}.wandb").stat().st_size > 0 and seen["mode"] == "offline"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert seen["summary"]["cv/auc_mean"] == pytest.approx(metrics["mean"]["auc"])
    history = _histories(tmp_path / "run")[1]
    assert seen["summary"]["fold1/val_auc"] == pytest.approx(history["val_auc"].iloc[-1])  # the last logged value
    assert seen["config"]["cv.folds"] == 2 and seen["config"]["model.name"] == "test_efficientnet"


def test_a_missing_package_is_one_line_naming_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    from melanoma.cli import train as cli

    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["melanoma-train", "logger=[csv,mlflow]", "data=synthetic"])
    with pytest.raises(SystemExit) as refused:
        cli.main()
    err = capsys.readouterr().err
    assert refused.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "logger=mlflow needs the mlflow package: pip install 'melanoma[mlflow]'" in err
    assert list(tmp_path.iterdir()) == []
