"""Figures of a run, each a pure function of the run directory's files.

``plot_run(RUN_DIR)`` redraws every figure from ``metrics.json``, ``oof_predictions.csv`` and
``fold*/history.csv`` without retraining. Every figure names its model and run folder; fold K has
one colour (``fold_colour``) everywhere, and the pooled or ensemble curve is drawn in black.
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

from melanoma.checkpoint import atomic_path, read_json

CLASS_NAMES = ("benign", "malignant")
POOLED = {"color": "black", "linewidth": 2.2, "zorder": 3}  # the ensemble / pooled curve, set apart from folds


def fold_colour(fold: int) -> str:
    """The colour of fold ``fold`` in every figure (matplotlib's cycle, C0 for fold 0)."""
    return f"C{fold % 10}"


def _fold_of(name: str) -> int | None:
    """The fold index of a curve named ``fold K`` or ``foldK``, else ``None``."""
    digits = name.removeprefix("fold").strip()
    return int(digits) if name.startswith("fold") and digits.isdigit() else None


def save_figure(fig: Figure, path: str | Path, tight: bool = True) -> None:
    """Write a figure atomically at 150 dpi, in the format its suffix names (png, pdf, svg).

    ``tight`` applies ``tight_layout`` first; figures laid out otherwise (constrained layout, fixed
    axes) pass ``False``.
    """
    path = Path(path)
    if tight:
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), dpi=150)


def read_histories(run_dir: str | Path) -> dict[int, pd.DataFrame]:
    """Each fold's ``fold{k}/history.csv`` of a run, by fold index (folds without one are left out)."""
    paths = Path(run_dir).glob("fold*/history.csv")
    return {int(p.parent.name[4:]): pd.read_csv(p) for p in paths if p.parent.name[4:].isdigit()}


def plot_confusion_matrix(labels: Sequence[int], probs: Sequence[float], path: str | Path,
                          threshold: float = 0.5, title: str = "", class_names: Sequence[str] = CLASS_NAMES) -> None:
    """Draw the confusion matrix at ``threshold`` with scikit-learn's display (counts and row %)."""
    pred = (np.asarray(probs) >= threshold).astype(int)
    fig = Figure(figsize=(4.6, 4.0))
    ax = fig.add_subplot()
    ConfusionMatrixDisplay.from_predictions(labels, pred, labels=[0, 1], display_labels=list(class_names),
                                            ax=ax, cmap="Blues", colorbar=False)
    ax.set_title(title or f"Confusion matrix (threshold {threshold:g})", fontsize="medium")
    save_figure(fig, path)


def plot_loss_curves(histories: Mapping[int, pd.DataFrame], path: str | Path, title: str = "Loss curves",
                     best_epochs: Mapping[int, int] | None = None) -> None:
    """Training and validation loss per epoch, one colour per fold (solid train, dashed val).

    ``best_epochs`` (fold -> epoch) marks the epoch whose weights each fold kept, with a star.
    """
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for fold, history in sorted(histories.items()):
        colour = fold_colour(fold)
        ax.plot(history["epoch"], history["train_loss"], color=colour, label=f"fold {fold} train")
        ax.plot(history["epoch"], history["val_loss"], "--", color=colour, label=f"fold {fold} val")
        best = (best_epochs or {}).get(fold)
        if best is not None and (history["epoch"] == best).any():
            ax.plot([best], history.loc[history["epoch"] == best, "val_loss"].iloc[:1], "*", color=colour,
                    markersize=12, markeredgecolor="black", label="kept epoch" if fold == min(histories) else None)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("BCE loss")
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    save_figure(fig, path)


def _mark_threshold(ax, labels: Sequence[int], probs: Sequence[float], operating_point: tuple[str, float]) -> None:
    """Mark where the curve of ``probs`` stands at the named threshold: (1 - specificity, sensitivity)."""
    name, threshold = operating_point
    y, pred = np.asarray(labels, dtype=int), np.asarray(probs) >= threshold
    tpr, fpr = pred[y == 1].mean(), pred[y == 0].mean()
    ax.plot([fpr], [tpr], "o", color="crimson", markersize=8, markeredgecolor="black", zorder=4,
            label=f"{name} threshold {threshold:.3g}: sens {tpr:.2f}, spec {1 - fpr:.2f}")


def plot_roc(curves: Mapping[str, tuple[Sequence[int], Sequence[float]]], path: str | Path, title: str = "ROC curve",
             operating_point: tuple[str, float] | None = None) -> None:
    """ROC curves with their AUC, one per entry of ``curves`` (name -> labels, probabilities).

    The first entry (the ensemble or pooled predictions) is drawn in black over the others; a curve
    named ``fold K`` takes fold K's colour. ``operating_point`` (name, threshold) is marked on the
    first curve.
    """
    fig = Figure(figsize=(5.2, 4.8))
    ax = fig.add_subplot()
    for i, (name, (labels, probs)) in enumerate(curves.items()):
        if len(set(labels)) != 2:
            continue
        fold = _fold_of(name)
        style = POOLED if i == 0 else {"color": fold_colour(fold) if fold is not None else None, "linewidth": 1,
                                       "alpha": 0.8}
        RocCurveDisplay.from_predictions(labels, probs, name=name, ax=ax, pos_label=1).line_.set(**style)
        if i == 0 and operating_point is not None:
            _mark_threshold(ax, labels, probs, operating_point)
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title, fontsize="medium", wrap=True)
    ax.legend(fontsize="x-small", loc="lower right")
    save_figure(fig, path)


def plot_precision_recall(labels: Sequence[int], probs: Sequence[float], path: str | Path,
                          title: str = "Precision-recall curve") -> None:
    """Precision-recall curve with average precision (scikit-learn's display)."""
    fig = Figure(figsize=(4.8, 4.5))
    ax = fig.add_subplot()
    if len(set(labels)) == 2:
        PrecisionRecallDisplay.from_predictions(labels, probs, ax=ax, pos_label=1, name="ensemble",
                                                plot_chance_level=True).line_.set(**POOLED)
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (PPV at the test set's prevalence)")
    ax.set_title(title, fontsize="medium", wrap=True)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="lower left")
    save_figure(fig, path)


def plot_calibration(labels: Sequence[int], probs: Sequence[float], path: str | Path, n_bins: int = 10,
                     title: str = "Calibration (reliability diagram)",
                     operating_point: tuple[str, float] | None = None, name: str = "ensemble") -> None:
    """Reliability diagram: observed malignancy rate per bin of predicted probability.

    Each point is labelled with its number of images (equal-width bins, empty ones left out), and
    ``operating_point`` (name, threshold) is drawn as a vertical line.
    """
    fig = Figure(figsize=(5.2, 4.8))
    ax = fig.add_subplot()
    p = np.asarray(probs, dtype=float)
    display = CalibrationDisplay.from_predictions(labels, p, n_bins=n_bins, ax=ax, name=name, pos_label=1)
    display.line_.set(**POOLED)
    counts = np.bincount(np.minimum((p * n_bins).astype(int), n_bins - 1), minlength=n_bins)
    for x, y, n in zip(display.prob_pred, display.prob_true, counts[counts > 0], strict=True):
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, -10), fontsize="x-small")
    if operating_point is not None:
        name, threshold = operating_point
        ax.axvline(threshold, color="crimson", linestyle="--", linewidth=1, label=f"{name} threshold {threshold:.3g}")
    ax.set_xlabel("predicted probability of malignancy (numbers: images per bin)")
    ax.set_ylabel("observed fraction malignant")
    ax.set_title(title, fontsize="medium", wrap=True)
    ax.legend(fontsize="x-small", loc="upper left")
    save_figure(fig, path)


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
        save_figure(fig, path)
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
    name = _figure_label(eval_dir, "evaluated")
    point = (threshold_name, threshold)
    plot_confusion_matrix(y, p, written[0], threshold,
                          title=f"Test, {threshold_name} threshold {threshold:.3g}\n{name}")
    curves = {"ensemble": (y, p)} | {c.removeprefix("prob_"): (y, pred[c]) for c in pred.columns
                                     if c.startswith("prob_")}
    plot_roc(curves, written[1], f"ROC curve, test\n{name}", point)
    plot_precision_recall(y, p, written[2], f"Precision-recall, test\n{name}")
    plot_calibration(y, p, written[3], title=f"Calibration, test\n{name}", operating_point=point)
    return written


def plot_run(run_dir: str | Path, threshold: float | None = None) -> list[Path]:
    """Redraw every figure of a training run from its files.

    Writes ``confusion_matrix.png`` (pooled out-of-fold), ``fold{k}/confusion_matrix.png``,
    ``loss_curves.png`` (the kept epochs marked), ``roc_curve.png`` (pooled and per fold) and
    ``calibration.png``, with the run's operating point marked.

    Args:
        run_dir: the training run.
        threshold: of the confusion matrices; ``None`` is the run's operating point (the one its ROC and
            calibration plots mark, and ``melanoma-predict`` applies), or 0.5 for a run without one.

    Returns:
        The paths written.
    """
    run_dir = Path(run_dir)
    oof = pd.read_csv(run_dir / "oof_predictions.csv")
    metrics = read_json(run_dir / "metrics.json")
    name = _figure_label(run_dir, "trained")
    written = [run_dir / "confusion_matrix.png", run_dir / "loss_curves.png", run_dir / "roc_curve.png",
               run_dir / "calibration.png"]
    point = run_operating_point(metrics)
    threshold, words = matrix_threshold(metrics) if threshold is None else (threshold, f"threshold {threshold:.3g}")
    plot_confusion_matrix(oof["label"], oof["prob"], written[0], threshold, title=f"Out-of-fold, {words}\n{name}")
    for fold, part in oof.groupby("fold"):
        fold_dir = run_dir / f"fold{fold}"
        plot_confusion_matrix(part["label"], part["prob"], fold_dir / "confusion_matrix.png", threshold,
                              title=f"Fold {fold} validation, {words}\n{name}")
        written.append(fold_dir / "confusion_matrix.png")
    best = {f["fold"]: f["best_epoch"] for f in metrics.get("folds", []) if "best_epoch" in f}
    plot_loss_curves(read_histories(run_dir), written[1], f"Loss per fold (star: the epoch kept)\n{name}", best)
    plot_run_roc(run_dir, written[2])
    plot_calibration(oof["label"], oof["prob"], written[3], title=f"Calibration, out-of-fold\n{name}",
                     operating_point=point, name="pooled out-of-fold")
    return written


def plot_run_roc(run_dir: str | Path, path: str | Path, title: str | None = None) -> None:
    """The out-of-fold ROC of a run (pooled in black, one curve per fold) with its operating point marked."""
    run_dir = Path(run_dir)
    oof = pd.read_csv(run_dir / "oof_predictions.csv")
    point = run_operating_point(read_json(run_dir / "metrics.json"))
    curves = {"pooled out-of-fold": (oof["label"], oof["prob"])}
    curves |= {f"fold {k}": (part["label"], part["prob"]) for k, part in oof.groupby("fold")}
    plot_roc(curves, path, title or f"ROC curve, out-of-fold\n{_figure_label(run_dir, 'trained')}", point)


def run_operating_point(metrics: dict) -> tuple[str, float] | None:
    """``(name, threshold)`` of a run's chosen operating point, from its ``metrics.json``."""
    name = metrics.get("operating_point")
    return (name, metrics["thresholds"][name]) if name in metrics.get("thresholds", {}) else None


def matrix_threshold(metrics: dict) -> tuple[float, str]:
    """The threshold a run's out-of-fold confusion matrices are drawn at, and its words for their titles: the run's
    operating point (``"sens95 threshold 0.0946"``), or 0.5 for a run without one."""
    name, threshold = run_operating_point(metrics) or ("", 0.5)
    return threshold, f"{name + ' ' if name else ''}threshold {threshold:.3g}"


def _figure_label(folder: Path, verb: str) -> str:
    """``model, run folder`` for a figure's title, from the folder's ``metrics.json``; an evaluation's
    also names the run it scored (its ``ckpt``), since its own folder is often just ``eval``."""
    metrics = read_json(folder / "metrics.json")
    model = metrics.get("model") or "model not recorded"
    label = f"{model}, {verb} in {folder.name}"
    if metrics.get("ckpt"):
        ckpt = Path(metrics["ckpt"])
        scored = "/".join(ckpt.parts[-3:] if ckpt.suffix == ".pt" else ckpt.parts[-1:]) or metrics["ckpt"]
        label = f"{model}, run {scored}, {verb} in {folder.name}"
    return label


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
    # Constrained layout, not tight_layout: only it makes room for a colour bar shared by a grid.
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
    save_figure(fig, path, tight=False)


def plot_subgroups(table: pd.DataFrame, overall: Mapping[str, Mapping], path: str | Path,
                   title: str = "Subgroups") -> None:
    """A forest plot of the subgroup card (``subgroups.csv`` and ``metrics.json``'s ``subgroups.overall``).

    One row per subgroup level, one panel each for AUC, sensitivity and specificity: the point and
    its CI, the overall value as a dashed line; flagged rows (sensitivity CI below the overall
    sensitivity) in red, unavailable values left empty.
    """
    keys = ("auc", "sensitivity", "specificity")
    labels = [f"{r.column} = {r.level}  (n {r.n}, {r.n_positive} mal.)" for r in table.itertuples()]
    fig = Figure(figsize=(11, 1.2 + 0.32 * len(table)))
    axes = fig.subplots(1, 3, sharey=True)
    rows = np.arange(len(table))[::-1]
    for ax, key in zip(axes, keys, strict=True):
        for y, r in zip(rows, table.itertuples(), strict=True):
            value, lo, hi = getattr(r, key), getattr(r, f"{key}_lo"), getattr(r, f"{key}_hi")
            if pd.isna(value):
                continue
            colour = "tab:red" if r.flagged else "black"
            ax.errorbar(value, y, xerr=[[value - lo], [hi - value]] if not pd.isna(lo) else None, fmt="o",
                        color=colour, ms=4, capsize=2)
        if overall.get(key, {}).get("value") is not None:
            ax.axvline(overall[key]["value"], color="grey", ls="--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_title(key)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(rows, labels, fontsize=8)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def plot_optimization_history(trials: pd.DataFrame, path: str | Path, title: str = "Optimisation history",
                              objective: str = "mean CV AUC") -> None:
    """Each trial's objective in trial order, the best so far as a step line, failed trials as red crosses.

    Args:
        trials: ``trial`` (the job number), ``value`` (NaN for a failed trial) and ``state``
            (``complete`` or ``failed``), as :func:`melanoma.reporting.search.find_search` reads them.
    """
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    done = trials[trials["state"] == "complete"].sort_values("trial")
    failed = trials[trials["state"] != "complete"]
    ax.plot(done["trial"], done["value"], "o", color="C0", label=f"trial ({len(done)})")
    if len(done):
        best = done.set_index("trial")["value"].cummax()
        ax.step(best.index, best.to_numpy(), where="post", **POOLED, label="best so far")
    if len(failed):
        low = done["value"].min() if len(done) else 0.0
        ax.plot(failed["trial"], [low] * len(failed), "x", color="tab:red", ms=8, mew=2,
                label=f"failed ({len(failed)})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial (job number)")
    ax.set_ylabel(objective)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    save_figure(fig, path)
