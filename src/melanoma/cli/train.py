"""``melanoma-train``: k-fold cross-validation of one backbone, configured by Hydra.

This is the only module of the training path that reads the Hydra config: it unpacks it
into plain arguments for the data, folds, models, engine, metrics and plots modules.

    melanoma-train model=efficientnet_b0
    melanoma-train experiment=demo
    melanoma-train -m model=resnet34,resnext101,mobilenet_v2,efficientnet_b0
    melanoma-train hparams=seed_grid
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path

import hydra
import pandas as pd
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from melanoma.audit import add_fold_crossings, patient_leaks, patient_warning, summary_line
from melanoma.cache import build_cache
from melanoma.checkpoint import CONFIG, comparable, config_changes, run_lock, write_csv, write_json
from melanoma.cli import check_overrides
from melanoma.cli.schema import validate
from melanoma.crossval import (
    THRESHOLD,
    LoaderSettings,
    TrainSettings,
    cross_validate,
    load_training_set,
    record_run,
    tta_oof_probs,
    write_results,
)
from melanoma.data import check_location, load_records, resolve_num_workers, split_records
from melanoma.errors import (
    ConfigError,
    TrainingInterrupted,
    catch_stop_signals,
    interrupt_training,
    log_to_file,
    report_user_errors,
)
from melanoma.folds import make_folds, merge_groups
from melanoma.metadata import parse_columns
from melanoma.metrics import degenerate_operating_point, objective
from melanoma.models import create_model, model_data_config
from melanoma.optim import OptimizerSettings, ScheduleSettings
from melanoma.plots import plot_run
from melanoma.provenance import git_commit
from melanoma.runtime import RUNTIME_KEYS, broadcast, rank0_first, resolve_runtime
from melanoma.tracking import Trackers, check_settings, tracked
from melanoma.transforms import (
    build_pipeline,
    describe_vignette,
    resolve_preprocess,
    split_augmentation,
    vignette_warning,
)

log = logging.getLogger("melanoma.train")


def _say(text: str) -> None:
    """Print for people, and keep it in the run's train.log."""
    print(text)
    log_to_file("melanoma.train", logging.INFO, text)


def _format_table(per_fold: list[dict], mean: dict, std: dict) -> str:
    """The seed-style results table: one row per fold, then mean ± std."""
    keys = ["accuracy", "f1", "precision", "recall", "auc"]
    rows = {f"fold {m['fold']}": [m[k] for k in keys] for m in per_fold}
    frame = pd.DataFrame(rows, index=keys).T.map(lambda v: "n/a" if v is None else f"{v:.4f}")
    frame.loc["mean ± std"] = [
        "n/a" if mean[k] is None else f"{mean[k]:.4f} ± {std[k]:.4f}" for k in keys
    ]
    return frame.to_string()


def _selection_note(metrics: dict) -> str:
    """A line on how much choosing each fold's best epoch on its own validation fold flatters the CV AUC."""
    best, last = metrics["mean"]["auc"], metrics["mean"]["last_epoch_auc"]
    if best is None or last is None or best <= last:  # e.g. every fold's last epoch was its best
        return ""
    return (f"\nmean AUC at each fold's last epoch: {last:.4f} (the best epochs were chosen on the validation folds "
            f"themselves, so the CV AUC above is optimistic by up to {best - last:+.4f})")


def _tta_note(metrics: dict, operating_point: str) -> str:
    """A line per TTA mode with its own threshold at the operating point, and what it kept out of fold."""
    lines = [f"\nwith tta={mode} (eval.tta={mode} uses it): {operating_point} threshold "
             f"{chosen[operating_point]:.3g}, sensitivity {at['sensitivity']:.3f}, specificity {at['specificity']:.3f}"
             for mode, chosen in metrics.get("thresholds_by_tta", {}).items()
             if (at := metrics["oof_at_thresholds_by_tta"][mode].get(operating_point))]
    return "".join(lines)


def train(cfg: DictConfig, run_dir: Path, sweep: dict | None = None) -> dict:
    """Cross-validate the configured model and write every output into ``run_dir``.

    The run directory has one owner: rank 0 holds its lock (``checkpoint.run_lock``) from start to end,
    and rank 0 alone tracks the run (``logger=``); ``sweep`` (``{"sweep": DIR, "job": N}`` in a Hydra
    multirun) tags the tracked run with its sweep.

    Returns:
        The content of ``metrics.json`` (empty on ranks other than 0 under torchrun).
    """
    validate(cfg, "train")  # every key's type, range and choices, before anything is read or written
    loggers = _loggers(cfg)
    check_settings(loggers)  # a logger whose package is missing: one line
    if cfg.resume is not None and not (Path(str(cfg.resume)).expanduser() / "folds.csv").is_file():
        raise ConfigError(f"resume={cfg.resume} holds no melanoma-train run (no folds.csv); point it at the folder "
                          "of an interrupted run, or leave resume= out to start a new one")
    main = int(os.environ.get("RANK", "0")) == 0
    with run_lock(run_dir) if main else contextlib.nullcontext():
        config = OmegaConf.to_container(cfg, resolve=True)
        recorded = run_dir / CONFIG
        if cfg.resume is not None and recorded.is_file():  # refused before a tracked run is reopened
            saved = comparable(yaml.safe_load(recorded.read_text()) or {})
            if saved != comparable(config):
                raise ConfigError(f"{recorded} was written by a run with another config "
                                  f"({config_changes(saved, comparable(config))}); resume with the same overrides, "
                                  "or train into a new run directory")
        with tracked(loggers if main else None, run_dir, config, _tags(config, run_dir, sweep or {})) as trackers:
            return _train(cfg, run_dir, trackers)


def _loggers(cfg: DictConfig) -> dict:
    """The ``logger`` group as plain values: one entry per chosen backend (empty for ``logger=none``)."""
    node = cfg.get("logger")
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def _tags(config: dict, run_dir: Path, sweep: dict) -> dict:
    """What a tracked run is found by: the model, the data, the commit, the sweep and the job."""
    data = config["data"]
    name = f"{Path(sweep['sweep']).name}/{sweep['job']}" if sweep else run_dir.name
    return {"model": config["model"]["name"], "data": data.get("manifest") or data.get("root"),
            "commit": git_commit()[0], "run_dir": str(run_dir.resolve()), "run_name": name,
            "sweep": sweep.get("sweep"), "job": sweep.get("job")}


def _check_resumed_folds(path: Path, fold_by_path: dict[str, int]) -> None:
    """Refuse a resume whose folds, computed again, are not the ones its finished folds were trained on."""
    saved = pd.read_csv(path)
    moved = sum(fold_by_path.get(p) != f for p, f in zip(saved["path"], saved["fold"], strict=True))
    moved += len(set(fold_by_path) - set(saved["path"]))
    if moved:
        raise ConfigError(f"{path}: {moved} of {len(saved)} images fall in another fold now than when the run "
                          "started (the data, or the duplicate audit of a newer melanoma, changed); resume with the "
                          "data and melanoma version that started the run, or train into a new run directory")


def _train(cfg: DictConfig, run_dir: Path, trackers: Trackers) -> dict:
    start = time.perf_counter()
    config = OmegaConf.to_container(cfg, resolve=True)
    operating_point = str(cfg.cv.operating_point)
    trainer = config["trainer"]
    optimizer, schedule = OptimizerSettings(**config["optimizer"]), ScheduleSettings(**config["scheduler"])
    settings = TrainSettings(**{k: v for k, v in trainer.items() if k not in RUNTIME_KEYS})
    runtime = resolve_runtime(**{k: trainer[k] for k in RUNTIME_KEYS}, image_size=config["data"]["image_size"])
    run_dir = broadcast(run_dir, runtime)  # torchrun: every rank uses rank 0's run directory
    main = runtime.is_main
    log.info("device %s, precision %s, rank %d of %d", runtime.device, runtime.precision, runtime.rank,
             runtime.world_size)

    m, data = config["model"], config["data"]
    metadata = parse_columns(data["metadata"])  # model.fusion without metadata: refused by the schema
    group_column = data["group_column"]
    columns = [*metadata, *([group_column] if group_column and group_column not in metadata else [])]
    records = None
    if not data["synthetic"]:  # the data first: a missing folder fails in seconds, before weights are fetched
        records = load_records(data["layout"], data["root"], data["classes"], data["manifest"],
                               columns=columns)
        split_records(records, "train", tuple(data["classes"]))

    def model_factory() -> torch.nn.Module:
        return create_model(m["name"], m["pretrained"], m["weights"], drop_rate=m["drop_rate"],
                            strict_weights=m["strict_weights"])

    probe = model_factory()  # fails early on bad names/weights
    overrides, augmentation = split_augmentation(config["augmentation"])
    preprocess = resolve_preprocess(data["image_size"], model_data_config(probe), **overrides)
    pipeline = build_pipeline(preprocess, **augmentation)
    del probe
    if main:
        record_run(run_dir, config, preprocess.to_dict(), overwrite=False)

    audit = config["audit"]
    training = load_training_set(data["layout"], data["root"], data["classes"], data["manifest"], data["on_bad_file"],
                                 data["synthetic"], audit=audit["enabled"], audit_threshold=audit["threshold"],
                                 audit_workers=audit["workers"], audit_method=audit["method"],
                                 audit_similarity=audit["similarity"], records=records, columns=columns)
    train_set, bad = training.records, training.skipped
    labels = train_set["label"].to_numpy()
    grouped = cfg.cv.group_duplicates and training.summary is not None
    if cfg.cv.group_duplicates and not grouped:
        log.warning("audit.enabled=false: folds are not grouped by duplicates (cv.group_duplicates ignored)")
    keys = ([train_set["group"]] if grouped else []) + ([train_set[group_column]] if group_column else [])
    if keys:  # one fold per duplicate group and per patient, joined where they overlap
        train_set = train_set.assign(group=merge_groups(*keys))
    fold_of = make_folds(labels, cfg.cv.folds, cfg.cv.seed, train_set["group"].to_numpy() if keys else None)
    shown = ["group"] if "group" in train_set else []
    shown += [group_column] if group_column else []
    columns = ["path", "label", "fold", *dict.fromkeys(shown)]
    if cfg.resume is not None:
        _check_resumed_folds(run_dir / "folds.csv", dict(zip(train_set["path"], fold_of.tolist(), strict=True)))
    if main:
        write_csv(train_set.assign(fold=fold_of)[columns], run_dir / "folds.csv")
    # data.group_column needs data=csv, so the records of every split were read above
    patients = patient_leaks(records, group_column) if group_column else None
    if training.summary is not None and main:
        training.summary["patients"] = patients
        add_fold_crossings(training.pairs, training.summary, dict(zip(train_set["path"], fold_of, strict=True)))
        write_json(training.summary, run_dir / "audit.json")
        write_csv(training.pairs, run_dir / "duplicates.csv")
        _say(f"audit: {summary_line(training.summary)}; {training.summary['pairs_crossing_folds']} pairs cross "
             "folds")
    if main and (warning := patient_warning(patients)):
        log.warning("%s", warning)
    log.info("%d training images (%d malignant), %d folds; %d unreadable skipped",
             len(train_set), labels.sum(), cfg.cv.folds, len(bad))

    workers = resolve_num_workers(data["num_workers"])
    vignette = f" + {drawn}" if (drawn := describe_vignette(augmentation)) else ""
    log.info("augmentation '%s'%s: %s, %d loader workers", augmentation.get("name"), vignette,
             "crops in the workers, the rest batched on the device" if pipeline.device is not None
             else "all in the workers", workers)
    if main and (warning := vignette_warning(augmentation)):
        log.warning("%s", warning)
    # Decoded once for all folds and epochs; the default edge keeps validation tensors bit-identical.
    # Under torchrun rank 0 writes the disk cache while the others wait, then they map its file.
    with rank0_first(runtime, enabled=data["cache"] == "disk"):
        decoded = build_cache(train_set["path"].tolist(), data["cache_edge"] or preprocess.resize, data["cache"],
                              data["cache_dir"], interpolation=preprocess.interpolation,
                              digests=train_set["sha256"].tolist() if "sha256" in train_set else None)
    if runtime.distributed and data["cache"] == "memory" and main:
        log.info("data.cache=memory: each of the %d ranks decodes the images itself; data.cache=disk decodes "
                 "them once for all", runtime.world_size)
    # Layer-wise decay protects pretrained features; a randomly initialised body has none to protect.
    if optimizer.layer_decay is not None and not (m["pretrained"] or m["weights"]):
        log.info("the model starts from random init: optimizer.layer_decay=%s is not applied", optimizer.layer_decay)
        optimizer.layer_decay = None
    cv = cross_validate(
        train_set[["path", "label", *metadata]], fold_of, model_factory, pipeline, runtime, run_dir,
        optimizer=optimizer, schedule=schedule, train=settings,
        loader=LoaderSettings(data["batch_size"], data["eval_batch_size"], workers, data["prefetch_factor"],
                              balanced=data["sampler"] == "balanced"),
        decoded=decoded, seed=cfg.seed, calibrate=cfg.cv.calibration == "temperature", config=config,
        classes=data["classes"], metadata=metadata, fusion=m["fusion"], on_epoch=trackers.log_epoch,
        state_extra={"tracking": trackers.ids} if trackers.ids else None)
    if not main:
        return {}
    # the OOF predictions again with each TTA mode, as melanoma-eval makes them, for thresholds of their own
    tta_probs = tta_oof_probs(cv, train_set[["path", "label", *metadata]], run_dir, runtime, config["cv"]["oof_tta"],
                              data["eval_batch_size"] or 2 * data["batch_size"], workers) if cfg.cv.oof_tta else None
    metrics = write_results(cv, run_dir, m["name"], operating_point, cfg.cv.calibration, trainer["monitor"],
                            tta_probs=tta_probs,
                            n_images=int(len(train_set)), n_positive=int(labels.sum()), n_skipped=len(bad),
                            grouped_folds=bool(keys), group_column=group_column, patients=patients,
                            runtime={"device": runtime.device.type, "precision": runtime.precision,
                                     "channels_last": runtime.channels_last},  # what `auto` resolved to here
                            skipped_files=[{"path": p, "reason": r} for p, r in bad])
    record_run(run_dir, config, preprocess.to_dict())
    plot_run(run_dir)  # confusion matrices at the operating point the ROC and calibration plots mark
    at_point, threshold = metrics["oof_at_thresholds"][operating_point], metrics["thresholds"][operating_point]
    _say(f"\n{m['name']}, {cfg.cv.folds}-fold cross-validation (threshold {THRESHOLD}):\n"
         + _format_table(metrics["folds"], metrics["mean"], metrics["std"])
         + f"\npooled out-of-fold: AUC {metrics['oof']['auc']:.4f}; at the {operating_point} threshold "
         f"{threshold:.3g} sensitivity {at_point['sensitivity']:.3f}, specificity "
         f"{at_point['specificity']:.3f}; {time.perf_counter() - start:.0f} s; outputs in {run_dir}"
         + _selection_note(metrics) + _tta_note(metrics, operating_point))
    warning = degenerate_operating_point(operating_point, threshold, at_point)
    if warning:
        log.warning("%s", warning)
    trackers.log_results(metrics)
    return metrics


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    """Hydra's entry: returns the mean monitored metric, for sweepers that optimise it."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    # SIGTERM (SLURM preemption, kill) and Ctrl-C stop at once: the files of the last completed
    # epoch are complete (atomic writes), and resume= goes on from them.
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    sweep = {"sweep": str(Path(hydra_cfg.sweep.dir).resolve()), "job": hydra_cfg.job.num} if multirun else None
    try:
        with catch_stop_signals(interrupt_training):
            metrics = report_user_errors("melanoma-train", train, cfg, run_dir, sweep, multirun=multirun)
    except TrainingInterrupted as exc:
        message = f"melanoma-train: interrupted by {exc}; resume with: melanoma-train <same overrides> resume={run_dir}"
        print(message, file=sys.stderr)
        log_to_file("melanoma-train", logging.WARNING, message)
        raise SystemExit(128 + getattr(signal, str(exc)).value) from None
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if not metrics:  # ranks > 0 under torchrun return nothing
        return None
    return objective(metrics, cfg.trainer.monitor)


def _preflight(cfg: DictConfig) -> None:
    """Mistakes found before the run folder exists (one line, nothing left behind): a logger whose package is
    missing, a data folder or manifest that does not exist."""
    check_settings(_loggers(cfg))
    if not cfg.data.synthetic:  # generated data writes its own folder
        check_location(cfg.data.layout, cfg.data.root, cfg.data.manifest)


def main() -> None:
    """Console entry point ``melanoma-train``."""
    check_overrides("melanoma-train", "train", preflight=_preflight)
    _hydra_main()


if __name__ == "__main__":
    main()
