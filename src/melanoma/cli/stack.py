"""``melanoma-stack RUN``: gradient-boosted trees on a run's out-of-fold probabilities plus its metadata.

    melanoma-stack outputs/train/RUN                  # stacked OOF metrics, and the test split if any
    melanoma-stack outputs/train/RUN --no-test        # out-of-fold only (no model is loaded)

The run must have been trained with ``data.metadata=[...]`` (image-only or fused). Writes
``RUN/stack/``: ``oof_predictions.csv`` (``prob_image`` and ``prob`` stacked), ``test_predictions.csv``
and ``metrics.json``: the stacked model's OOF metrics and operating points (chosen on its OOF
predictions), its test metrics with bootstrap CIs, and the paired AUC difference to the image model
on both. The work is in :mod:`melanoma.stacking` and :mod:`melanoma.compare`.
"""

from __future__ import annotations

from pathlib import Path

from melanoma.checkpoint import write_csv, write_json
from melanoma.cli import argument_parser
from melanoma.compare import paired_auc_difference
from melanoma.confidence import metrics_with_ci
from melanoma.data import load_eval_set
from melanoma.errors import DataError, report_user_errors
from melanoma.inference import load_ensemble, predict_paths
from melanoma.metrics import binary_metrics
from melanoma.runtime import resolve_runtime
from melanoma.stacking import TREE_SETTINGS, stacker_from_run


def stack_run(run: Path, test: bool = True, device: str = "auto", n_resamples: int = 1000, seed: int = 0) -> dict:
    """Stack the run's OOF predictions with its metadata and write ``RUN/stack/``.

    Returns:
        The content of ``RUN/stack/metrics.json``.

    Raises:
        DataError: the run lacks its files or was trained without ``data.metadata``.
    """
    fitted = stacker_from_run(run, seed)
    stacker, oof, thresholds, data = fitted.stacker, fitted.oof, fitted.thresholds, fitted.data
    columns = stacker.columns
    out = run / "stack"
    write_csv(oof[["path", "label", "fold", "prob_image", "prob"]], out / "oof_predictions.csv")
    metrics = {
        "run": str(run), "columns": dict(stacker.encoders[0].columns),
        "trees": "sklearn HistGradientBoostingClassifier", "settings": TREE_SETTINGS | {"random_state": seed},
        "oof": binary_metrics(oof["label"], oof["prob"], 0.5),
        "oof_image": binary_metrics(oof["label"], oof["prob_image"], 0.5),
        "oof_difference": paired_auc_difference(oof["label"], oof["prob_image"], oof["prob"], n_resamples, seed=seed),
        "thresholds": thresholds,
        "oof_at_thresholds": fitted.oof_at_thresholds,
        "test": None,
    }
    if test and (data["layout"] != "folder"):
        try:
            test_set, _ = load_eval_set(data, "test", columns=list(columns))
        except DataError as exc:
            test_set = None
            print(f"no test split scored: {exc}")
        if test_set is not None and test_set["label"].nunique() == 2:
            runtime = resolve_runtime(device, "auto")
            ensemble = load_ensemble(run, runtime)
            image = predict_paths(ensemble, test_set["path"].tolist(), runtime, num_workers=0, metadata=test_set,
                                  source=str(data["manifest"])).mean(0)
            probs = stacker.predict(image, test_set, str(data["manifest"]))
            write_csv(test_set[["path", "label"]].assign(prob_image=image, prob=probs), out / "test_predictions.csv")
            results = metrics_with_ci(test_set["label"], probs, thresholds, n_resamples=n_resamples, seed=seed)
            metrics["test"] = {"n_images": int(len(test_set)), "thresholds": results,
                               "difference": paired_auc_difference(test_set["label"], image, probs, n_resamples,
                                                                   seed=seed)}
    write_json(metrics, out / "metrics.json")
    return metrics


def _line(name: str, diff: dict) -> str:
    d = diff["difference"]
    return (f"{name}: image AUC {diff['auc_a']:.4f}, stacked {diff['auc_b']:.4f}, difference {d['value']:+.4f} "
            f"[{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] (paired bootstrap; DeLong p = {diff['delong']['p_value']:.3g}) "
            f"over {diff['n_images']} images")


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``melanoma-stack``."""
    parser = argument_parser("melanoma-stack", __doc__)
    parser.add_argument("run", type=Path, metavar="RUN", help="a melanoma-train run trained with data.metadata")
    parser.add_argument("--no-test", action="store_true", help="stack the out-of-fold predictions only")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the fold ensemble scores the test split")
    parser.add_argument("--n-resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the trees and of the resampling")
    args = parser.parse_args(argv)
    if args.n_resamples < 1:
        parser.error("--n-resamples must be at least 1")
    metrics = report_user_errors("melanoma-stack", stack_run, args.run, not args.no_test, args.device,
                                 args.n_resamples, args.seed)
    print(_line("out-of-fold", metrics["oof_difference"]))
    if metrics["test"] is not None:
        print(_line("test", metrics["test"]["difference"]))
    print(f"wrote {args.run / 'stack'}")


if __name__ == "__main__":
    main()
