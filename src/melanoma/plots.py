"""Figures of a run, each a pure function of the run directory's files.

``plot_run(RUN_DIR)`` redraws every figure from ``oof_predictions.csv`` and
``fold*/history.csv`` without retraining.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.calibration import CalibrationDisplay
from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay

from melanoma.checkpoint import atomic_path

CLASS_NAMES = ("benign", "malignant")


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), dpi=150)


def plot_confusion_matrix(labels: Sequence[int], probs: Sequence[float], path: str | Path,
                          threshold: float = 0.5, title: str = "", class_names: Sequence[str] = CLASS_NAMES) -> None:
    """Draw the confusion matrix at ``threshold`` with scikit-learn's display (counts and row %)."""
    pred = (np.asarray(probs) >= threshold).astype(int)
    fig = Figure(figsize=(4.6, 4.0))
    ax = fig.add_subplot()
    ConfusionMatrixDisplay.from_predictions(labels, pred, labels=[0, 1], display_labels=list(class_names),
                                            ax=ax, cmap="Blues", colorbar=False)
    ax.set_title(title or f"Confusion matrix (threshold {threshold:g})", fontsize="medium")
    _save(fig, Path(path))


def plot_loss_curves(histories: Mapping[int, pd.DataFrame], path: str | Path, title: str = "Loss curves") -> None:
    """Training and validation loss per epoch, one colour per fold (solid train, dashed val)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for fold, history in sorted(histories.items()):
        line, = ax.plot(history["epoch"], history["train_loss"], label=f"fold {fold} train")
        ax.plot(history["epoch"], history["val_loss"], "--", color=line.get_color(), label=f"fold {fold} val")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("BCE loss")
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    _save(fig, Path(path))


def plot_roc(curves: Mapping[str, tuple[Sequence[int], Sequence[float]]], path: str | Path) -> None:
    """ROC curves with their AUC, one per entry of ``curves`` (name -> labels, probabilities)."""
    fig = Figure(figsize=(4.8, 4.5))
    ax = fig.add_subplot()
    for name, (labels, probs) in curves.items():
        if len(set(labels)) == 2:
            RocCurveDisplay.from_predictions(labels, probs, name=name, ax=ax, pos_label=1)
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title("ROC curve")
    ax.legend(fontsize="small", loc="lower right")
    _save(fig, Path(path))


def plot_precision_recall(labels: Sequence[int], probs: Sequence[float], path: str | Path) -> None:
    """Precision-recall curve with average precision (scikit-learn's display)."""
    fig = Figure(figsize=(4.8, 4.5))
    ax = fig.add_subplot()
    if len(set(labels)) == 2:
        PrecisionRecallDisplay.from_predictions(labels, probs, ax=ax, pos_label=1, name="ensemble",
                                                plot_chance_level=True)
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (PPV at the test set's prevalence)")
    ax.set_title("Precision-recall curve")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="lower left")
    _save(fig, Path(path))


def plot_calibration(labels: Sequence[int], probs: Sequence[float], path: str | Path, n_bins: int = 10) -> None:
    """Reliability diagram: observed malignancy rate per bin of predicted probability."""
    fig = Figure(figsize=(4.8, 4.5))
    ax = fig.add_subplot()
    CalibrationDisplay.from_predictions(labels, probs, n_bins=n_bins, ax=ax, name="ensemble", pos_label=1)
    ax.set_xlabel("mean predicted probability of malignancy")
    ax.set_ylabel("observed fraction malignant")
    ax.set_title("Calibration (reliability diagram)")
    _save(fig, Path(path))


def plot_augmented_samples(images: Sequence, transform: Callable, mean: Sequence[float], std: Sequence[float],
                           path: str | Path | None = None, *, n_views: int = 5, names: Sequence[str] = (),
                           title: str = "Augmented training samples", seed: int = 0) -> Figure:
    """Each image as read, then ``n_views`` draws of the training transform, de-normalised.

    Args:
        images: RGB PIL images, one row each.
        transform: the training transform (PIL image -> normalised CHW float tensor).
        mean: the normalisation mean it applies, undone for display.
        std: the normalisation std it applies.
        path: where to save the figure (format from the suffix); ``None`` only returns it.
        n_views: augmented draws per image.
        names: row labels, e.g. the class of each image.
        title: figure title; say which data and recipe it shows.
        seed: seed of the draws; the global random state is left as it was.

    Returns:
        The figure.
    """
    mean_t, std_t = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    fig = Figure(figsize=(1.7 * (n_views + 1), 1.7 * len(images) + 0.6))
    axes = fig.subplots(len(images), n_views + 1, squeeze=False)
    with torch.random.fork_rng(devices=[]):  # v2 transforms draw from torch's global generator
        torch.manual_seed(seed)
        for row, image in zip(axes, images, strict=True):
            row[0].imshow(image)
            for ax in row[1:]:
                ax.imshow((transform(image) * std_t + mean_t).clamp(0, 1).permute(1, 2, 0).numpy())
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for j, ax in enumerate(axes[0]):
        ax.set_title("original" if j == 0 else f"draw {j}", fontsize="small")
    for ax, name in zip(axes[:, 0], names, strict=False):
        ax.set_ylabel(name, fontsize="small")
    fig.suptitle(title, fontsize="medium")
    if path is not None:
        _save(fig, Path(path))
    return fig


def plot_evaluation(eval_dir: str | Path, threshold: float, threshold_name: str) -> list[Path]:
    """Redraw the figures of an evaluation from its ``predictions.csv``.

    Returns:
        The paths written: confusion matrix at ``threshold``, ROC, precision-recall, calibration.
    """
    eval_dir = Path(eval_dir)
    pred = pd.read_csv(eval_dir / "predictions.csv")
    y, p = pred["label"], pred["prob"]
    written = [eval_dir / name for name in ("confusion_matrix.png", "roc_curve.png", "pr_curve.png",
                                            "calibration.png")]
    plot_confusion_matrix(y, p, written[0], threshold, title=f"Test, {threshold_name} threshold {threshold:.3g}")
    curves = {"ensemble": (y, p)} | {c.removeprefix("prob_"): (y, pred[c]) for c in pred.columns
                                     if c.startswith("prob_")}
    plot_roc(curves, written[1])
    plot_precision_recall(y, p, written[2])
    plot_calibration(y, p, written[3])
    return written


def plot_run(run_dir: str | Path, threshold: float = 0.5) -> list[Path]:
    """Redraw every figure of a training run from its files.

    Writes ``confusion_matrix.png`` (pooled out-of-fold), ``fold{k}/confusion_matrix.png``,
    ``loss_curves.png`` and ``roc_curve.png`` (pooled and per fold).

    Returns:
        The paths written.
    """
    run_dir = Path(run_dir)
    oof = pd.read_csv(run_dir / "oof_predictions.csv")
    written = [run_dir / "confusion_matrix.png", run_dir / "loss_curves.png", run_dir / "roc_curve.png"]
    plot_confusion_matrix(oof["label"], oof["prob"], written[0], threshold,
                          title=f"Out-of-fold, threshold {threshold:g}")
    histories = {}
    curves = {"pooled out-of-fold": (oof["label"], oof["prob"])}
    for fold, part in oof.groupby("fold"):
        fold_dir = run_dir / f"fold{fold}"
        plot_confusion_matrix(part["label"], part["prob"], fold_dir / "confusion_matrix.png", threshold,
                              title=f"Fold {fold} validation")
        written.append(fold_dir / "confusion_matrix.png")
        curves[f"fold {fold}"] = (part["label"], part["prob"])
        if (fold_dir / "history.csv").is_file():
            histories[int(fold)] = pd.read_csv(fold_dir / "history.csv")
    plot_loss_curves(histories, written[1])
    plot_roc(curves, written[2])
    return written


def plot_activation_maps(images: np.ndarray, maps: np.ndarray, titles: Sequence[str], path: str | Path,
                         ncols: int = 4, suptitle: str = "", alpha: float = 0.45) -> None:
    """Heat maps (Grad-CAM) over the images they explain, one panel each, with one colour bar.

    Args:
        images: (N, H, W, 3) RGB in [0, 1], as the model saw them (cropped, de-normalised).
        maps: (N, H, W) activation maps in [0, 1].
        titles: one per image, e.g. file name, label and prediction.
        path: the PNG to write.
        ncols: panels per row.
        suptitle: a title over the whole figure.
        alpha: opacity of the heat map over the image.
    """
    ncols = max(1, min(ncols, len(images)))
    nrows = -(-len(images) // ncols)
    # Constrained layout, not _save's tight_layout: only it makes room for a colour bar shared by a grid.
    fig = Figure(figsize=(2.3 * ncols + 0.8, 2.5 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, heat, title in zip(axes.flat, images, maps, titles, strict=False):
        ax.imshow(image)
        shown = ax.imshow(heat, cmap="jet", alpha=alpha, vmin=0, vmax=1)
        ax.set_title(title, fontsize="small")
    fig.colorbar(shown, ax=axes, shrink=0.8, label="activation (scaled per image)")
    if suptitle:
        fig.suptitle(suptitle, fontsize="medium", wrap=True)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), dpi=150)
