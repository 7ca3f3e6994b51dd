"""Finished training runs and their evaluations, collected from directories.

A training run is a folder whose ``metrics.json`` holds ``folds`` and ``mean`` (melanoma-train);
an evaluation one whose ``metrics.json`` names a ``ckpt`` (melanoma-eval). A folder with a
``train.log`` or ``folds.csv`` but no ``metrics.json`` is a run that crashed or is still running.
Nothing is trained or loaded beyond these files: no checkpoint, no model code, no config
resolution in the reader's environment (a run's ``config.yaml`` was resolved when it trained).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

_RUN_MARKERS = ("metrics.json", "train.log", "folds.csv")


@dataclass
class Evaluation:
    """A ``melanoma-eval`` output directory and its ``metrics.json``."""

    dir: Path
    metrics: dict


@dataclass
class Run:
    """A finished training run: its directory, ``metrics.json``, resolved config and overrides."""

    dir: Path
    metrics: dict
    config: dict
    overrides: list[str]
    label: str = ""
    evaluation: Evaluation | None = None


@dataclass
class Skipped:
    """Something the report could not use, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def natural_key(path: Path) -> list:
    """Sort key that puts sweep job 10 after job 9."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _candidates(root: Path):
    """Directories under ``root`` (itself included) that hold a run's or an evaluation's files."""
    for here, dirs, files in os.walk(root):
        # .hydra/, fold checkpoints and melanoma-stack's own stack/ folder hold no run of their own
        dirs[:] = [d for d in dirs if d not in (".hydra", "stack") and not re.fullmatch(r"fold\d+", d)]
        if set(_RUN_MARKERS) & set(files):
            yield Path(here)


ERROR_CHARS = 300  # of a crashed run's last error, as the report lists it


def last_error(log: Path) -> str | None:
    """The last error line of a training log, without its timestamp prefix, cut to 300 characters (at a space
    in the second half, else where the limit falls)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    errors = [ln for ln in lines if "ERROR" in ln or "error:" in ln or "Error" in ln]
    if not errors:
        return None
    line = re.sub(r"^(\[[^]]*\])+\s*-?\s*", "", errors[-1]).strip()
    if len(line) <= ERROR_CHARS:
        return line
    cut = line[:ERROR_CHARS - 4]
    return (cut[:cut.rfind(" ")] if cut.rfind(" ") > ERROR_CHARS // 2 else cut) + " ..."


def _unknown_interpolations(tree: dict) -> dict:
    """``tree`` with every string that holds an unresolved ``${...}`` replaced by ``None``."""
    return {k: _unknown_interpolations(v) if isinstance(v, dict) else
            None if isinstance(v, str) and "${" in v else v for k, v in tree.items()}


def _load_config(run_dir: Path) -> tuple[dict, list[str]]:
    """The run's config and Hydra overrides.

    ``config.yaml`` holds the config as resolved in the training environment. A run from before
    it existed falls back to Hydra's ``.hydra/config.yaml``, whose interpolations (``${...}``) were
    never resolved: they are read as unknown (``None``), not resolved in the reader's environment.

    Raises:
        ValueError: a config file that is not a mapping.
    """
    hydra_dir = run_dir / ".hydra"
    config = {}
    for path in (run_dir / "config.yaml", hydra_dir / "config.yaml"):
        if path.is_file():
            config = yaml.safe_load(path.read_text()) or {}
            if not isinstance(config, dict):
                raise ValueError(f"{path} holds no mapping")
            if path.parent == hydra_dir:
                config = _unknown_interpolations(config)
            break
    return config, read_overrides(run_dir) or []


def read_overrides(folder: Path) -> list[str] | None:
    """The command-line overrides Hydra recorded for the command that wrote ``folder`` (``.hydra/overrides.yaml``),
    or ``None`` where it recorded none (the command was called from Python)."""
    path = folder / ".hydra" / "overrides.yaml"
    return [str(o) for o in yaml.safe_load(path.read_text()) or []] if path.is_file() else None


def _evaluated_run(evaluation: Evaluation, runs: dict[Path, Run]) -> Run | None:
    """The run whose directory holds the evaluated checkpoint (``ckpt`` may be relative to the
    directory melanoma-eval ran in, usually an ancestor of its output folder)."""
    ckpt = Path(str(evaluation.metrics["ckpt"])).expanduser()
    if ckpt.suffix == ".pt":
        ckpt = ckpt.parent.parent if re.fullmatch(r"fold\d+", ckpt.parent.name) else ckpt.parent
    bases = [Path("/")] if ckpt.is_absolute() else [evaluation.dir, *evaluation.dir.resolve().parents, Path.cwd()]
    for base in bases:
        run = runs.get((base / ckpt).resolve())
        if run is not None:
            return run
    return None


def _not_the_test_result(evaluation: Evaluation, run: Run) -> str | None:
    """Why an evaluation of the run is not its test result (the table's "test" columns), or None.

    Only the fold ensemble scored on the test split of the run's own data qualifies: a train or
    all split holds images the folds trained on, one fold model is not the ensemble, a stacked
    model is another model, and another dataset is another question.
    """
    m = evaluation.metrics
    if m.get("split", "test") != "test":
        return f"it scored split={m['split']} (the folds trained on those images); use eval.split=test"
    n_models, n_folds = len(m.get("models") or []), len(run.metrics["folds"])
    if n_models and n_models != n_folds:
        return f"it scored {n_models} of the run's {n_folds} fold models, not the ensemble (ckpt=RUN_DIR)"
    if m.get("stack"):
        return "it scored the stacked model (eval.stack=true), not the run's image model; its numbers are in its own "\
               "metrics.json"
    trained_on = (run.config.get("data") or {}).get("root")
    scored = (m.get("data") or {}).get("root")
    same = str(scored) == str(trained_on) or Path(str(scored)).expanduser().resolve() == Path(
        str(trained_on)).expanduser().resolve()
    if trained_on and scored and not same:
        return f"it scored other data ({scored}, the run trained on {trained_on})"
    return None


def _evaluations_under(root: Path) -> list[Evaluation]:
    """The readable ``melanoma-eval`` outputs below ``root`` (an unreadable one is passed over)."""
    found = []
    for d in _candidates(root) if root.is_dir() else []:
        try:
            metrics = json.loads((d / "metrics.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(metrics, dict) and "ckpt" in metrics and isinstance(metrics.get("thresholds"), dict):
            found.append(Evaluation(d, metrics))
    return found


def collect(paths: list[str | Path],
            eval_dirs: Sequence[str | Path] = ("outputs/eval",)) -> tuple[list[Run], list[Skipped]]:
    """Find the runs and evaluations under ``paths`` and read their files.

    Args:
        paths: folders holding runs, sweeps and evaluations.
        eval_dirs: where else to look for evaluations of the runs found (melanoma-eval's default
            output folder); evaluations there of other runs are left out silently.

    Returns:
        The finished runs (each with its newest evaluation attached, if any) and what was skipped.
    """
    runs: dict[Path, Run] = {}
    evaluations: list[Evaluation] = []
    skipped: list[Skipped] = []
    seen: set[Path] = set()  # PATHs may overlap
    for path in map(Path, paths):
        if not path.is_dir():
            skipped.append(Skipped(str(path), "not a directory" if path.exists() else "does not exist"))
            continue
        found = sorted(_candidates(path), key=natural_key)
        if not found:
            skipped.append(Skipped(str(path), "no runs found (no metrics.json, train.log or folds.csv under it)"))
        for d in found:
            if d.resolve() in seen:
                continue
            seen.add(d.resolve())
            if not (d / "metrics.json").is_file():
                error = last_error(d / "train.log")
                skipped.append(Skipped(str(d), "no metrics.json: the run crashed or is still running"
                                       + (f"; last error in train.log: {error}" if error else "")))
                continue
            try:
                metrics = json.loads((d / "metrics.json").read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                skipped.append(Skipped(str(d), f"metrics.json cannot be read ({exc})"))
                continue
            if isinstance(metrics, dict) and isinstance(metrics.get("folds"), list) and isinstance(
                    metrics.get("mean"), dict):
                try:
                    config, overrides = _load_config(d)
                except Exception as exc:  # a broken config costs the parameter columns, not the run
                    config, overrides = {}, []
                    skipped.append(Skipped(str(d), f"config unreadable, parameters shown as n/a ({exc})"))
                runs[d.resolve()] = Run(d, metrics, config, overrides)
            elif isinstance(metrics, dict) and "ckpt" in metrics and isinstance(metrics.get("thresholds"), dict):
                evaluations.append(Evaluation(d, metrics))
            else:
                skipped.append(Skipped(str(d), "metrics.json holds neither fold results (melanoma-train) "
                                               "nor a ckpt (melanoma-eval)"))
    elsewhere = [e for root in map(Path, eval_dirs) for e in _evaluations_under(root) if e.dir.resolve() not in seen]
    elsewhere = [e for e in elsewhere if _evaluated_run(e, runs) is not None]
    for evaluation in sorted(evaluations + elsewhere, key=lambda e: (e.dir / "metrics.json").stat().st_mtime):
        run = _evaluated_run(evaluation, runs)
        if run is None:
            skipped.append(Skipped(str(evaluation.dir), f"evaluation of ckpt={evaluation.metrics['ckpt']}, "
                                                        "which is not among the runs found"))
            continue
        mismatch = _not_the_test_result(evaluation, run)
        if mismatch:
            skipped.append(Skipped(str(evaluation.dir), f"not used as the run's test result: {mismatch}"))
            continue
        if run.evaluation is not None:
            skipped.append(Skipped(str(run.evaluation.dir), f"evaluation superseded by the newer {evaluation.dir}"))
        run.evaluation = evaluation
    return list(runs.values()), skipped
