"""The subgroup report card: how a model does on each group of patients, with confidence intervals.

Models fail unevenly: published audits found AUC drops of 0.27-0.36 on dark skin for models trained
on fair-skinned archives. For every subgroup column (age bins, sex, site, any categorical metadata,
and the estimated skin tone of :mod:`melanoma.skin_tone`) and every level of it, the card holds n,
positives, the AUC with a stratified bootstrap CI (bias-corrected, as
:func:`melanoma.confidence.metrics_with_ci`), and the sensitivity and specificity at the operating
point with Wilson intervals. A subgroup with too few images of a class has that metric listed as
unavailable with the reason; one with at least ``MIN_PER_CLASS`` malignant images whose
sensitivity CI lies wholly below the overall sensitivity is flagged.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from melanoma.confidence import auc_rows, bc_interval, proportions_at, stratified_resamples
from melanoma.metadata import UNKNOWN, MetadataEncoder, is_missing
from melanoma.skin_tone import CATEGORIES

AGE_BINS = (0, 30, 45, 60, 75, np.inf)
AGE_LABELS = ("<30", "30-44", "45-59", "60-74", "75+")
# Levels with a natural order are listed in it (ages young to old, skin tones light to dark), the rest by name.
ORDER = {level: i for i, level in enumerate((*AGE_LABELS, *(name for name, _ in CATEGORIES)))}
MIN_PER_CLASS = 5  # images of each class below which a subgroup's AUC is not reported, nor its sensitivity flagged


def age_bin(values: pd.Series) -> pd.Series:
    """Age in years as the bins ``<30``, ``30-44``, ``45-59``, ``60-74``, ``75+``; missing as ``unknown``."""
    numbers = pd.to_numeric(values, errors="coerce")
    binned = pd.cut(numbers, AGE_BINS, right=False, labels=list(AGE_LABELS)).astype(object)
    return binned.where(binned.notna(), UNKNOWN)  # missing, or outside the bins (a negative age)


def subgroup_columns(frame: pd.DataFrame, columns: Mapping[str, str | None]) -> dict[str, pd.Series]:
    """The subgroups of each metadata column: ages binned, categorical levels as they are.

    Numeric columns other than age (named ``age...``) are left out: they have no standard bins.
    """
    kinds = MetadataEncoder.fit(frame, columns).columns
    groups = {}
    for name, kind in kinds.items():
        if name.lower().startswith("age") and kind == "numeric":
            groups[name] = age_bin(frame[name])
        elif kind == "categorical":
            groups[name] = frame[name].astype(str).str.strip().where(~is_missing(frame[name]), UNKNOWN)
    return groups


def _with_ci(y: np.ndarray, p: np.ndarray, threshold: float, n_resamples: int, level: float,
             seed: int, with_auc: bool = True) -> dict[str, dict]:
    """AUC (stratified bootstrap BC interval), sensitivity and specificity (Wilson intervals) of one subset.

    With ``with_auc=False`` the AUC is left as ``None`` and not bootstrapped at all.
    """
    proportions = proportions_at(y, p, threshold, level)
    auc = {"value": None, "ci": None}
    if with_auc:
        idx = stratified_resamples(y, n_resamples, seed)
        auc = bc_interval(auc_rows(y[None], p[None])[0], auc_rows(y[idx], p[idx]), level)
    return {"auc": auc, "sensitivity": proportions["sensitivity"], "specificity": proportions["specificity"]}


def report_card(labels: np.ndarray, probs: np.ndarray, threshold: float, groups: Mapping[str, pd.Series],
                n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Metrics of every level of every subgroup column at one threshold.

    Args:
        labels, probs: the scored images.
        threshold: the operating point's threshold (chosen on OOF predictions, never here).
        groups: ``column -> one value per image`` (:func:`subgroup_columns`, plus the skin tone).
        n_resamples, level, seed: the bootstrap of each subset.

    Returns:
        ``{"overall": {...}, "rows": [{"column", "level", "n", "n_positive", "auc", "sensitivity",
        "specificity", "unavailable": {metric: reason}, "flagged"}]}``; each metric is
        ``{"value", "ci"}`` (``None`` when unavailable).
    """
    y, p = np.asarray(labels, dtype=int), np.asarray(probs, dtype=float)
    overall = _with_ci(y, p, threshold, n_resamples, level, seed)
    rows = []
    for column, values in groups.items():
        values = pd.Series(values).reset_index(drop=True).astype(str)
        for name in sorted(values.unique(), key=lambda v: (v == UNKNOWN, ORDER.get(v, len(ORDER)), v)):
            idx = np.flatnonzero(values.to_numpy() == name)
            sub_y, sub_p = y[idx], p[idx]
            n_pos = int(sub_y.sum())
            n_neg = len(idx) - n_pos
            enough = min(n_pos, n_neg) >= MIN_PER_CLASS  # else the AUC is not even bootstrapped
            row = {"column": column, "level": name, "n": int(len(idx)), "n_positive": n_pos,
                   **_with_ci(sub_y, sub_p, threshold, n_resamples, level, seed, with_auc=enough), "unavailable": {}}
            if not enough:
                row["unavailable"]["auc"] = (f"{n_pos} malignant and {n_neg} benign images; an AUC needs at least "
                                             f"{MIN_PER_CLASS} of each")
            for key, count, what in (("sensitivity", n_pos, "malignant"), ("specificity", n_neg, "benign")):
                if count == 0:
                    row["unavailable"][key] = f"no {what} images"
            sens, whole_sens = row["sensitivity"], overall["sensitivity"]["value"]
            row["flagged"] = bool(n_pos >= MIN_PER_CLASS and whole_sens is not None and sens["ci"][1] < whole_sens)
            rows.append(row)
    return {"threshold": float(threshold), "overall": overall, "rows": rows,
            "bootstrap": {"n_resamples": n_resamples, "level": level, "seed": seed, "stratified": True},
            "min_per_class": MIN_PER_CLASS}


def card_table(card: dict) -> pd.DataFrame:
    """The card as one row per subgroup (what ``subgroups.csv`` holds)."""
    rows = []
    for row in card["rows"]:
        flat = {"column": row["column"], "level": row["level"], "n": row["n"], "n_positive": row["n_positive"]}
        for key in ("auc", "sensitivity", "specificity"):
            cell = row[key]
            flat[key] = cell["value"]
            flat[f"{key}_lo"], flat[f"{key}_hi"] = cell["ci"] if cell["ci"] is not None else (None, None)
        flat["flagged"] = row["flagged"]
        flat["unavailable"] = "; ".join(f"{k}: {v}" for k, v in row["unavailable"].items())
        rows.append(flat)
    return pd.DataFrame(rows)
