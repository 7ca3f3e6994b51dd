"""Classification metrics at a threshold, computed by scikit-learn, and their fold summary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

METRICS = ("accuracy", "f1", "precision", "recall", "auc", "sensitivity", "specificity", "balanced_accuracy")


def binary_metrics(labels: Sequence[int], probs: Sequence[float], threshold: float = 0.5) -> dict:
    """Metrics of malignant-vs-benign predictions; malignant (1) is the positive class.

    Args:
        labels: true 0/1 labels.
        probs: predicted probability of malignancy.
        threshold: a probability at or above it is called malignant.

    Returns:
        ``accuracy, f1, precision, recall, auc, sensitivity, specificity, balanced_accuracy``
        and ``n``, ``n_positive``. A metric that needs both classes is ``None`` when the
        labels hold only one (never NaN).
    """
    y = np.asarray(labels, dtype=int)
    p = np.asarray(probs, dtype=float)
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    both = tp + fn > 0 and tn + fp > 0
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "f1": float(f1_score(y, pred, zero_division=0)),
        "precision": float(precision_score(y, pred, zero_division=0)),
        "recall": float(recall_score(y, pred, zero_division=0)),
        "auc": float(roc_auc_score(y, p)) if both else None,
        "sensitivity": float(tp / (tp + fn)) if tp + fn else None,
        "specificity": float(tn / (tn + fp)) if tn + fp else None,
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if both else None,
        "n": int(len(y)),
        "n_positive": int(y.sum()),
    }


def summarize(per_fold: Sequence[dict], keys: Sequence[str] = METRICS) -> tuple[dict, dict]:
    """Mean and sample standard deviation of each metric over folds, ignoring ``None``.

    Returns:
        ``(mean, std)``, each mapping a metric to a float, or ``None`` when no fold has it.
    """
    mean, std = {}, {}
    for key in keys:
        values = [m[key] for m in per_fold if m.get(key) is not None]
        mean[key] = float(np.mean(values)) if values else None
        std[key] = float(np.std(values, ddof=1)) if len(values) > 1 else (0.0 if values else None)
    return mean, std


def objective(metrics: Mapping, monitor: str = "auc") -> float | None:
    """What a run returns to a sweeper that maximises (Optuna): the mean over folds of the monitored validation
    metric at each fold's best epoch, negated for ``loss`` so that higher is better; ``None`` when undefined.

    Args:
        metrics: a training run's ``metrics.json``.
        monitor: ``trainer.monitor``.
    """
    if monitor == "loss":
        losses = [f["loss"] for f in metrics.get("folds") or [] if f.get("loss") is not None]
        return -float(np.mean(losses)) if losses else None
    value = (metrics.get("mean") or {}).get(monitor)
    return None if value is None else float(value)


def choose_thresholds(labels: Sequence[int], probs: Sequence[float], min_sensitivity: float = 0.95) -> dict:
    """Operating points picked on out-of-fold predictions, never on the test set.

    Args:
        labels: true 0/1 labels of the out-of-fold predictions.
        probs: their predicted probabilities.
        min_sensitivity: the sensitivity the ``sens95`` point must keep.

    Returns:
        ``{"0.5": 0.5, "youden": t, "sens95": t}``: ``youden`` maximises sensitivity +
        specificity - 1; ``sens95`` is the highest threshold whose sensitivity is at least
        ``min_sensitivity`` (a missed melanoma costs far more than a biopsied benign lesion).
    """
    y, p = np.asarray(labels, dtype=int), np.asarray(probs, dtype=float)
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    finite = np.isfinite(thr)  # the first point (threshold +inf) predicts nothing positive
    fpr, tpr, thr = fpr[finite], tpr[finite], thr[finite]
    youden = float(thr[np.argmax(tpr - fpr)])
    sens = float(thr[np.argmax(tpr >= min_sensitivity - 1e-12)])  # thresholds descend, tpr ascends
    return {"0.5": 0.5, "youden": youden, "sens95": sens}


def degenerate_operating_point(name: str, threshold: float, oof: dict, min_specificity: float = 0.2) -> str | None:
    """A one-line warning when an operating point keeps too little specificity to mean anything.

    A weak model can only reach 95% sensitivity by calling nearly every lesion malignant; its
    ``sens95`` threshold is then a number without a use.

    Args:
        name: the operating point's name, e.g. ``sens95``.
        threshold: its value.
        oof: the out-of-fold metrics at that threshold (:func:`binary_metrics`).
        min_specificity: below this specificity the point is reported as degenerate.

    Returns:
        The warning, or ``None`` when the point is usable.
    """
    spec = oof.get("specificity")
    if spec is None or spec >= min_specificity:
        return None
    return (f"the {name} threshold {threshold:.3g} keeps only {spec:.1%} specificity on the out-of-fold "
            f"predictions (sensitivity {oof.get('sensitivity') or 0:.1%}): it calls almost every lesion malignant; "
            f"train a stronger model, or use threshold=youden")


def pauc_above_tpr(labels: Sequence[int], probs: Sequence[float], min_tpr: float = 0.80) -> float:
    """Partial AUC above ``min_tpr`` sensitivity, normalised as in the ISIC 2024 challenge.

    The area between the ROC curve and the horizontal line TPR = ``min_tpr``; it ranges
    from 0 to ``1 - min_tpr`` (0.2 for a perfect classifier at the default).
    """
    y, p = np.asarray(labels, dtype=int), np.asarray(probs, dtype=float)
    max_fpr = 1 - min_tpr
    # Swap the roles of the classes so that the high-TPR band becomes a low-FPR band, then undo
    # scikit-learn's McClish standardisation to get the raw area.
    scaled = roc_auc_score(1 - y, -p, max_fpr=max_fpr)
    return float(0.5 * max_fpr**2 + (max_fpr - 0.5 * max_fpr**2) / 0.5 * (scaled - 0.5))


def predictive_values(sensitivity, specificity, prevalence: float):
    """PPV and NPV at a clinical ``prevalence`` of malignancy, by Bayes' rule.

    A balanced test split (the seed's is 50/50) inflates PPV; this re-weights it to the
    prevalence the classifier would meet in practice. Works on floats and on arrays (one value
    per bootstrap resample); an undefined value (0/0) is NaN.
    """
    sens, spec = np.asarray(sensitivity, dtype=float), np.asarray(specificity, dtype=float)
    tp, fp = sens * prevalence, (1 - spec) * (1 - prevalence)
    tn, fn = spec * (1 - prevalence), (1 - sens) * prevalence
    with np.errstate(divide="ignore", invalid="ignore"):
        return tp / (tp + fp), tn / (tn + fn)
