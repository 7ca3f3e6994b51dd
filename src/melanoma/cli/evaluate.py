"""``melanoma-eval``: score a trained run (its fold ensemble) or one checkpoint on a labelled set.

    melanoma-eval ckpt=outputs/train/RUN                      # the run's own test split
    melanoma-eval ckpt=outputs/train/RUN/fold1/best.pt eval.tta=d4
    melanoma-eval ckpt=RUN data=folder data.root=/other/set   # another labelled set

Only this module reads the eval config; the work is done by data, inference, confidence, audit and plots.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from melanoma import skin_tone
from melanoma.audit import shared_patient_paths, train_duplicates
from melanoma.checkpoint import write_csv, write_json
from melanoma.cli import check_overrides
from melanoma.compare import paired_auc_difference
from melanoma.confidence import RANKING_METRICS, THRESHOLD_METRICS, held_promises, metrics_with_ci
from melanoma.data import check_location, load_eval_set, training_images
from melanoma.errors import DataError, report_user_errors
from melanoma.inference import find_checkpoints, load_ensemble, predict_paths, resolve_threshold, run_dir_of
from melanoma.metadata import parse_columns
from melanoma.plots import plot_evaluation, plot_subgroups
from melanoma.reporting.tables import format_interval
from melanoma.runtime import resolve_runtime
from melanoma.stacking import with_stacker
from melanoma.subgroups import card_table, report_card, subgroup_columns

log = logging.getLogger("melanoma.evaluate")


def _format_table(results: dict) -> str:
    """Metrics as rows, operating points as columns, each cell 'value [lo, hi]'."""
    cells = {}
    for name, block in results.items():
        column = f"{name} ({block['threshold']:.3g})"
        cells[column] = {k: format_interval(v) for k, v in block["metrics"].items()}
    return pd.DataFrame(cells).loc[[*THRESHOLD_METRICS, *RANKING_METRICS]].to_string()


def _side_by_side(full: dict, dedup: dict) -> str:
    """Full and deduplicated test metrics of one threshold, side by side."""
    keys = [*THRESHOLD_METRICS, *RANKING_METRICS]
    return pd.DataFrame({"full test split": [format_interval(full["metrics"][k]) for k in keys],
                         "deduplicated": [format_interval(dedup["metrics"][k]) for k in keys]}, index=keys).to_string()


def evaluate_run(cfg: DictConfig, out_dir: Path) -> dict:
    """Evaluate ``cfg.ckpt`` and write predictions, metrics and figures into ``out_dir``.

    Returns:
        The content of ``metrics.json``.
    """
    runtime = resolve_runtime(cfg.trainer.device, cfg.trainer.precision, cfg.trainer.channels_last)
    ensemble = load_ensemble(cfg.ckpt, runtime)
    # null keys (and the empty data.metadata an override group brings) fall back to the run's own values
    overrides = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if v not in (None, [])}
    data = ensemble.config["data"] | overrides
    ensemble, stacked = with_stacker(run_dir_of(cfg.ckpt), ensemble, cfg.eval.stack)
    ensemble, tta_warning = ensemble.for_tta(cfg.eval.tta)  # thresholds chosen on OOF predictions with these views
    if tta_warning:
        log.warning("%s", tta_warning)
    chosen_name, chosen = resolve_threshold(cfg.eval.threshold, ensemble)
    if warning := ensemble.degenerate_warning(chosen_name, chosen):
        log.warning("%s", warning)
    subgroup_meta = _subgroup_metadata(data) if cfg.eval.subgroups else {}
    # the run's patient column, where the scored manifest has it too: test images of training patients
    patient = ensemble.config["data"].get("group_column")
    patient = patient if patient and cfg.eval.dedup and patient in _manifest_header(data) else None
    columns = list(dict.fromkeys([*ensemble.metadata_columns, *(stacked.stacker.columns if stacked else []),
                                  *subgroup_meta, *([patient] if patient else [])]))
    eval_set, bad = load_eval_set(data, cfg.eval.split, columns=columns)
    log.info("%d models, %d images (%d malignant), tta %s", len(ensemble.models), len(eval_set),
             eval_set["label"].sum(), cfg.eval.tta)

    per_model = predict_paths(ensemble, eval_set["path"].tolist(), runtime, cfg.eval.tta, cfg.eval.batch_size,
                              cfg.eval.num_workers, metadata=eval_set, source=str(data.get("manifest")))
    predictions = eval_set.assign(prob=per_model.mean(0))
    for path, probs in zip(ensemble.paths, per_model, strict=True):
        predictions[f"prob_{path.parent.name if path.name == 'best.pt' else path.stem}"] = probs
    stack = None
    if stacked is not None:  # image_prob, not prob_*: those columns are the fold models'
        predictions["image_prob"] = predictions["prob"]
        predictions["prob"] = stacked.stacker.predict(predictions["image_prob"].to_numpy(), eval_set,
                                                      str(data.get("manifest")))
        stack = {"columns": stacked.stacker.columns, "seed": stacked.seed,
                 "difference": paired_auc_difference(predictions["label"], predictions["image_prob"],
                                                     predictions["prob"], cfg.eval.n_resamples, cfg.eval.level,
                                                     cfg.eval.seed)}

    thresholds = dict(ensemble.thresholds) | {chosen_name: chosen}
    results = metrics_with_ci(predictions["label"], predictions["prob"], thresholds, cfg.eval.prevalence,
                              cfg.eval.n_resamples, cfg.eval.level, cfg.eval.seed)
    unavailable = results.pop("unavailable", {})
    dedup = None
    try:
        kept_columns = [patient] if patient else []
        train_images = training_images(ensemble.config["data"], kept_columns) if cfg.eval.dedup else None
    except DataError as exc:
        log.warning("no deduplicated metrics: the run's training data cannot be read (%s)", exc)
        train_images = None
    if train_images is not None:
        leaked = train_duplicates(train_images, predictions, cfg.audit.threshold, cfg.audit.workers,
                                  cfg.audit.method, cfg.audit.similarity)
        shared = shared_patient_paths(train_images, predictions, patient) if patient else set()
        kept = predictions[~predictions["path"].isin(leaked | shared)]
        predictions["has_train_duplicate"] = predictions["path"].isin(leaked)
        if patient:
            predictions["shares_train_patient"] = predictions["path"].isin(shared)
        dedup = {"n_removed": len(leaked | shared), "n_duplicates": len(leaked),
                 "n_shared_patient": len(shared) if patient else None, "patient_column": patient,
                 "n_images": int(len(kept)), "n_positive": int(kept["label"].sum()),
                 "thresholds": metrics_with_ci(kept["label"], kept["prob"], thresholds, cfg.eval.prevalence,
                                               cfg.eval.n_resamples, cfg.eval.level, cfg.eval.seed)
                 if len(kept) else {}}
        dedup["unavailable"] = dedup["thresholds"].pop("unavailable", {})
    card = None
    if cfg.eval.subgroups:
        angles = skin_tone.estimate(predictions["path"].tolist())
        predictions["ita"] = angles
        groups = subgroup_columns(predictions, subgroup_meta) | {"skin tone": [skin_tone.category(a) for a in angles]}
        card = report_card(predictions["label"].to_numpy(), predictions["prob"].to_numpy(), chosen, groups,
                           cfg.eval.n_resamples, cfg.eval.level, cfg.eval.seed)
        card["operating_point"] = chosen_name
        write_csv(card_table(card), out_dir / "subgroups.csv")
    write_csv(predictions, out_dir / "predictions.csv")
    metrics = {
        "ckpt": str(cfg.ckpt),
        "model": ensemble.config["model"]["name"],
        "models": [str(p) for p in ensemble.paths],
        "data": {k: data.get(k) for k in ("layout", "root", "manifest")},
        "split": cfg.eval.split,
        "tta": cfg.eval.tta,
        "n_images": int(len(predictions)),
        "n_positive": int(predictions["label"].sum()),
        "n_skipped": len(bad),
        "skipped_files": [{"path": p, "reason": r} for p, r in bad],
        "prevalence": cfg.eval.prevalence,
        "bootstrap": {"n_resamples": cfg.eval.n_resamples, "level": cfg.eval.level, "seed": cfg.eval.seed,
                      "stratified": True},
        "operating_point": chosen_name,
        "threshold": chosen,
        "thresholds_tta": ensemble.thresholds_tta,  # the views of the OOF predictions the thresholds were chosen on
        "thresholds": results,
        "promises": held_promises(results, ensemble.oof_at_thresholds),
        "unavailable": unavailable,
        "dedup": dedup,
        "subgroups": card,
        "stack": stack,
    }
    write_json(metrics, out_dir / "metrics.json")
    plot_evaluation(out_dir, chosen, chosen_name)
    if card is not None:
        plot_subgroups(pd.read_csv(out_dir / "subgroups.csv"), card["overall"], out_dir / "subgroups.png",
                       f"Subgroups at the {chosen_name} threshold {chosen:.3g}, {cfg.eval.level:.0%} CIs\n"
                       f"{metrics['model']}, {out_dir.name}")
    if stack is not None:
        d = stack["difference"]
        print(f"stacked on {', '.join(stack['columns'])}: image AUC {d['auc_a']:.4f}, stacked {d['auc_b']:.4f}, "
              f"difference {format_interval(d['difference'], '+.4f')} (paired bootstrap; DeLong p = "
              f"{d['delong']['p_value']:.3g}); the metrics below are the stacked model's")
    print(f"\n{len(ensemble.models)}-model ensemble on {len(predictions)} images "
          f"({metrics['n_positive']} malignant), tta={cfg.eval.tta}, {cfg.eval.level:.0%} bootstrap CIs; "
          f"PPV/NPV at prevalence {cfg.eval.prevalence:g}:")
    print(_format_table(results))
    for key, reason in unavailable.items():
        print(f"{key}: unavailable ({reason})")
    for name, promise in metrics["promises"].items():
        if name == "0.5":
            continue
        print(f"{name} threshold (chosen on out-of-fold predictions, sensitivity {promise['oof']['sensitivity']:.3f} "
              f"there): sensitivity {format_interval(promise['test']['sensitivity'])}, specificity "
              f"{format_interval(promise['test']['specificity'])} here")
    if dedup is not None and dedup["n_removed"] and not dedup["n_images"]:
        print(f"\nNo deduplicated metrics: all {dedup['n_removed']} scored images are training images or "
              f"near-duplicates of them{' or of training patients' if dedup['n_shared_patient'] else ''}")
    elif dedup is not None and dedup["n_removed"]:  # else the table would repeat the one above
        patients = f", or share a patient ({patient}) with it" if dedup["n_shared_patient"] else ""
        print(f"\nWithout the {dedup['n_removed']} scored images that are in train or have a near-duplicate there"
              f"{patients} ({dedup['n_images']} left), at the {chosen_name} threshold:")
        print(_side_by_side(results[chosen_name], dedup["thresholds"][chosen_name]))
    if card is not None:
        print(_card_summary(card))
    print(f"operating point: {chosen_name} = {chosen:.4f}; outputs in {out_dir}")
    return metrics


def _subgroup_metadata(data: dict) -> dict:
    """The run's ``data.metadata`` columns that the scored manifest holds (other layouts: none)."""
    header = _manifest_header(data)
    return {name: kind for name, kind in parse_columns(data.get("metadata") or []).items() if name in header}


def _manifest_header(data: dict) -> set[str]:
    """The columns of the scored manifest (none for the folder layouts, or an unreadable manifest)."""
    if data.get("layout") != "csv" or not data.get("manifest"):
        return set()
    try:
        return set(pd.read_csv(Path(data["manifest"]).expanduser(), nrows=0).columns)
    except (OSError, ValueError):
        return set()  # load_eval_set names the problem with the manifest


def _card_summary(card: dict) -> str:
    """The subgroup card in a few lines: how many levels, and every flagged one."""
    overall = card["overall"]["sensitivity"]["value"]
    flagged = [r for r in card["rows"] if r["flagged"]]
    columns = sorted({r["column"] for r in card["rows"]})
    lines = [f"\nsubgroups ({', '.join(columns)}; {len(card['rows'])} levels) in subgroups.csv and subgroups.png"]
    for r in flagged:
        s = r["sensitivity"]
        lines.append(f"  FLAGGED {r['column']} = {r['level']} (n {r['n']}, {r['n_positive']} malignant): sensitivity "
                     f"{s['value']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}] lies below the overall {overall:.3f}")
    if not flagged:
        lines.append("  no subgroup's sensitivity CI lies wholly below the overall sensitivity")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    report_user_errors("melanoma-eval", evaluate_run, cfg, Path(HydraConfig.get().runtime.output_dir))


def _preflight(cfg: DictConfig) -> None:
    """Paths checked before the output folder exists: the checkpoints, and the data the overrides point at (keys
    left out come from the run's own data)."""
    find_checkpoints(cfg.ckpt)
    if cfg.data is not None and not cfg.data.get("synthetic"):  # generated data writes its own folder
        check_location(cfg.data.get("layout"), cfg.data.get("root"), cfg.data.get("manifest"), complete=False)


def main() -> None:
    """Console entry point ``melanoma-eval``."""
    check_overrides("melanoma-eval", "eval", preflight=_preflight)
    _hydra_main()


if __name__ == "__main__":
    main()
