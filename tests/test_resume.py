"""Crash safety: a killed run resumes to the same numbers; SIGTERM leaves complete files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from melanoma.checkpoint import load_checkpoint

from conftest import TINY

EXE = str(Path(sys.executable).with_name("melanoma-train"))


def _args(data: Path, run_dir: Path | None, *extra: str) -> list[str]:
    where = [f"hydra.run.dir={run_dir}"] if run_dir else []  # resume= picks the directory itself
    return [EXE, f"data.root={data}", *TINY, "trainer.epochs=3", *where, *extra]


def _start_and_wait_for(args: list[str], marker: Path, cwd: Path) -> subprocess.Popen:
    # A session of its own, as a terminal or SLURM job gives it: signals can go to the whole group.
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "the run never reached the marker"
        time.sleep(0.02)
    return proc


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow  # three training processes: the slow tier
def test_sigkill_in_fold_two_then_resume_equals_an_uninterrupted_run(tiny_data: Path, tmp_path: Path) -> None:
    subprocess.run(_args(tiny_data, tmp_path / "straight", "cv.folds=2"), cwd=tmp_path, check=True,
                   capture_output=True)
    killed = tmp_path / "killed"
    proc = _start_and_wait_for(_args(tiny_data, killed, "cv.folds=2"), killed / "fold1" / "last.pt", tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists()
    assert load_checkpoint(killed / "fold1" / "last.pt")["epoch"] < 3  # really stopped inside fold 2
    resumed = subprocess.run([*_args(tiny_data, None, "cv.folds=2"), f"resume={killed}"], cwd=tmp_path,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "fold 0: resuming after epoch 3 of 3" in resumed.stdout  # the finished fold is not trained again
    assert _metrics(killed) == _metrics(tmp_path / "straight")
    a, b = (pd.read_csv(d / "oof_predictions.csv") for d in (killed, tmp_path / "straight"))
    assert a["prob"].tolist() == b["prob"].tolist()


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_process_group_stops_with_one_line(sig: signal.Signals, tiny_data: Path,
                                                           tmp_path: Path) -> None:
    """SLURM preemption, timeout and a terminal's Ctrl-C signal every process of the group, loader workers too."""
    run = tmp_path / "run"
    proc = _start_and_wait_for(_args(tiny_data, run, "trainer.epochs=50", "data.num_workers=2"),
                               run / "fold0" / "last.pt", tmp_path)
    time.sleep(0.3)  # somewhere inside a later epoch
    os.killpg(proc.pid, sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig
    lines = [line for line in stderr.strip().splitlines() if "WARNING" not in line]
    assert lines == [f"melanoma-train: interrupted by {sig.name}; resume with: melanoma-train <same overrides> "
                     f"resume={run}"], stderr[-3000:]
    state = load_checkpoint(run / "fold0" / "last.pt")
    assert state["epoch"] >= 1 and len(state["history"]) == state["epoch"]
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


_SWALLOWED = """
import os, signal, time
from melanoma.errors import TrainingInterrupted, catch_stop_signals, interrupt_training, raise_if_stopped

class Other:
    def __del__(self):
        raise ValueError("an unrelated ignored error")

def after_fork():  # what logging does after each loader worker's fork; the signal lands inside it
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)
os.register_at_fork(after_in_parent=after_fork)
with catch_stop_signals(interrupt_training):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    print("went on")
    Other()
    try:
        raise_if_stopped()
    except TrainingInterrupted as exc:
        print("stopped by", exc)
raise_if_stopped()  # handled: forgotten once the handlers are restored
print("forgotten")
"""


def test_a_stop_that_python_swallowed_is_raised_again_at_the_next_batch() -> None:
    """Python ignores an exception raised in an at-fork hook: SIGTERM there once let training run on (exit 0)."""
    result = subprocess.run([sys.executable, "-c", _SWALLOWED], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["went on", "stopped by SIGTERM", "forgotten"]
    assert "TrainingInterrupted" not in result.stderr  # Python's report of the swallowed stop is silenced ...
    assert "an unrelated ignored error" in result.stderr  # ... and only that one


@pytest.mark.slow  # two training processes: the slow tier
def test_resume_with_another_config_is_refused(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    subprocess.run(_args(tiny_data, run, "trainer.epochs=1", "cv.folds=2"), cwd=tmp_path, check=True,
                   capture_output=True)
    result = subprocess.run([*_args(tiny_data, None, "trainer.epochs=1", "cv.folds=2", "optimizer.lr=0.5"),
                             f"resume={run}"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "was written by a run with another config (optimizer.lr: 0.001 -> 0.5)" in last
    # the run's own record still says what it trained with (Hydra's .hydra/ copy was rewritten by the refused run)
    assert yaml.safe_load((run / "config.yaml").read_text())["optimizer"]["lr"] == 0.001


@pytest.mark.slow  # a sweep run twice, four processes' start-up: the slow tier
def test_relaunching_a_sweep_in_its_directory_trains_nothing_again(tiny_data: Path, tmp_path: Path) -> None:
    args = [EXE, "-m", f"data.root={tiny_data}", *TINY, "trainer.epochs=1", "cv.folds=2", "optimizer.lr=0.001,0.01",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    subprocess.run(args, cwd=tmp_path, check=True, capture_output=True)
    before = [_metrics(tmp_path / "sweep" / str(j)) for j in (0, 1)]
    again = subprocess.run(args, cwd=tmp_path, check=True, capture_output=True, text=True)
    assert again.stdout.count("resuming after epoch 1 of 1") == 4  # 2 points x 2 folds, none retrained
    assert [_metrics(tmp_path / "sweep" / str(j)) for j in (0, 1)] == before


@pytest.mark.slow  # two torchrun processes: the slow tier (scripts/test.sh -m slow)
def test_torchrun_two_cpu_processes_write_one_set_of_outputs(tiny_data: Path, tmp_path: Path) -> None:
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    run = tmp_path / "ddp"
    result = subprocess.run([torchrun, "--nproc_per_node=2", "-m", "melanoma.cli.train", f"data.root={tiny_data}",
                             *TINY, "trainer.epochs=1", f"hydra.run.dir={run}", "data.cache=disk",
                             f"data.cache_dir={tmp_path / 'decoded'}"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rank1_log = (run / "train.rank1.log").read_text()
    assert "rank 1 of 2" in rank1_log  # both ranks trained
    assert "decoded 150 images once" in (run / "train.log").read_text()  # rank 0 decodes ...
    assert "decoded-image cache hit" in rank1_log and "decoded 150" not in rank1_log  # ... rank 1 maps its file
    assert result.stdout.count("3-fold cross-validation") == 1  # only rank 0 reports
    oof = pd.read_csv(run / "oof_predictions.csv")
    folds = pd.read_csv(run / "folds.csv")
    assert len(oof) == 150 and sorted(oof["path"]) == sorted(folds["path"])  # every image exactly once
    assert oof.merge(folds, on=["path", "label", "fold"]).shape[0] == 150
    assert json.loads((run / "metrics.json").read_text())["n_images"] == 150
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "decoded"]  # no stray run directories


def test_a_run_recorded_before_keys_were_added_still_resumes(tiny_data: Path, tmp_path: Path) -> None:
    """Runs written before model.fusion, data.metadata, ... existed resume as they trained (checkpoint.ADDED_KEYS)."""
    from melanoma.checkpoint import ADDED_KEYS, update_checkpoint
    from melanoma.cli.train import train

    from conftest import make_config

    args = [f"data.root={tiny_data}", *TINY, "trainer.epochs=1", "cv.folds=2", "audit.enabled=false"]
    run = tmp_path / "run"
    before = train(make_config(args), run)

    added = ADDED_KEYS | {"cv": {"oof_tta": None}}  # oof_tta is not compared on resume at all (NOT_COMPARED)

    def older(config: dict) -> dict:
        return {k: {kk: vv for kk, vv in v.items() if kk not in added.get(k, {})} if isinstance(v, dict) else v
                for k, v in config.items()}

    (run / "config.yaml").write_text(yaml.safe_dump(older(yaml.safe_load((run / "config.yaml").read_text()))))
    for path in run.glob("fold*/*.pt"):
        update_checkpoint(path, config=older(load_checkpoint(path)["config"]))
    assert "fusion" not in load_checkpoint(run / "fold0" / "last.pt")["config"]["model"]
    again = train(make_config([*args, f"resume={run}"]), run)
    assert again["folds"] == before["folds"]
    assert again["thresholds_by_tta"] == before["thresholds_by_tta"] and list(again["thresholds_by_tta"]) == ["flip"]
    plain = train(make_config([*args, f"resume={run}", "cv.oof_tta=[]"]), run)  # e.g. after the TTA pass failed
    assert plain["folds"] == before["folds"] and plain["thresholds_by_tta"] == {}


def test_a_resume_whose_folds_came_out_differently_is_refused(tiny_data: Path, tmp_path: Path) -> None:
    """A resume recomputes the folds (audit included): if they moved, the finished folds would not be the run's."""
    from melanoma.cli.train import train
    from melanoma.errors import ConfigError

    from conftest import make_config

    run, args = tmp_path / "run", [f"data.root={tiny_data}", *TINY, "trainer.epochs=1", "cv.folds=2"]
    train(make_config(args), run)
    folds = pd.read_csv(run / "folds.csv")
    folds.loc[0, "fold"] = 1 - folds.loc[0, "fold"]  # as if a newer audit had grouped one image elsewhere
    folds.to_csv(run / "folds.csv", index=False)
    before = (run / "folds.csv").read_text()
    with pytest.raises(ConfigError, match=rf"folds\.csv: 1 of {len(folds)} images fall in another fold now"):
        train(make_config([*args, f"resume={run}"]), run)
    assert (run / "folds.csv").read_text() == before  # nothing of the run is rewritten
