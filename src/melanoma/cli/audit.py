"""``melanoma-audit``: audit a dataset for unreadable files and duplicates that leak.

    melanoma-audit data=kaggle data.root=/data/melanoma_cancer_dataset
    melanoma-audit data=demo audit.threshold=12

Writes ``audit.json`` and ``duplicates.csv`` in its run directory and prints a one-line
verdict. ``pairs_crossing_folds`` counts the duplicate pairs that plain (ungrouped) stratified
folds with ``cv.folds`` and ``cv.seed`` would split, the leak that ``cv.group_duplicates``
closes in training. With ``data=csv data.group_column=patient_id`` it also counts the test
images that share a patient with the training split.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from melanoma.audit import add_fold_crossings, audit_records, patient_leaks, patient_warning, summary_line
from melanoma.checkpoint import write_csv, write_json
from melanoma.cli import check_overrides
from melanoma.data import load_records
from melanoma.errors import DataError, report_user_errors
from melanoma.folds import make_folds
from melanoma.synthetic import generate_dataset


def run_audit(cfg: DictConfig, out_dir: Path) -> dict:
    """Audit the dataset of ``cfg.data`` and write the report into ``out_dir``.

    Returns:
        The content of ``audit.json``.
    """
    data = cfg.data
    if data.synthetic:
        generate_dataset(data.root, **data.synthetic)
    column = data.get("group_column")
    records = load_records(data.layout, data.root, tuple(data.classes), data.manifest, strict=False,
                           columns=[column] if column else ())
    if records.empty:
        raise DataError(f"the dataset at {data.root} holds no images")
    images, pairs, summary = audit_records(records, cfg.audit.threshold, workers=cfg.audit.workers,
                                           classes=tuple(data.classes), method=cfg.audit.method,
                                           similarity=cfg.audit.similarity)
    summary["patients"] = patient_leaks(records, column) if column else None
    train = images[(images["split"] == "train") & images["error"].isna()]
    if len(train) and train["label"].nunique() == 2 and train["label"].value_counts().min() >= cfg.cv.folds:
        folds = make_folds(train["label"].to_numpy(), cfg.cv.folds, cfg.cv.seed)
        add_fold_crossings(pairs, summary, dict(zip(train["path"], folds, strict=True)))
    write_json(summary, out_dir / "audit.json")
    write_csv(pairs, out_dir / "duplicates.csv")
    for split in summary["missing_splits"]:
        print(f"note: the dataset has no {split} split")
    for name in summary["empty_classes"]:
        print(f"note: {name} holds no images")
    print(f"{summary['n_images']} images audited: {summary_line(summary)}")
    if warning := patient_warning(summary["patients"]):
        print(f"warning: {warning}")
    if summary["pairs_crossing_folds"] is not None:
        print(f"random {cfg.cv.folds}-fold splits would put {summary['pairs_crossing_folds']} duplicate pairs "
              "across folds (cv.group_duplicates=true prevents it)")
    print(f"report: {out_dir / 'audit.json'}, {out_dir / 'duplicates.csv'}")
    return summary


@hydra.main(version_base="1.3", config_path="../configs", config_name="audit_run")
def _hydra_main(cfg: DictConfig) -> None:
    report_user_errors("melanoma-audit", run_audit, cfg, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    """Console entry point ``melanoma-audit``."""
    check_overrides("melanoma-audit", "audit_run")
    _hydra_main()


if __name__ == "__main__":
    main()
