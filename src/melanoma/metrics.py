"""Classification metrics at a threshold, computed by scikit-learn, and their fold summary."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
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
