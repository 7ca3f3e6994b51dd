"""``melanoma-train``: k-fold cross-validation of one backbone, configured by Hydra.

This is the only module of the training path that reads the Hydra config: it unpacks it
into plain arguments for the data, folds, models, engine, metrics and plots modules.

    melanoma-train model=efficientnet_b0
    melanoma-train experiment=demo
    melanoma-train -m model=resnet34,resnext101,mobilenet_v2,efficientnet_b0
    melanoma-train hparams=seed_grid
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import hydra
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

import melanoma.configs  # noqa: F401  (registers the config resolvers)
from melanoma.audit import add_fold_crossings, audit_records, summary_line
from melanoma.cache import build_cache
from melanoma.calibration import apply_temperature, fit_temperature
from melanoma.checkpoint import update_checkpoint, write_csv, write_json
from melanoma.data import (
    ImageDataset,
    handle_bad_files,
    load_records,
    make_loader,
    resolve_num_workers,
    scan_images,
    split_records,
)
from melanoma.engine import fit, make_loss
from melanoma.errors import ConfigError, TrainingInterrupted, report_user_errors
from melanoma.folds import make_folds
from melanoma.metrics import METRICS, binary_metrics, choose_thresholds, degenerate_operating_point, summarize
from melanoma.models import create_model, model_normalization
from melanoma.optim import create_optimizer, create_scheduler
from melanoma.plots import plot_run
from melanoma.runtime import broadcast, rank0_first, resolve_runtime, seed_everything
from melanoma.synthetic import generate_dataset
from melanoma.transforms import build_pipeline, eval_resize

log = logging.getLogger("melanoma.train")
THRESHOLD = 0.5
OPERATING_POINTS = ("0.5", "youden", "sens95")


def _env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def load_training_set(data: DictConfig, audit: DictConfig) -> tuple[pd.DataFrame, list, tuple | None]:
    """The training split named by the ``data`` config group, audited, with unreadable files handled.

    Returns:
        ``(records with path, label[, group])``, ``(path, reason)`` of each skipped file, and
        ``(duplicate pairs, audit summary)`` when the audit is enabled, else ``None``.
    """
    if data.synthetic:
        generate_dataset(data.root, **data.synthetic)
    classes = tuple(data.classes)
    records = load_records(data.layout, data.root, classes, data.manifest)
    train_set = split_records(records, "train", classes)  # fails early on a missing or one-class split
    if not audit.enabled:
        bad = scan_images(train_set["path"].tolist(), data.on_bad_file)
        train_set = train_set[~train_set["path"].isin({p for p, _ in bad})]
        return split_records(train_set, "train", classes)[["path", "label"]], bad, None
    images, pairs, summary = audit_records(records, audit.threshold, workers=audit.workers, classes=classes)
    train_images = images[images["split"] == "train"]
    unreadable = train_images[train_images["error"].notna()]
    bad = handle_bad_files(list(unreadable[["path", "error"]].itertuples(index=False, name=None)), data.on_bad_file)
    train_set = split_records(train_images[train_images["error"].isna()], "train", classes)
    return train_set[["path", "label", "group"]], bad, (pairs, summary)


def _format_table(per_fold: list[dict], mean: dict, std: dict) -> str:
    """The seed-style results table: one row per fold, then mean ± std."""
    keys = ["accuracy", "f1", "precision", "recall", "auc"]
    rows = {f"fold {m['fold']}": [m[k] for k in keys] for m in per_fold}
    frame = pd.DataFrame(rows, index=keys).T.map(lambda v: "n/a" if v is None else f"{v:.4f}")
    frame.loc["mean ± std"] = [
        "n/a" if mean[k] is None else f"{mean[k]:.4f} ± {std[k]:.4f}" for k in keys
    ]
    return frame.to_string()


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Cross-validate the configured model and write every output into ``run_dir``.

    Returns:
        The content of ``metrics.json``.
    """
    start = time.perf_counter()
    config = OmegaConf.to_container(cfg, resolve=True)
    operating_point = str(cfg.cv.operating_point)
    if operating_point not in OPERATING_POINTS:
        raise ConfigError(f"cv.operating_point={operating_point} is not one of {', '.join(OPERATING_POINTS)}")
    if cfg.cv.calibration not in ("temperature", "none"):
        raise ConfigError(f"cv.calibration={cfg.cv.calibration!r} is not one of temperature, none")
    calibrate = cfg.cv.calibration == "temperature"
    runtime = resolve_runtime(cfg.trainer.device, cfg.trainer.precision, cfg.trainer.channels_last)
    run_dir = broadcast(run_dir, runtime)  # torchrun: every rank uses rank 0's run directory
    main = runtime.is_main
    log.info("device %s, precision %s, rank %d of %d", runtime.device, runtime.precision, runtime.rank,
             runtime.world_size)

    m = cfg.model
    probe = create_model(m.name, m.pretrained, m.weights, drop_rate=m.drop_rate)  # fails early on bad names/weights
    size = cfg.data.image_size
    pipeline = build_pipeline(size, *model_normalization(probe), **OmegaConf.to_container(cfg.augmentation,
                                                                                          resolve=True))
    del probe

    train_set, bad, audit = load_training_set(cfg.data, cfg.audit)
    labels = train_set["label"].to_numpy()
    groups = train_set["group"].to_numpy() if cfg.cv.group_duplicates and audit is not None else None
    if cfg.cv.group_duplicates and audit is None:
        log.warning("audit.enabled=false: folds are not grouped by duplicates (cv.group_duplicates ignored)")
    fold_of = make_folds(labels, cfg.cv.folds, cfg.cv.seed, groups)
    columns = ["path", "label", "fold"] + (["group"] if audit is not None else [])
    if main:
        write_csv(train_set.assign(fold=fold_of)[columns], run_dir / "folds.csv")
    if audit is not None and main:
        pairs, summary = audit
        add_fold_crossings(pairs, summary, dict(zip(train_set["path"], fold_of, strict=True)))
        write_json(summary, run_dir / "audit.json")
        write_csv(pairs, run_dir / "duplicates.csv")
        print(f"audit: {summary_line(summary)}; {summary['pairs_crossing_folds']} pairs cross folds")
    log.info("%d training images (%d malignant), %d folds; %d unreadable skipped",
             len(train_set), labels.sum(), cfg.cv.folds, len(bad))

    workers = resolve_num_workers(cfg.data.num_workers)
    log.info("augmentation '%s': %s, %d loader workers", cfg.augmentation.name,
             "crops in the workers, the rest batched on the device" if pipeline.device is not None
             else "all in the workers", workers)
    preprocess = {"image_size": size, "mean": pipeline.mean, "std": pipeline.std, "crop_pct": pipeline.crop_pct}
    # Decoded once for all folds and epochs; the default edge keeps validation tensors bit-identical.
    # Under torchrun rank 0 writes the disk cache while the others wait, then they map its file.
    with rank0_first(runtime, enabled=cfg.data.cache == "disk"):
        decoded = build_cache(train_set["path"].tolist(), cfg.data.cache_edge or eval_resize(size, pipeline.crop_pct),
                              cfg.data.cache, cfg.data.cache_dir)
    if runtime.distributed and cfg.data.cache == "memory" and main:
        log.info("data.cache=memory: each of the %d ranks decodes the images itself; data.cache=disk decodes "
                 "them once for all", runtime.world_size)
    # Layer-wise decay protects pretrained features; a randomly initialised body has none to protect.
    layer_decay = cfg.optimizer.layer_decay if m.pretrained or m.weights else None
    if layer_decay is None and cfg.optimizer.layer_decay is not None:
        log.info("the model starts from random init: optimizer.layer_decay=%s is not applied",
                 cfg.optimizer.layer_decay)
    batch_sizes = {True: cfg.data.batch_size, False: cfg.data.eval_batch_size or 2 * cfg.data.batch_size}
    per_fold, oof, temperatures = [], [], []
    for k in range(cfg.cv.folds):
        tr, va = train_set[fold_of != k], train_set[fold_of == k]
        assert not set(tr["path"]) & set(va["path"]), "a validation image leaked into training"
        seed_everything(cfg.seed + k, cfg.trainer.deterministic)
        model = create_model(m.name, m.pretrained, m.weights, drop_rate=m.drop_rate)
        model = model.to(runtime.device, memory_format=runtime.memory_format)
        if runtime.distributed:
            model = DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.device.index
                                            is not None else None)
        if cfg.trainer.compile:
            model = torch.compile(model)
        rank, world = runtime.rank, runtime.world_size
        loaders = [
            make_loader(ImageDataset(part["path"], part["label"], tf, decoded), batch_sizes[is_train],
                        train=is_train, num_workers=workers, seed=cfg.seed + k,
                        pin_memory=runtime.device.type == "cuda", persistent_workers=not cfg.trainer.deterministic,
                        rank=rank, world_size=world, prefetch_factor=cfg.data.prefetch_factor)
            for part, tf, is_train in ((tr, pipeline.train, True), (va.iloc[rank::world], pipeline.eval, False))
        ]
        o, sch = cfg.optimizer, cfg.scheduler
        optimizer = create_optimizer(model, o.name, o.lr, o.weight_decay, o.momentum,
                                     fused=runtime.device.type == "cuda", layer_decay=layer_decay)
        scheduler = create_scheduler(optimizer, sch.name, cfg.trainer.epochs, sch.min_lr, sch.warmup_epochs,
                                     sch.warmup_lr, steps_per_epoch=len(loaders[0]))
        result = fit(model, *loaders, va["label"].to_numpy(), optimizer, scheduler,
                     make_loss(cfg.trainer.pos_weight, tr["label"].to_numpy()), runtime, cfg.trainer.epochs,
                     run_dir / f"fold{k}", config, cfg.trainer.monitor, fold=k,
                     checkpoint_extra={"preprocess": preprocess, "classes": list(cfg.data.classes)},
                     skip_nonfinite=cfg.trainer.skip_nonfinite, device_transform=pipeline.device,
                     clip_grad_norm=cfg.trainer.clip_grad_norm, ema_decay=cfg.trainer.ema_decay)
        # Each fold model gets its own temperature, fitted on its validation fold: the ensemble then
        # averages probabilities of one scale, and the OOF thresholds below hold for it.
        temperature = fit_temperature(va["label"], result.probs) if calibrate else 1.0
        temperatures.append(temperature)
        per_fold.append({"fold": k, "best_epoch": result.best_epoch, "temperature": temperature} | result.metrics)
        oof.append(va.assign(fold=k, prob=apply_temperature(result.probs, temperature), prob_uncalibrated=result.probs))
        log.info("fold %d: best epoch %d, val auc %s, temperature %.3f", k, result.best_epoch, result.metrics["auc"],
                 temperature)

    oof = pd.concat(oof).sort_index()
    mean_m, std_m = summarize(per_fold, METRICS)
    # Operating points come from out-of-fold predictions only: the test split is never looked at.
    thresholds = choose_thresholds(oof["label"], oof["prob"])
    if not main:
        return {}
    at_thresholds = {name: binary_metrics(oof["label"], oof["prob"], t) for name, t in thresholds.items()}
    write_csv(oof[["path", "label", "fold", "prob", "prob_uncalibrated"]], run_dir / "oof_predictions.csv")
    for k in range(cfg.cv.folds):
        update_checkpoint(run_dir / f"fold{k}" / "best.pt", thresholds=thresholds, operating_point=operating_point,
                          temperature=temperatures[k], oof_at_thresholds=at_thresholds)
    metrics = {
        "model": m.name,
        "threshold": THRESHOLD,
        "monitor": cfg.trainer.monitor,
        "folds": per_fold,
        "mean": mean_m,
        "std": std_m,
        "oof": binary_metrics(oof["label"], oof["prob"], THRESHOLD),
        "thresholds": thresholds,
        "operating_point": operating_point,
        "calibration": cfg.cv.calibration,
        "oof_uncalibrated": binary_metrics(oof["label"], oof["prob_uncalibrated"], THRESHOLD),
        "oof_at_thresholds": at_thresholds,
        "n_images": int(len(train_set)),
        "n_positive": int(labels.sum()),
        "n_skipped": len(bad),
        "grouped_folds": groups is not None,
        "skipped_files": [{"path": p, "reason": r} for p, r in bad],
    }  # no wall time here: a resumed run's metrics.json equals an uninterrupted one's (see history.csv)
    write_json(metrics, run_dir / "metrics.json")
    plot_run(run_dir, THRESHOLD)
    print(f"\n{m.name}, {cfg.cv.folds}-fold cross-validation (threshold {THRESHOLD}):")
    print(_format_table(per_fold, mean_m, std_m))
    at_point = at_thresholds[operating_point]
    print(f"pooled out-of-fold: AUC {metrics['oof']['auc']:.4f}; at the {operating_point} threshold "
          f"{thresholds[operating_point]:.3g} sensitivity {at_point['sensitivity']:.3f}, specificity "
          f"{at_point['specificity']:.3f}; {time.perf_counter() - start:.0f} s; outputs in {run_dir}")
    warning = degenerate_operating_point(operating_point, thresholds[operating_point], at_thresholds[operating_point])
    if warning:
        log.warning("%s", warning)
    return metrics


# hydra.run.dir is the resumed run's directory when resume= is set, else a new dated one. Under
# torchrun only rank 0 writes Hydra's .hydra/ folder, and other ranks log to train.rank{N}.log.
OmegaConf.register_new_resolver("melanoma_run_dir", lambda resume, new: resume or new, replace=True)
OmegaConf.register_new_resolver("melanoma_rank0_only", lambda value: value if _env_rank() == 0 else None,
                                replace=True)
OmegaConf.register_new_resolver("melanoma_rank_suffix", lambda: f".rank{_env_rank()}" if _env_rank() else "",
                                replace=True)


def _interrupt(signum: int, frame: object) -> None:
    raise TrainingInterrupted(signal.Signals(signum).name)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    """Hydra's entry: returns the mean monitored metric, for sweepers that optimise it."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    # SIGTERM (SLURM preemption, kill) and Ctrl-C stop at once: the files of the last completed
    # epoch are complete (atomic writes), and resume= goes on from them.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        metrics = report_user_errors("melanoma-train", train, cfg, run_dir,
                                     multirun=hydra_cfg.mode == RunMode.MULTIRUN)
    except TrainingInterrupted as exc:
        print(f"melanoma-train: interrupted by {exc}; resume with: melanoma-train <same overrides> "
              f"resume={run_dir}", file=sys.stderr)
        raise SystemExit(128 + getattr(signal, str(exc)).value) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if not metrics or cfg.trainer.monitor == "loss":  # ranks > 0 under torchrun return nothing
        return None
    return metrics["mean"].get(cfg.trainer.monitor)


def main() -> None:
    """Console entry point ``melanoma-train``."""
    _hydra_main()


if __name__ == "__main__":
    main()
