"""k-fold cross-validation of one model: the fold loop, as plain functions with explicit arguments.

:func:`load_training_set` reads and audits the training split, :func:`cross_validate` trains one
model per fold and collects the out-of-fold (OOF) predictions, and :func:`write_results` picks the
operating points on those predictions (never on the test split) and writes ``metrics.json``.
``melanoma-train`` (``cli/train.py``) unpacks its config into these; a notebook can call them directly.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from melanoma.audit import audit_records
from melanoma.cache import DecodedImages
from melanoma.calibration import apply_temperature, fit_temperature
from melanoma.checkpoint import (
    CONFIG,
    PREPROCESS,
    PROVENANCE,
    comparable,
    update_checkpoint,
    write_csv,
    write_json,
    write_yaml,
)
from melanoma.data import ImageDataset, handle_bad_files, load_records, make_loader, scan_images, split_records
from melanoma.engine import fit, make_loss
from melanoma.errors import ConfigError, DataError
from melanoma.fusion import fuse
from melanoma.inference import load_ensemble, predict_paths
from melanoma.metadata import Kind, MetadataEncoder
from melanoma.metrics import METRICS, binary_metrics, choose_thresholds, summarize
from melanoma.optim import OptimizerSettings, ScheduleSettings, create_optimizer, create_scheduler
from melanoma.provenance import provenance
from melanoma.runtime import Runtime, seed_everything
from melanoma.synthetic import generate_dataset
from melanoma.transforms import Pipeline

log = logging.getLogger(__name__)
THRESHOLD = 0.5  # the threshold of the per-fold table, as in the coursework
OPERATING_POINTS = ("0.5", "youden", "sens95")


@dataclass
class TrainSettings:
    """How each fold trains: the ``trainer`` config group, less the runtime keys (device, precision, channels_last).

    Attributes:
        epochs: epochs per fold.
        monitor: validation metric that picks ``best.pt``.
        pos_weight: weight of the malignant class in the BCE loss: ``None``, ``"auto"`` or a number.
        clip_grad_norm: clip the gradients' global L2 norm to this value; ``None`` for none.
        ema_decay: validate and save an EMA of the weights with this decay; ``None`` for none.
        skip_nonfinite: skip batches whose loss is not finite instead of stopping.
        deterministic: identical numbers for identical runs (slower on CUDA).
        compile: ``torch.compile`` each fold model.
    """

    epochs: int
    monitor: str = "auc"
    pos_weight: float | str | None = None
    clip_grad_norm: float | None = None
    ema_decay: float | None = None
    skip_nonfinite: bool = False
    deterministic: bool = False
    compile: bool = False


@dataclass
class LoaderSettings:
    """How images are batched: the loader keys of the ``data`` config group.

    Attributes:
        batch_size: training batch.
        eval_batch_size: validation batch; ``None`` is twice ``batch_size``.
        num_workers: loader processes (already resolved from ``auto``).
        prefetch_factor: batches each worker prepares ahead.
        balanced: draw each class equally often in training (``data.sampler=balanced``).
    """

    batch_size: int
    eval_batch_size: int | None = None
    num_workers: int = 0
    prefetch_factor: int | None = 4
    balanced: bool = False


@dataclass
class TrainingSet:
    """The audited training split.

    Attributes:
        records: ``path, label`` (and ``group``, ``sha256`` when audited), one row per readable image.
        skipped: ``(path, reason)`` of each unreadable file left out.
        pairs: the audit's duplicate pairs, or ``None`` without an audit.
        summary: the audit's summary (``audit.json``), or ``None``.
    """

    records: pd.DataFrame
    skipped: list[tuple[str, str]]
    pairs: pd.DataFrame | None = None
    summary: dict | None = None


@dataclass
class CrossValidation:
    """What the fold loop produced.

    Attributes:
        folds: per fold ``{"fold", "best_epoch", "temperature", <validation metrics at 0.5>}``.
        oof: the OOF predictions, ``path, label, fold, prob, prob_uncalibrated``, in record order.
        temperatures: each fold model's calibration temperature (1.0 uncalibrated).
    """

    folds: list[dict]
    oof: pd.DataFrame
    temperatures: list[float] = field(default_factory=list)


def load_training_set(layout: str, root: str | Path | None, classes: Sequence[str], manifest: str | Path | None = None,
                      on_bad_file: str = "error", synthetic: Mapping | None = None, audit: bool = True,
                      audit_threshold: int = 14, audit_workers: int | None = None, audit_method: str = "phash",
                      audit_similarity: float = 0.92,
                      records: pd.DataFrame | None = None, columns: Sequence[str] = ()) -> TrainingSet:
    """The training split of a dataset, audited, with unreadable files handled by ``on_bad_file``.

    Args:
        layout, root, classes, manifest: where the images are (see :func:`melanoma.data.load_records`).
        on_bad_file: ``error`` or ``skip``.
        synthetic: parameters of :func:`melanoma.synthetic.generate_dataset`, to write the set first.
        audit: hash every image for duplicates and label conflicts (the records then carry a
            duplicate ``group`` and each file's ``sha256``).
        audit_threshold: pHash Hamming distance of a near duplicate.
        audit_workers: hashing processes (``None``: all cores).
        audit_method, audit_similarity: pHash and/or embeddings (:func:`melanoma.audit.audit_records`).
        records: the dataset's records when the caller already listed them (:func:`load_records`).
        columns: further manifest columns to keep (``data.metadata``, ``data.group_column``), when
            ``records`` is not given.

    Raises:
        DataError: the split is missing, holds one class, or holds an unreadable file under ``error``.
    """
    classes = tuple(classes)
    if records is None:
        if synthetic:
            generate_dataset(root, **synthetic)
        records = load_records(layout, root, classes, manifest, columns=columns)
    train_set = split_records(records, "train", classes)  # fails early on a missing or one-class split
    extra = [c for c in records.columns if c not in ("path", "label", "split")]  # the manifest's further columns
    if not audit:
        bad = scan_images(train_set["path"].tolist(), on_bad_file)
        train_set = train_set[~train_set["path"].isin({p for p, _ in bad})]
        return TrainingSet(split_records(train_set, "train", classes)[["path", "label", *extra]], bad)
    images, pairs, summary = audit_records(records, audit_threshold, workers=audit_workers, classes=classes,
                                           method=audit_method, similarity=audit_similarity)
    train_images = images[images["split"] == "train"]
    unreadable = train_images[train_images["error"].notna()]
    bad = handle_bad_files(list(unreadable[["path", "error"]].itertuples(index=False, name=None)), on_bad_file)
    train_set = split_records(train_images[train_images["error"].isna()], "train", classes)
    train_set = train_set[["path", "label", "group", "sha256"]]
    if extra:  # the audit's table holds the files' facts; the manifest's columns come back by path
        train_set = train_set.merge(records[["path", *extra]], on="path", how="left", validate="one_to_one")
    return TrainingSet(train_set, bad, pairs, summary)


def record_run(run_dir: Path, config: Mapping, preprocess: Mapping, overwrite: bool = True) -> None:
    """Write the run's ``config.yaml`` (resolved) and ``preprocess.json``: what reports redraw figures from.

    ``provenance.json`` (the code's commit and the versions, :mod:`melanoma.provenance`) is written once,
    when the run starts: a resumed run keeps the record of the code it started with.

    With ``overwrite=False`` an existing ``config.yaml`` that differs (other than in ``resume``) is left as
    it is: a refused resume must not rewrite the record of the run it refused to change. Where it is the
    same, the run goes on from its files, and its recorded preprocessing must be what is resolved now.

    Raises:
        ConfigError: a resumed run whose ``preprocess.json`` differs (see :func:`check_resumed_preprocess`).
    """
    path = run_dir / CONFIG
    if not overwrite and path.is_file():
        recorded = yaml.safe_load(path.read_text()) or {}
        if comparable(recorded) != comparable(config):
            return
        check_resumed_preprocess(run_dir, preprocess)
    write_yaml(dict(config), path)
    write_json(dict(preprocess), run_dir / PREPROCESS)
    if not (run_dir / PROVENANCE).is_file():
        write_json(provenance(), run_dir / PROVENANCE)


def check_resumed_preprocess(run_dir: Path, preprocess: Mapping) -> None:
    """A resumed run must turn images into tensors as it did: its finished folds were trained that way.

    Args:
        run_dir: the run's folder.
        preprocess: what this environment resolves (:meth:`melanoma.transforms.Preprocess.to_dict`).

    The preprocessing comes from timm's config for the model (``resolve_data_config``), so another timm
    can resolve it differently under the very same overrides.

    Raises:
        ConfigError: ``RUN_DIR/preprocess.json`` records other values than this environment resolves.
    """
    path = run_dir / PREPROCESS
    if not path.is_file():
        return
    recorded = json.loads(path.read_text())
    changed = [f"{k}: {recorded.get(k)!r} -> {v!r}" for k, v in preprocess.items() if recorded.get(k) != v]
    if changed:
        raise ConfigError(f"{path} records another preprocessing than this environment resolves for the same "
                          f"config ({', '.join(changed)}; timm's data config for the model changed?); resume with "
                          "the timm the run trained with, or train into a new run directory")


def _check_free_space(run_dir: Path, model: nn.Module, fold: int) -> None:
    """Refuse to start a fold whose checkpoints cannot fit: best.pt, and last.pt with Adam's two moments."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    need = 5 * weights + 20_000_000  # best.pt + last.pt (weights, 2 optimizer moments), their temporaries, CSVs
    run_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise DataError(f"fold {fold} needs about {need / 1e6:.0f} MB in {run_dir} for its checkpoints and "
                        f"{free / 1e6:.0f} MB are free; free some space or point the run elsewhere (resume= goes on "
                        "from the last complete fold)")


def cross_validate(records: pd.DataFrame, fold_of: np.ndarray, model_factory: Callable[[], nn.Module],
                   pipeline: Pipeline, runtime: Runtime, run_dir: Path, *, optimizer: OptimizerSettings,
                   schedule: ScheduleSettings, train: TrainSettings, loader: LoaderSettings,
                   decoded: DecodedImages | None = None, seed: int = 0, calibrate: bool = True,
                   config: Mapping | None = None, classes: Sequence[str] = ("benign", "malignant"),
                   metadata: Mapping[str, Kind | None] | None = None, fusion: str = "none",
                   on_epoch: Callable[[int, dict], None] | None = None,
                   state_extra: dict | None = None) -> CrossValidation:
    """Train one model per fold and collect its validation (out-of-fold) predictions.

    Fold ``k`` trains on the records whose ``fold_of`` differs from ``k`` and validates on the rest.
    Each fold writes ``run_dir/fold{k}/`` (``history.csv``, ``best.pt``, ``last.pt``, see
    :func:`melanoma.engine.fit`), and a fold whose ``last.pt`` exists goes on from it.

    Args:
        records: ``path, label`` of the training images, and the ``metadata`` columns.
        fold_of: each record's validation fold, ``0 .. folds-1`` (:func:`melanoma.folds.make_folds`).
        model_factory: returns a fresh model on the CPU (called once per fold, after seeding).
        pipeline: the training, evaluation and device transforms, and the preprocessing they record.
        runtime: device, precision and the distributed setting (decided once by the caller).
        run_dir: where the fold folders go.
        optimizer, schedule: the optimizer and learning-rate schedule of each fold.
        train: epochs, monitor, loss weighting, clipping, EMA.
        loader: batch sizes and loader workers.
        decoded: images decoded once (:func:`melanoma.cache.build_cache`), or ``None`` to decode per epoch.
        seed: fold ``k`` is seeded with ``seed + k``.
        calibrate: fit a temperature per fold on its validation fold (:mod:`melanoma.calibration`).
        config: the resolved run config, stored in every checkpoint (and compared on resume).
        classes: negative and positive class names, stored in the checkpoints.
        metadata: columns of ``records`` to encode (:func:`melanoma.metadata.parse_columns`); each fold
            fits its :class:`~melanoma.metadata.MetadataEncoder` on its training part only and stores it
            in its checkpoints.
        fusion: ``none`` (image only) or ``concat`` (:mod:`melanoma.fusion`: the model also sees the metadata).
        on_epoch: called with ``(fold, history row)`` after each epoch (:class:`melanoma.tracking.Trackers`).
        state_extra: further plain values for every ``last.pt`` (the tracked runs' ids).

    Returns:
        The per-fold results and the OOF predictions.
    """
    config = dict(config or {})
    n_folds = int(fold_of.max()) + 1
    batch_sizes = {True: loader.batch_size, False: loader.eval_batch_size or 2 * loader.batch_size}
    extra = {"preprocess": pipeline.preprocess.to_dict(), "classes": list(classes)}
    rank, world = runtime.rank, runtime.world_size
    folds, oof, temperatures = [], [], []
    if metadata:  # each column's kind from every training row (no label is read), so all folds agree on it
        metadata = MetadataEncoder.fit(records, metadata).columns
    for k in range(n_folds):
        tr, va = records[fold_of != k], records[fold_of == k]
        assert not set(tr["path"]) & set(va["path"]), "a validation image leaked into training"
        encoder = MetadataEncoder.fit(tr, metadata) if metadata else None  # this fold's training rows only
        fused = fusion != "none" and encoder is not None
        seed_everything(seed + k, train.deterministic)
        model = fuse(model_factory(), fusion, encoder.width if fused else 0)
        model = model.to(runtime.device, memory_format=runtime.memory_format)
        if runtime.is_main:
            _check_free_space(run_dir, model, k)
        if runtime.distributed:
            model = DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.device.index
                                            is not None else None)
        if train.compile:
            model = torch.compile(model)
        loaders = [
            make_loader(ImageDataset(part["path"], part["label"], tf, decoded,
                                     metadata=encoder.transform(part) if fused else None), batch_sizes[is_train],
                        train=is_train, num_workers=loader.num_workers, seed=seed + k,
                        pin_memory=runtime.device.type == "cuda", persistent_workers=not train.deterministic,
                        rank=rank, world_size=world, prefetch_factor=loader.prefetch_factor,
                        balanced=loader.balanced)
            for part, tf, is_train in ((tr, pipeline.train, True), (va.iloc[rank::world], pipeline.eval, False))
        ]
        opt = create_optimizer(model, optimizer.name, optimizer.lr, optimizer.weight_decay, optimizer.momentum,
                               fused=runtime.device.type == "cuda", layer_decay=optimizer.layer_decay)
        scheduler = create_scheduler(opt, schedule.name, train.epochs, schedule.min_lr, schedule.warmup_epochs,
                                     schedule.warmup_lr, steps_per_epoch=len(loaders[0]))
        result = fit(model, *loaders, va["label"].to_numpy(), opt, scheduler,
                     make_loss(train.pos_weight, tr["label"].to_numpy()), runtime, train.epochs,
                     run_dir / f"fold{k}", config, train.monitor, fold=k,
                     checkpoint_extra=extra | {"metadata": encoder.to_dict() if encoder else None, "fusion": fusion},
                     skip_nonfinite=train.skip_nonfinite, device_transform=pipeline.device,
                     clip_grad_norm=train.clip_grad_norm, ema_decay=train.ema_decay,
                     on_epoch=(lambda row, k=k: on_epoch(k, row)) if on_epoch is not None else None,
                     state_extra=state_extra)
        # Each fold model gets its own temperature, fitted on its validation fold: the ensemble then
        # averages probabilities of one scale, and the OOF thresholds hold for it.
        temperature = fit_temperature(va["label"], result.probs) if calibrate else 1.0
        temperatures.append(temperature)
        last_auc = result.history["val_auc"].iloc[-1]  # beside the best epoch's: that one was chosen on this fold
        folds.append({"fold": k, "best_epoch": result.best_epoch, "temperature": temperature} | result.metrics
                     | {"last_epoch_auc": None if pd.isna(last_auc) else float(last_auc)})
        oof.append(va[["path", "label"]].assign(fold=k, prob=apply_temperature(result.probs, temperature),
                                                prob_uncalibrated=result.probs))
        log.info("fold %d: best epoch %d, val auc %s, temperature %.3f", k, result.best_epoch, result.metrics["auc"],
                 temperature)
    return CrossValidation(folds, pd.concat(oof).sort_index(), temperatures)


def tta_oof_probs(cv: CrossValidation, records: pd.DataFrame, run_dir: Path, runtime: Runtime,
                  modes: Sequence[str], batch_size: int = 128,
                  num_workers: int | str = "auto") -> dict[str, np.ndarray]:
    """Each fold's validation images scored again by its ``best.pt`` with test-time augmentation.

    The images go through :func:`melanoma.inference.predict_paths`, the path ``melanoma-eval`` takes
    (files decoded, the run's preprocessing, the fold's temperature, the mean over views), so the
    thresholds chosen on these probabilities are chosen on predictions made the way evaluation makes them.

    Args:
        cv: what :func:`cross_validate` returned (its temperatures are not yet in ``best.pt``).
        records: the training records passed to :func:`cross_validate`, with the metadata columns of fused models.
        run_dir: the run whose ``fold{k}/best.pt`` score fold ``k`` (their ``config`` names the model, as
            ``config["model"]["name"]``: pass such a ``config`` to :func:`cross_validate`).
        modes: TTA modes (``flip``, ``d4``; ``none`` scores without views, as training's validation did).
        batch_size, num_workers: of the scoring loader.

    Returns:
        ``{mode: probabilities}``, each aligned with the rows of ``cv.oof``.
    """
    modes = list(dict.fromkeys(modes))
    out = {mode: np.full(len(cv.oof), np.nan) for mode in modes}
    for k, temperature in enumerate(cv.temperatures):
        rows = np.flatnonzero(cv.oof["fold"].to_numpy() == k)
        part = records.loc[cv.oof.index[rows]]
        if part["path"].tolist() != cv.oof["path"].iloc[rows].tolist():
            raise ValueError("records are not the frame passed to cross_validate (their index names other images); "
                             "pass that frame, with its index")
        ensemble = load_ensemble(run_dir / f"fold{k}" / "best.pt", runtime)
        ensemble.temperatures = [temperature]
        for mode in modes:
            out[mode][rows] = predict_paths(ensemble, part["path"].tolist(), runtime, mode, batch_size, num_workers,
                                            metadata=part, source="the training records")[0]
        log.info("fold %d: validation scored again with tta %s", k, ", ".join(modes))
    return out


def write_results(cv: CrossValidation, run_dir: Path, model_name: str, operating_point: str = "sens95",
                  calibration: str = "temperature", monitor: str = "auc",
                  tta_probs: Mapping[str, np.ndarray] | None = None, **summary) -> dict:
    """Choose the operating points on the OOF predictions and write ``oof_predictions.csv`` and ``metrics.json``.

    The thresholds (and the OOF metrics at each) go into every fold's ``best.pt`` too, where
    ``melanoma-eval`` and ``melanoma-predict`` find them. The test split is never looked at.

    Args:
        cv: what :func:`cross_validate` returned.
        run_dir: the run's folder.
        model_name: the timm model name, recorded in ``metrics.json``.
        operating_point: the threshold eval/predict use by default: ``0.5``, ``youden`` or ``sens95``.
        calibration: ``temperature`` or ``none``, as recorded.
        monitor: the metric that picked each fold's best epoch, as recorded.
        tta_probs: OOF probabilities with test-time augmentation (:func:`tta_oof_probs`); each mode gets
            its own thresholds (``thresholds_by_tta``), which eval and predict use under that ``tta``.
        **summary: further plain values for ``metrics.json`` (image counts, skipped files, ...).

    Returns:
        The content of ``metrics.json``.
    """
    oof = cv.oof
    mean, std = summarize(cv.folds, (*METRICS, "last_epoch_auc"))
    thresholds = choose_thresholds(oof["label"], oof["prob"])
    at_thresholds = {name: binary_metrics(oof["label"], oof["prob"], t) for name, t in thresholds.items()}
    tta_probs = {mode: np.asarray(p, dtype=float) for mode, p in (tta_probs or {}).items() if mode != "none"}
    by_tta = {mode: choose_thresholds(oof["label"], p) for mode, p in tta_probs.items()}
    at_by_tta = {mode: {name: binary_metrics(oof["label"], tta_probs[mode], t) for name, t in chosen.items()}
                 for mode, chosen in by_tta.items()}
    columns = {f"prob_{mode}": p for mode, p in tta_probs.items()}
    write_csv(oof[["path", "label", "fold", "prob", "prob_uncalibrated"]].assign(**columns),
              run_dir / "oof_predictions.csv")
    for k, temperature in enumerate(cv.temperatures):
        update_checkpoint(run_dir / f"fold{k}" / "best.pt", thresholds=thresholds, operating_point=operating_point,
                          temperature=temperature, oof_at_thresholds=at_thresholds, thresholds_by_tta=by_tta,
                          oof_at_thresholds_by_tta=at_by_tta)
    metrics = {
        "model": model_name,
        "threshold": THRESHOLD,
        "monitor": monitor,
        "folds": cv.folds,
        "mean": mean,
        "std": std,
        "oof": binary_metrics(oof["label"], oof["prob"], THRESHOLD),
        "thresholds": thresholds,
        "operating_point": operating_point,
        "calibration": calibration,
        "oof_uncalibrated": binary_metrics(oof["label"], oof["prob_uncalibrated"], THRESHOLD),
        "oof_at_thresholds": at_thresholds,
        "thresholds_by_tta": by_tta,
        "oof_at_thresholds_by_tta": at_by_tta,
    } | summary  # no wall time here: a resumed run's metrics.json equals an uninterrupted one's (see history.csv)
    write_json(metrics, run_dir / "metrics.json")
    return metrics
