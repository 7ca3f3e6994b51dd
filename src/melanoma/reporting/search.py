"""A hyper-parameter search (``hparams=optuna``) read back from its sweep folder.

hydra-optuna-sweeper writes ``optimization_results.yaml`` (the best parameters and value) into the
sweep folder, and each trial is the training run in its numbered job folder. The objective of a
trial is the mean CV value of the run's ``trainer.monitor`` (what ``melanoma-train`` returns); a
trial without a ``metrics.json`` failed, and its ``train.log`` says why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from melanoma.metrics import objective
from melanoma.reporting.runs import last_error

RESULTS = "optimization_results.yaml"


@dataclass
class Search:
    """A finished search: its folder, best trial, and every trial in order."""

    dir: Path
    best_params: dict
    best_value: float | None
    trials: pd.DataFrame  # trial, value, state (complete | failed), reason, run
    objective: str = "mean CV auc"  # what the value is (the trials' trainer.monitor; loss is negated)


def find_search(paths: list[str | Path]) -> Search | None:
    """The search whose sweep folder is one of ``paths`` (``None`` when no path holds ``optimization_results.yaml``)."""
    for path in map(Path, paths):
        results = path / RESULTS
        if not results.is_file():
            continue
        try:
            best = yaml.safe_load(results.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        rows, monitors = [], set()
        for job in sorted((d for d in path.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name)):
            value, reason = None, None
            try:
                metrics = json.loads((job / "metrics.json").read_text())
                config = yaml.safe_load((job / "config.yaml").read_text()) or {}
                monitor = (config.get("trainer") or {}).get("monitor", "auc")
                monitors.add(monitor)
                value = objective(metrics, monitor)
            except (OSError, ValueError, yaml.YAMLError):
                reason = last_error(job / "train.log") or "no metrics.json"
            rows.append({"trial": int(job.name), "value": value, "state": "complete" if value is not None else "failed",
                         "reason": reason, "run": str(job)})
        trials = pd.DataFrame(rows, columns=["trial", "value", "state", "reason", "run"]).astype({"value": float})
        monitor = monitors.pop() if len(monitors) == 1 else "objective"
        label = "minus the mean CV loss" if monitor == "loss" else f"mean CV {monitor}"
        return Search(path, dict(best.get("best_params") or {}), best.get("best_value"), trials, label)
    return None
