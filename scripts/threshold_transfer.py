"""One-off tool: do the OOF-chosen thresholds hold on a test split, with and without calibration?

Reads a training run and a ``melanoma-eval`` of it (its ``predictions.csv`` has one calibrated
column per fold model) and, for both conditions, picks ``sens95`` and ``youden`` on the run's
out-of-fold predictions and applies them to the ensemble's test predictions. The uncalibrated
ensemble is rebuilt from the per-model columns by undoing each fold's temperature.

    .venv/bin/python scripts/threshold_transfer.py RUN_DIR EVAL_DIR [RUN_DIR EVAL_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from melanoma.calibration import apply_temperature
from melanoma.metrics import binary_metrics, choose_thresholds


def transfer(run_dir: Path, eval_dir: Path) -> list[dict]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    temperatures = {f["fold"]: f.get("temperature", 1.0) for f in metrics["folds"]}
    oof = pd.read_csv(run_dir / "oof_predictions.csv")
    test = pd.read_csv(eval_dir / "predictions.csv")
    columns = sorted(c for c in test.columns if c.startswith("prob_fold"))
    raw = np.mean([apply_temperature(test[c], 1 / temperatures[int(c.removeprefix("prob_fold"))]) for c in columns],
                  axis=0)
    rows = []
    for condition, oof_probs, test_probs in (("temperature", oof["prob"], test["prob"]),
                                             ("none", oof["prob_uncalibrated"], raw)):
        thresholds = choose_thresholds(oof["label"], oof_probs)
        for name in ("sens95", "youden"):
            at_oof = binary_metrics(oof["label"], oof_probs, thresholds[name])
            at_test = binary_metrics(test["label"], test_probs, thresholds[name])
            rows.append({"run": run_dir.name, "calibration": condition, "point": name,
                         "threshold": thresholds[name], "oof_sens": at_oof["sensitivity"],
                         "oof_spec": at_oof["specificity"], "test_sens": at_test["sensitivity"],
                         "test_spec": at_test["specificity"]})
    return rows


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:]]
    table = pd.DataFrame([row for run, ev in zip(args[::2], args[1::2], strict=True) for row in transfer(run, ev)])
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(table.groupby(["calibration", "point"])[["oof_sens", "oof_spec", "test_sens", "test_spec"]].mean()
          .to_string(float_format=lambda v: f"{v:.3f}"))
