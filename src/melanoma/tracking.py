"""Experiment tracking: a run's metrics, params and files sent to CSV, TensorBoard, MLflow or W&B.

``logger=none|csv|tensorboard|mlflow|wandb`` (or a list, ``logger=[tensorboard,mlflow]``) picks the
backends; each is a thin wrapper of its library's own writer, imported only when it is used.
What every backend gets:

- per epoch of each fold: ``fold{k}/train_loss``, ``fold{k}/val_loss``, ``fold{k}/val_auc``,
  ``fold{k}/val_accuracy``, ``fold{k}/lr`` and ``fold{k}/seconds`` at step = epoch;
- the resolved config, flattened (``optimizer.lr``), as params;
- the final ``metrics.json`` numbers (``cv/auc_mean``, ``oof/auc``, ``fold0/best_auc``, ...);
- the figures, ``metrics.json``, ``oof_predictions.csv`` and ``config.yaml`` as artifacts;
- tags: the model, the data root, the git commit, and the sweep a run belongs to.

Tracking never stops or corrupts training: a backend that fails (a server that is down, a full
disk, a missing package) gives one warning and is switched off for the rest of the run. The ids of
the tracked runs are kept in ``RUN_DIR/tracking.json`` and in every ``last.pt``, so ``resume=``
continues the same MLflow or W&B run.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from melanoma.checkpoint import atomic_path, load_checkpoint
from melanoma.errors import ConfigError, MelanomaError, TrainingInterrupted

log = logging.getLogger(__name__)

BACKENDS = ("csv", "tensorboard", "mlflow", "wandb")
EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
IDS = "tracking.json"  # the tracked runs' ids, for resume
ARTIFACTS = ("metrics.json", "oof_predictions.csv", "config.yaml", "*.png")


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out |= flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


def final_numbers(metrics: Mapping) -> dict[str, float]:
    """The finite numbers of a training ``metrics.json``, under tracking names (``cv/auc_mean``, ``oof/auc``, ...)."""
    out: dict[str, float] = {}

    def put(name: str, value: object) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)

    for key, value in (metrics.get("mean") or {}).items():
        put(f"cv/{key}_mean", value)
    for key, value in (metrics.get("std") or {}).items():
        put(f"cv/{key}_std", value)
    for key, value in (metrics.get("oof") or {}).items():
        put(f"oof/{key}", value)
    sets = {"": (metrics.get("thresholds"), metrics.get("oof_at_thresholds"))}  # and the set of each cv.oof_tta mode
    sets |= {f"_{mode}": (chosen, (metrics.get("oof_at_thresholds_by_tta") or {}).get(mode))
             for mode, chosen in (metrics.get("thresholds_by_tta") or {}).items()}
    for suffix, (chosen, at) in sets.items():
        for name, block in (at or {}).items():
            for key in ("sensitivity", "specificity"):
                put(f"oof{suffix}_{name}/{key}", (block or {}).get(key))
        for name, value in (chosen or {}).items():
            put(f"threshold{suffix}/{name}", value)
    for fold in metrics.get("folds") or []:
        for key in ("auc", "loss", "best_epoch", "temperature"):
            put(f"fold{fold['fold']}/best_{key}" if key in ("auc", "loss") else f"fold{fold['fold']}/{key}",
                fold.get(key))
    return out


def _require(backend: str) -> None:
    """The backend's package is importable, or one line naming the extra that brings it."""
    if backend == "csv":
        return
    module, extra = EXTRAS[backend]
    try:
        __import__(module)
    except ImportError:
        raise ConfigError(f"logger={backend} needs the {module} package: pip install 'melanoma[{extra}]'") from None


class _Backend:
    """One tracking library. Subclasses implement what they support; every call is guarded by :class:`Trackers`."""

    name = ""

    def start(self, run_dir: Path, params: dict, tags: dict, run_id: str | None) -> str | None:
        """Open (or, with ``run_id``, reopen) the tracked run; returns its id to keep for resume."""
        return None

    def epoch(self, fold: int, epoch: int, values: dict[str, float]) -> None: ...

    def results(self, numbers: dict[str, float], files: list[Path]) -> None: ...

    def close(self, status: str) -> None: ...


class _Csv(_Backend):
    """``RUN_DIR/csv/metrics.csv`` (``fold,step,key,value``, appended as they come) and ``params.yaml``."""

    name = "csv"

    def __init__(self, settings: Mapping) -> None:
        self.dir = settings.get("dir")

    def start(self, run_dir: Path, params: dict, tags: dict, run_id: str | None) -> str | None:
        self.root = Path(self.dir).expanduser() if self.dir else run_dir / "csv"
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.root / "params.yaml") as tmp:
            tmp.write_text(yaml.safe_dump({"params": params, "tags": tags}, sort_keys=False))
        self.path = self.root / "metrics.csv"
        if not self.path.is_file():
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(["fold", "step", "key", "value"])
        return None

    def _append(self, rows: list[tuple]) -> None:
        with self.path.open("a", newline="") as f:  # one flushed line per value: a crash loses none before it
            csv.writer(f).writerows(rows)

    def epoch(self, fold: int, epoch: int, values: dict[str, float]) -> None:
        self._append([(fold, epoch, key, value) for key, value in values.items()])

    def results(self, numbers: dict[str, float], files: list[Path]) -> None:
        self._append([("", 0, key, value) for key, value in numbers.items()])


class _TensorBoard(_Backend):
    """Event files in ``RUN_DIR/tensorboard`` (``tensorboard --logdir outputs``): scalars, the config, the figures."""

    name = "tensorboard"

    def __init__(self, settings: Mapping) -> None:
        self.log_dir = settings.get("log_dir")

    def start(self, run_dir: Path, params: dict, tags: dict, run_id: str | None) -> str | None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(self.log_dir).expanduser() if self.log_dir else
                                                run_dir / "tensorboard"))
        lines = [f"| {k} | {v} |" for k, v in {**tags, **params}.items()]
        self.writer.add_text("config", "| key | value |\n| --- | --- |\n" + "\n".join(lines), 0)
        return None

    def epoch(self, fold: int, epoch: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, epoch)
        self.writer.flush()

    def results(self, numbers: dict[str, float], files: list[Path]) -> None:
        import numpy as np
        from PIL import Image

        for key, value in numbers.items():
            self.writer.add_scalar(key, value, 0)
        for path in files:
            if path.suffix == ".png":
                with Image.open(path) as image:
                    self.writer.add_image(f"figures/{path.stem}", np.asarray(image.convert("RGB")), 0,
                                          dataformats="HWC")
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


@contextlib.contextmanager
def _locked(path: Path | None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (``None``: no lock); the kernel drops it if the process dies."""
    if path is None:
        yield
        return
    import fcntl

    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _MLflow(_Backend):
    """An MLflow run: by default in ``sqlite:///outputs/mlruns.db``, its files in ``outputs/mlartifacts``."""

    name = "mlflow"

    def __init__(self, settings: Mapping) -> None:
        self.settings = dict(settings)

    def start(self, run_dir: Path, params: dict, tags: dict, run_id: str | None) -> str | None:
        # A server that is down should cost seconds, not MLflow's default of 7 retries with backoff. MLflow reads
        # these at each request; values the user exported win, ours are undone when the run closes.
        self.environ = {}
        for name, key, default in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "request_retries", 1),
                                   ("MLFLOW_HTTP_REQUEST_TIMEOUT", "request_timeout", 10)):
            if name not in os.environ:
                self.environ[name] = os.environ[name] = str(self.settings.get(key, default))
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient

        self.Metric, self.Param, self.RunTag = Metric, Param, RunTag
        uri = str(self.settings.get("tracking_uri") or "sqlite:///outputs/mlruns.db")
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # relative: from the working dir
            db = Path(uri.removeprefix("sqlite:///")).expanduser().resolve()
            db.parent.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{db}"
        # Parallel sweep jobs (hydra/launcher=parallel) would race to create a new SQLite store's tables and the
        # experiment: one job at a time opens its run (an advisory lock; on a cluster, use a tracking server).
        self.tracking_uri = uri
        try:
            with _locked(Path(uri.removeprefix("sqlite:///") + ".lock") if uri.startswith("sqlite:///") else None):
                self.client = MlflowClient(tracking_uri=uri)
                self._open(params, tags, run_id)
        except BaseException:
            self._restore_environment()  # the backend is dropped: close() will not run
            raise
        return self.run_id

    def _restore_environment(self) -> None:
        for name in self.environ:
            os.environ.pop(name, None)

    def _open(self, params: dict, tags: dict, run_id: str | None) -> None:
        if run_id is not None and self._exists(run_id):
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:  # a new run; a resumed one whose run is not in this store says which it continues
            if run_id is not None:
                tags = tags | {"resumed_from": run_id}
            name = str(self.settings.get("experiment_name") or "melanoma")
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                location = self.settings.get("artifact_location")
                if not self.tracking_uri.startswith(("sqlite:", "file:", "/")):
                    location = None  # a server keeps its experiments' files where it is configured to
                elif location and "://" not in str(location):
                    location = Path(location).expanduser().resolve().as_uri()
                experiment_id = self.client.create_experiment(name, artifact_location=location)
            else:
                experiment_id = experiment.experiment_id
            run = self.client.create_run(experiment_id, tags={k: str(v) for k, v in tags.items()},
                                         run_name=self.settings.get("run_name") or tags.get("run_name"))
            self.run_id = run.info.run_id
            values = [self.Param(k, str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(values), 100):  # MLflow takes at most 100 params a batch
                self.client.log_batch(self.run_id, params=values[i:i + 100])

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                log.warning("logger=mlflow: the run %s of this run directory is not in %s; a new run continues it "
                            "(tag resumed_from)", run_id, self.tracking_uri)
                return False
            raise
        return True

    def _metrics(self, values: dict[str, float], step: int) -> None:
        now = int(pd.Timestamp.now().timestamp() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, v, now, step) for k, v in values.items()])

    def epoch(self, fold: int, epoch: int, values: dict[str, float]) -> None:
        self._metrics(values, epoch)

    def results(self, numbers: dict[str, float], files: list[Path]) -> None:
        self._metrics(numbers, 0)
        for path in files:
            self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        try:
            self.client.set_terminated(self.run_id, status=status)
        finally:
            self._restore_environment()


class _Wandb(_Backend):
    """A W&B run, ``mode=offline`` unless configured (``wandb sync RUN_DIR/wandb/offline-run-*`` uploads it)."""

    name = "wandb"

    def __init__(self, settings: Mapping) -> None:
        self.settings = dict(settings)

    def start(self, run_dir: Path, params: dict, tags: dict, run_id: str | None) -> str | None:
        import wandb

        self.wandb = wandb
        mode = self.settings.get("mode") or "offline"
        if mode == "online" and not (os.environ.get("WANDB_API_KEY") or wandb.api.api_key):
            raise RuntimeError("logger.wandb.mode=online needs a W&B API key (wandb login, or WANDB_API_KEY); "
                               "without one wandb.init would wait for a login prompt")
        self.run = wandb.init(project=self.settings.get("project") or "melanoma", entity=self.settings.get("entity"),
                              mode=mode, dir=str(run_dir),
                              id=run_id or uuid.uuid4().hex[:12], resume="allow", config=params,
                              group=tags.get("sweep"), name=tags.get("run_name"),
                              tags=[f"{k}={v}"[:64] for k, v in tags.items() if k in ("model", "commit")],
                              settings=wandb.Settings(silent=True, console="off"))
        self.folds: set[int] = set()
        return self.run.id

    def epoch(self, fold: int, epoch: int, values: dict[str, float]) -> None:
        if fold not in self.folds:  # each fold's curves against its own epochs, not W&B's global step
            self.run.define_metric(f"fold{fold}/*", step_metric=f"fold{fold}/epoch")
            self.folds.add(fold)
        self.run.log(values | {f"fold{fold}/epoch": epoch})

    def results(self, numbers: dict[str, float], files: list[Path]) -> None:
        self.run.summary.update(numbers)
        images = {f"figures/{p.stem}": self.wandb.Image(str(p)) for p in files if p.suffix == ".png"}
        if images:
            self.run.log(images)
        artifact = self.wandb.Artifact(f"run-{self.run.id}", type="run-files")
        for path in files:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


_CLASSES: dict[str, Callable[[Mapping], _Backend]] = {"csv": _Csv, "tensorboard": _TensorBoard, "mlflow": _MLflow,
                                                      "wandb": _Wandb}


def check_settings(settings: Mapping[str, Any] | None) -> list[str]:
    """The backends ``settings`` (the ``logger`` config group) turns on, after checking that their packages import.

    Raises:
        ConfigError: an unknown backend, or one whose package is not installed (naming the extra).
    """
    names = list((settings or {}).keys())
    for name in names:
        if name not in _CLASSES:
            raise ConfigError(f"logger.{name} is not one of {', '.join(BACKENDS)}")
        _require(name)
    return names


def saved_ids(run_dir: Path) -> dict[str, str]:
    """The tracked runs' ids a run recorded: ``tracking.json``, else the newest ``fold*/last.pt`` holding them."""
    path = run_dir / IDS
    if path.is_file():
        with contextlib.suppress(OSError, ValueError, TypeError):
            return {str(k): str(v) for k, v in dict(json.loads(path.read_text())).items()}
    for last in sorted(run_dir.glob("fold*/last.pt"), key=lambda p: p.stat().st_mtime, reverse=True):
        with contextlib.suppress(Exception):
            ids = load_checkpoint(last).get("tracking")
            if ids:
                return dict(ids)
    return {}


class Trackers:
    """The backends of one training run. Every call is safe: a failing backend warns once and is dropped.

    Args:
        settings: the ``logger`` config group: one entry per backend with its settings (empty: no tracking).
        run_dir: the run's directory (event files, the CSV, W&B's offline folder, ``tracking.json``).
        config: the resolved run config, logged as flattened params.
        tags: model, data root, commit, sweep, ... (strings).
    """

    def __init__(self, settings: Mapping[str, Any] | None, run_dir: Path, config: Mapping,
                 tags: Mapping[str, Any]) -> None:
        self.run_dir = Path(run_dir)
        self.backends: list[_Backend] = [_CLASSES[name](value or {}) for name, value in (settings or {}).items()]
        self.ids: dict[str, str] = {}
        if not self.backends:
            return
        params = {k: v for k, v in flatten(config).items() if k.split(".")[0] not in ("logger", "resume")}
        previous = saved_ids(self.run_dir)
        tags = {k: str(v) for k, v in tags.items() if v is not None}
        for backend in list(self.backends):
            with self._guard(backend, "start"):
                run_id = backend.start(self.run_dir, params, tags, previous.get(backend.name))
                if run_id is not None:
                    self.ids[backend.name] = run_id
        # Every id the run ever had: a backend that is not chosen (or failed) this time keeps its run for the next
        self.ids = previous | self.ids
        if self.ids and self.ids != previous:
            with contextlib.suppress(OSError, MelanomaError), atomic_path(self.run_dir / IDS) as tmp:
                tmp.write_text(json.dumps(self.ids, indent=2))

    @contextlib.contextmanager
    def _guard(self, backend: _Backend, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:  # a tracker must never stop training
            if backend in self.backends:
                self.backends.remove(backend)
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                log.warning("logger=%s failed at %s (%s: %s); tracking by it is off for the rest of the run, "
                            "training goes on", backend.name, what, type(exc).__name__, first)

    def log_epoch(self, fold: int, row: Mapping[str, Any]) -> None:
        """One epoch's ``history.csv`` row of ``fold``, as ``fold{k}/<column>`` at step = epoch."""
        values = {f"fold{fold}/{k}": float(v) for k, v in row.items() if k != "epoch" and isinstance(v, int | float)
                  and v is not None and math.isfinite(v)}
        for backend in list(self.backends):
            with self._guard(backend, f"fold {fold}, epoch {row['epoch']}"):
                backend.epoch(fold, int(row["epoch"]), values)

    def log_results(self, metrics: Mapping, files: Sequence[Path] | None = None) -> None:
        """The final numbers of ``metrics.json`` and the run's files (default: :data:`ARTIFACTS` in the run dir)."""
        numbers = final_numbers(metrics)
        if files is None:
            files = sorted({p for pattern in ARTIFACTS for p in self.run_dir.glob(pattern) if p.is_file()})
        for backend in list(self.backends):
            with self._guard(backend, "the results"):
                backend.results(numbers, list(files))

    def close(self, status: str = "FINISHED") -> None:
        """End every tracked run: ``FINISHED``, ``FAILED`` or ``KILLED`` (interrupted: ``resume=`` reopens it)."""
        for backend in list(self.backends):
            with self._guard(backend, "the end"):
                backend.close(status)
        self.backends = []


@contextlib.contextmanager
def tracked(settings: Mapping[str, Any] | None, run_dir: Path, config: Mapping,
            tags: Mapping[str, Any]) -> Iterator[Trackers]:
    """:class:`Trackers` open for the body: ``FINISHED`` when it returns, ``KILLED`` when it is interrupted
    (Ctrl-C, SIGTERM: ``resume=`` reopens the same tracked run), ``FAILED`` when it raises."""
    trackers = Trackers(settings, run_dir, config, tags)
    try:
        yield trackers
    except (TrainingInterrupted, KeyboardInterrupt):
        trackers.close("KILLED")
        raise
    except BaseException:
        trackers.close("FAILED")
        raise
    trackers.close("FINISHED")
