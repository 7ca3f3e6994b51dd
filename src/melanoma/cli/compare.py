"""``melanoma-compare A B``: the paired difference in AUC between two models on the same images.

    melanoma-compare outputs/train/IMAGE_ONLY outputs/train/FUSED      # out-of-fold predictions
    melanoma-compare outputs/eval/A outputs/eval/B --out ab.json       # two melanoma-eval folders

Two training runs are compared on their pooled out-of-fold predictions (``oof_predictions.csv``;
runs with the same seed and data share their folds), two ``melanoma-eval`` folders on their test
predictions (``predictions.csv``). Both must hold the same images with the same labels. The work
is in :mod:`melanoma.compare`: a paired stratified bootstrap and DeLong's test.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from melanoma.checkpoint import write_json
from melanoma.cli import argument_parser
from melanoma.compare import paired_auc_difference
from melanoma.errors import DataError, report_user_errors


def read_predictions(folder: Path) -> tuple[str, pd.DataFrame]:
    """``("test", predictions.csv)`` of a melanoma-eval folder or ``("out-of-fold", oof_predictions.csv)`` of a run.

    Raises:
        DataError: the folder holds neither.
    """
    for kind, name in (("test", "predictions.csv"), ("out-of-fold", "oof_predictions.csv")):
        path = folder / name
        if path.is_file():
            table = pd.read_csv(path)
            missing = {"path", "label", "prob"} - set(table.columns)
            if missing:
                raise DataError(f"{path} lacks the column(s) {', '.join(sorted(missing))}; was it written by melanoma?")
            return kind, table[["path", "label", "prob"]]
    raise DataError(f"{folder} holds no predictions.csv (melanoma-eval) or oof_predictions.csv (melanoma-train); "
                    "pass a training run or an evaluation folder")


def compare_runs(a: Path, b: Path, n_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """The paired AUC difference B - A of two folders' predictions on the same images.

    Raises:
        DataError: the folders hold different kinds of predictions, other images, or other labels.
    """
    (kind_a, table_a), (kind_b, table_b) = read_predictions(a), read_predictions(b)
    if kind_a != kind_b:
        raise DataError(f"{a} holds {kind_a} predictions and {b} {kind_b} ones; compare two training runs or two "
                        "melanoma-eval folders")
    only_a, only_b = set(table_a["path"]) - set(table_b["path"]), set(table_b["path"]) - set(table_a["path"])
    if only_a or only_b:
        example = sorted(only_a or only_b)[0]
        raise DataError(f"{a} and {b} scored other images ({len(only_a)} only in A, {len(only_b)} only in B, e.g. "
                        f"{example}); a paired comparison needs the same images (same data, split and seed)")
    both = table_a.merge(table_b, on="path", suffixes=("_a", "_b"), validate="one_to_one")
    if (both["label_a"] != both["label_b"]).any():
        raise DataError(f"{a} and {b} label {both['path'][both['label_a'] != both['label_b']].iloc[0]} differently")
    result = paired_auc_difference(both["label_a"], both["prob_a"], both["prob_b"], n_resamples, level, seed)
    return {"a": str(a), "b": str(b), "predictions": kind_a} | result


def _summary(result: dict) -> str:
    diff, test = result["difference"], result["delong"]
    level = result["bootstrap"]["level"]
    return (f"A {result['a']}: AUC {result['auc_a']:.4f}\nB {result['b']}: AUC {result['auc_b']:.4f}\n"
            f"B - A = {diff['value']:+.4f}, {level:.0%} paired bootstrap CI [{diff['ci'][0]:+.4f}, "
            f"{diff['ci'][1]:+.4f}] over {result['n_images']} {result['predictions']} images "
            f"({result['n_positive']} malignant); DeLong z = {test['z']:.2f}, p = {test['p_value']:.3g}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``melanoma-compare``."""
    parser = argument_parser("melanoma-compare", __doc__)
    parser.add_argument("a", type=Path, metavar="A", help="training run or melanoma-eval folder (the reference)")
    parser.add_argument("b", type=Path, metavar="B", help="the other one, on the same images")
    parser.add_argument("--n-resamples", type=int, default=2000, help="paired bootstrap resamples (default 2000)")
    parser.add_argument("--level", type=float, default=0.95, help="confidence level (default 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    parser.add_argument("--out", type=Path, metavar="FILE.json", help="also write the result as JSON")
    args = parser.parse_args(argv)
    if args.n_resamples < 1 or not 0 < args.level < 1:
        parser.error("--n-resamples must be at least 1 and --level in (0, 1)")
    result = report_user_errors("melanoma-compare", compare_runs, args.a, args.b, args.n_resamples, args.level,
                                args.seed)
    print(_summary(result))
    if args.out is not None:
        write_json(result, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
