"""The results table of ``melanoma-report``: one row per training run, with its test evaluation.

Every ``metrics.json`` under the PATHs (run directories, sweep directories or any folder above
them) is read: training runs become rows, and a ``melanoma-eval`` result joins the run its
``ckpt`` names. ``results.csv`` holds the numbers (means and stds apart, so it can be read back),
``results.md`` the same table for people, ``report.pdf`` the figures (see ``pdf.py``). What
could not be used (a crashed run, an unreadable file, an evaluation that is not the run's test
result, a figure that cannot be drawn) is listed with the reason in ``results.md``, on stdout and
(all but the ``--figures`` PNGs) on a page of the PDF.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from melanoma.errors import DataError
from melanoma.reporting.runs import Evaluation, Run, Skipped, collect, natural_key
from melanoma.reporting.search import Search, find_search

# Parameter columns every table has (config key -> column); others appear when they vary.
ALWAYS = {"model.name": "model", "optimizer.lr": "lr", "data.batch_size": "batch_size"}
IGNORED = {"resume"}  # never a parameter of the result
CV_METRICS = ("accuracy", "f1", "precision", "recall", "auc")
TEST_METRICS = ("auc", "sensitivity", "specificity")


@dataclass
class Report:
    """Everything the outputs are drawn from."""

    paths: list[str]
    runs: list[Run]  # in table order, best first
    table: pd.DataFrame
    params: list[str]  # the parameter columns of the table
    skipped: list[Skipped] = field(default_factory=list)
    search: Search | None = None  # the hyper-parameter search the runs are the trials of (hparams=optuna)


def _number(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def results_table(runs: list[Run]) -> tuple[pd.DataFrame, list[str]]:
    """One row per run, best mean AUC first; sorts ``runs`` the same way and labels them.

    Returns:
        The table (numbers as floats, NaN where a run lacks a value) and its parameter columns.
    """
    common = os.path.commonpath([r.dir.resolve() for r in runs])
    for run in runs:
        run.label = os.path.relpath(run.dir.resolve(), common) if len(runs) > 1 else run.dir.resolve().name
    leaves = [pd.json_normalize(r.config, sep=".").to_dict("records")[0] for r in runs]  # "a.b": value
    flats = [{k: str(v) if isinstance(v, list) else v for k, v in leaf.items()} for leaf in leaves]
    known = [f for f in flats if f]
    varying = sorted(k for k in set().union(*known) - set(ALWAYS) - IGNORED
                     if len({repr(f.get(k)) for f in known}) > 1)
    rows = []
    for run, flat in zip(runs, flats, strict=True):
        m = run.metrics
        row = {"run": run.label, "best": False}
        row |= {column: flat.get(key) for key, column in ALWAYS.items()}
        row["model"] = row["model"] or m.get("model")
        row |= {key: flat.get(key) for key in varying}
        row["folds"] = len(m["folds"])
        for key in CV_METRICS:
            row[f"{key}_mean"] = _number(m["mean"].get(key))
            row[f"{key}_std"] = _number((m.get("std") or {}).get(key))
        row["oof_auc"] = _number((m.get("oof") or {}).get("auc"))
        row["best_epochs"] = ", ".join(str(f.get("best_epoch", "?")) for f in m["folds"])
        row |= _test_columns(run.evaluation)
        row["run_dir"] = str(run.dir)
        row["overrides"] = " ".join(run.overrides)
        rows.append(row)
    order = sorted(range(len(rows)), key=lambda i: (-np.nan_to_num(rows[i]["auc_mean"], nan=-np.inf),
                                                    natural_key(Path(rows[i]["run"]))))
    table = pd.DataFrame([rows[i] for i in order]).reset_index(drop=True)
    table.loc[0, "best"] = not math.isnan(table.loc[0, "auc_mean"])
    runs[:] = [runs[i] for i in order]
    return table, ["model", "lr", "batch_size", *varying]


def _test_columns(evaluation: Evaluation | None) -> dict:
    """Test metrics at the evaluation's operating point, each with its bootstrap interval."""
    row: dict = {}
    block = {}
    if evaluation is not None:
        point = evaluation.metrics.get("operating_point")
        block = (evaluation.metrics["thresholds"].get(point) or {}).get("metrics", {})
    for key in TEST_METRICS:
        cell = block.get(key) or {}
        ci = cell.get("ci") or [None, None]
        row |= {f"test_{key}": _number(cell.get("value")), f"test_{key}_low": _number(ci[0]),
                f"test_{key}_high": _number(ci[1])}
    row["test_operating_point"] = evaluation.metrics.get("operating_point") if evaluation else None
    row["test_threshold"] = _number(evaluation.metrics.get("threshold")) if evaluation else math.nan
    row["test_images"] = _number(evaluation.metrics.get("n_images")) if evaluation else math.nan
    row["eval_dir"] = str(evaluation.dir) if evaluation else None
    return row


def format_cell(value: object, spec: str = ".4f") -> str:
    """A number as text with ``spec``; missing values (None, NaN) as ``n/a``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def format_interval(cell: dict | None, spec: str = ".3f") -> str:
    """A melanoma-eval metric (``{"value": v, "ci": [lo, hi]}``) as ``v [lo, hi]``; ``n/a`` without a value."""
    if not cell or cell.get("value") is None:
        return "n/a"
    lo, hi = cell.get("ci") or (None, None)
    return f"{format_cell(cell['value'], spec)} [{format_cell(lo, spec)}, {format_cell(hi, spec)}]"


def display_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """The table as text cells, shared by the markdown file, stdout and the PDF."""
    table = report.table
    has_test = table["eval_dir"].notna().any()
    names = {"accuracy": "accuracy", "f1": "F1", "precision": "precision", "recall": "recall", "auc": "AUC"}
    header = ["", "run", *[p.replace("_", " ") for p in report.params], *map(names.get, CV_METRICS), "best epoch"]
    if has_test:
        header += ["test AUC (95% CI)", "test sens / spec"]
    rows = []
    for _, r in table.iterrows():
        cells = ["★" if r["best"] else "", r["run"], *[format_cell(r[p], "g") for p in report.params]]
        cells += ["n/a" if math.isnan(r[f"{k}_mean"]) else
                  f"{format_cell(r[f'{k}_mean'])} ± {format_cell(r[f'{k}_std'])}" for k in CV_METRICS]
        cells.append(r["best_epochs"])
        if has_test:
            auc = format_cell(r["test_auc"], ".3f")
            cells.append(auc if auc == "n/a" else f"{auc} [{format_cell(r['test_auc_low'], '.3f')}, "
                                                  f"{format_cell(r['test_auc_high'], '.3f')}]")
            cells.append("n/a" if pd.isna(r["eval_dir"]) else
                         f"{format_cell(r['test_sensitivity'], '.3f')} / {format_cell(r['test_specificity'], '.3f')} "
                         f"@ {r['test_operating_point']} ({format_cell(r['test_threshold'], '.3g')})")
        rows.append(cells)
    return header, rows


def to_markdown(report: Report) -> str:
    """``results.md``: the table and the list of what was skipped."""
    header, rows = display_rows(report)

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    metric_note = ("Cross-validation: mean ± std over folds at threshold 0.5; ★ best mean AUC. "
                   "Test: melanoma-eval's fold ensemble at its operating point.")
    lines = ["# melanoma report", "", f"Runs from {', '.join(report.paths)}. {metric_note}", "",
             line(header), "| " + " | ".join("---" for _ in header) + " |", *map(line, rows), ""]
    if report.search is not None:
        lines += search_lines(report.search)
    lines += ["## Skipped", ""] + ([f"- {s}" for s in report.skipped] or ["nothing"]) + [""]
    return "\n".join(lines)


def search_lines(search: Search) -> list[str]:
    """The ``## Search`` section of ``results.md``: the best trial, the counts, every failed trial and why."""
    trials = search.trials
    failed = trials[trials["state"] != "complete"]
    best = ", ".join(f"{k}={format_cell(v, 'g')}" for k, v in search.best_params.items()) or "none"
    lines = ["## Search", "", f"Optuna search in {search.dir}: {len(trials)} trials, {len(trials) - len(failed)} "
             f"complete, {len(failed)} failed; best value {format_cell(search.best_value)} with {best} "
             "(optimization_results.yaml); history in optimization_history.png.", ""]
    lines += [f"- trial {r.trial} failed: {r.reason}" for r in failed.itertuples()]
    return lines + ([""] if len(failed) else [])


def build_report(paths: list[str | Path]) -> Report:
    """Collect the runs under ``paths`` into a :class:`Report` (read-only: nothing is written).

    Raises:
        DataError: no finished run under any of the paths.
    """
    runs, skipped = collect(paths)
    if not runs:
        reasons = "; ".join(map(str, skipped)) or "nothing found"
        raise DataError(f"no finished training run (metrics.json with fold results) in {' '.join(map(str, paths))}"
                        f" ({reasons}); pass run or multirun directories of melanoma-train")
    table, params = results_table(runs)
    for run in runs:
        missing = [k for k in CV_METRICS if k not in run.metrics["mean"]]
        if missing:
            skipped.append(Skipped(str(run.dir), f"metrics.json has no {', '.join(missing)} (shown as n/a)"))
    return Report([str(p) for p in paths], runs, table, params, skipped, find_search(paths))
