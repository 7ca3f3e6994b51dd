"""``MODEL_CARD.md``: a model card of a training run, written from the run's files alone.

The sections follow Mitchell et al. (2019), "Model Cards for Model Reporting": model details,
intended use, factors, metrics, evaluation data, training data, quantitative analyses, ethical
considerations, caveats and recommendations; then how to reproduce the run. Every number is read
from the run's ``metrics.json``, ``config.yaml``, ``audit.json``, ``provenance.json`` and
``.hydra/overrides.yaml``, from its newest ``melanoma-eval`` of the test split (see
:func:`melanoma.reporting.runs.collect`) and from ``melanoma-explain``'s occlusion test; a section
whose file is missing says so instead of guessing.
``melanoma-export`` writes one next to every exported model, ``melanoma-report`` one for the best run.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from melanoma.checkpoint import PROVENANCE, atomic_path, read_json
from melanoma.confidence import metrics_with_ci
from melanoma.errors import DataError
from melanoma.occlusion import occlusion_summary, shortcut_warning
from melanoma.reporting.figures import OCCLUSION
from melanoma.reporting.runs import Run, collect, read_overrides
from melanoma.reporting.tables import format_interval as _ci
from melanoma.transforms import describe_vignette

NAME = "MODEL_CARD.md"
SMALL_TEST = 50  # fewer malignant test images than this: the card says the intervals are wide


def _f(value: object, spec: str = ".3f") -> str:
    return format(value, spec) if isinstance(value, int | float) and not isinstance(value, bool) else "n/a"


def _oof_interval(run_dir: Path) -> str:
    """`` [lo, hi] (95% CI)`` of the pooled OOF AUC, bootstrapped from ``oof_predictions.csv`` (empty without it)."""
    try:
        oof = pd.read_csv(run_dir / "oof_predictions.csv")
        results = metrics_with_ci(oof["label"], oof["prob"], {"0.5": 0.5}, n_resamples=1000, seed=0)
        auc = results["0.5"]["metrics"]["auc"]
    except (OSError, KeyError, ValueError):
        return ""
    return "" if auc.get("ci") is None else f" [{_f(auc['ci'][0])}, {_f(auc['ci'][1])}] (95% stratified bootstrap CI)"


def find_run(path: str | Path, evaluations: tuple[str | Path, ...] = ()) -> Run:
    """The finished training run in ``path`` (a run directory), with its newest test evaluation attached.

    Evaluations are looked for under the run, under ``outputs/eval`` and under ``evaluations``.

    Raises:
        DataError: ``path`` is not a finished melanoma-train run.
    """
    runs, skipped = collect([path], eval_dirs=("outputs/eval", *evaluations))
    here = Path(path).expanduser().resolve()
    for run in runs:
        if run.dir.resolve() == here:
            return run
    reasons = "; ".join(str(s) for s in skipped if Path(s.path).resolve() == here) or "no metrics.json with folds"
    raise DataError(f"{path} is not a finished melanoma-train run ({reasons}); point it at a run directory")


def _evaluation_overrides(run: Run) -> str:
    """The keys that reproduce the card's evaluation: its own command line where Hydra recorded it
    (``.hydra/overrides.yaml``), else its TTA; then where it sits (``hydra.run.dir``)."""
    if not run.evaluation:
        return ""
    recorded = read_overrides(run.evaluation.dir)
    if recorded is not None:
        keys = [k for k in recorded if not k.startswith(("ckpt=", "hydra.run.dir="))]
    else:
        tta = run.evaluation.metrics.get("tta")
        keys = [f"eval.tta={tta}"] if tta not in (None, "none") else []
    return "".join(f" {k}" for k in [*keys, f"hydra.run.dir={run.evaluation.dir}"])


def model_card(run: Run, export: dict | None = None) -> str:
    """The card of ``run`` as markdown; ``export`` is an export's ``model.json``, to describe that file too."""
    m, config = run.metrics, run.config
    data, model = config.get("data") or {}, config.get("model") or {}
    trainer, cv = config.get("trainer") or {}, config.get("cv") or {}
    aug, opt, sched = config.get("augmentation") or {}, config.get("optimizer") or {}, config.get("scheduler") or {}
    epochs = f"{trainer.get('epochs', '?')} epoch" + ("" if trainer.get("epochs") == 1 else "s")
    vignette = f", {drawn}" if (drawn := describe_vignette(aug)) else ""
    audit = read_json(run.dir / "audit.json")
    origin = read_json(run.dir / PROVENANCE)
    classes = data.get("classes") or ["benign", "malignant"]
    evaluation = run.evaluation.metrics if run.evaluation else None
    point = m.get("operating_point", "0.5")
    lines = [f"# Model card: {m.get('model', model.get('name', '?'))} ({run.dir.name})", "",
             f"Written from the files of `{run.dir}` alone. Sections after Mitchell et al. (2019), "
             "\"Model Cards for Model Reporting\".", ""]

    weights = (f"`model.weights={model['weights']}`" if model.get("weights") else
               "timm's pretrained weights" if model.get("pretrained") else "random init")
    lines += ["## Model details", "",
              f"- **Architecture:** `{model.get('name', m.get('model'))}` (timm), one logit for {classes[1]!r}"
              + (f", fused with the metadata columns {', '.join(data.get('metadata') or [])} (model.fusion="
                 f"{model.get('fusion')})" if model.get("fusion", "none") != "none" else ""),
              f"- **Starting weights:** {weights}",
              f"- **Ensemble:** the {len(m.get('folds', []))} fold models of {cv.get('folds', '?')}-fold "
              f"cross-validation, their probabilities averaged"
              + (", each calibrated by a temperature fitted on its own validation fold"
                 if m.get("calibration") == "temperature" else ""),
              f"- **Input:** {data.get('image_size', '?')} px RGB dermoscopy images",
              f"- **Code:** melanoma {(origin.get('versions') or {}).get('melanoma', 'n/a')}, commit "
              f"{origin.get('commit') or 'not recorded'}{' (with uncommitted changes)' if origin.get('dirty') else ''}",
              "- **Versions:** " + (", ".join(f"{k} {v}" for k, v in (origin.get("versions") or {}).items())
                                    or "not recorded")]
    if export:
        check = export.get("check") or {}
        lines.append(f"- **This export:** `{export.get('file')}` ({export.get('format')}"
                     + (f", opset {export['opset']}" if export.get("opset") else "")
                     + f", TTA {export.get('tta')}): uint8 RGB NCHW {export['inputs'][0]['shape'][2]}x"
                     f"{export['inputs'][0]['shape'][3]} in, probability out; `model.json` says how to feed it. "
                     "It reproduced melanoma-eval within "
                     f"{_f(max(check.get('max_abs_diff', 0), check.get('max_abs_diff_batch1', 0)), '.1e')} on "
                     f"{check.get('n_images')} images"
                     + (f"; the test numbers below are melanoma-eval's with TTA {evaluation.get('tta')}, not "
                        f"{export.get('tta')}" if evaluation and evaluation.get("tta") != export.get("tta") else ""))
    lines.append("")

    lines += ["## Intended use", "",
              f"- Research on the automated triage of dermoscopic images into {classes[0]!r} and {classes[1]!r}: "
              "benchmarking, teaching, and studies of methods.",
              "- **Not for diagnosis.** It is not a medical device, has no regulatory clearance, and was not "
              "validated prospectively. No clinical decision should rest on its output; a lesion of concern "
              "needs a clinician.",
              "- Out of scope: clinical photographs that are not dermoscopy, non-melanocytic diagnoses beyond the "
              "two classes, and populations or devices unlike the training data.", ""]

    lines += ["## Factors", "",
              "- Performance can differ by age, sex, anatomic site, skin tone, imaging device and clinic.",
              ("- Subgroups evaluated: " + ", ".join(sorted({r['column'] for r in evaluation['subgroups']['rows']}))
               + " (see Quantitative analyses)") if evaluation and evaluation.get("subgroups") else
              "- No subgroup results: run `melanoma-eval` on a split with metadata columns.", ""]

    views = (evaluation or {}).get("thresholds_tta", "none")  # the evaluation's threshold set: its TTA's, or plain
    points = (m.get("thresholds_by_tta") or {}).get(views) or m.get("thresholds") or {}
    at = (m.get("oof_at_thresholds_by_tta") or {}).get(views) or m.get("oof_at_thresholds") or {}
    lines += ["## Metrics", "",
              "- ROC AUC, threshold-free. Sensitivity and specificity at operating points chosen on the "
              "out-of-fold (OOF) predictions of the training split, never on the test split: "
              + ", ".join(f"`{name}` = {_f(value, '.4g')}" for name, value in (m.get("thresholds") or {}).items())
              + f"; recommended: `{point}`.",
              *[f"- Chosen again on OOF predictions with TTA `{mode}` (what `tta={mode}` scores with): "
                + ", ".join(f"`{name}` = {_f(value, '.4g')}" for name, value in chosen.items()) + "."
                for mode, chosen in (m.get("thresholds_by_tta") or {}).items()],
              "- Test intervals: stratified bootstrap"
              + (f", {evaluation['bootstrap']['n_resamples']} resamples, {evaluation['bootstrap']['level']:.0%}"
                 if evaluation and evaluation.get("bootstrap") else "") + ".", ""]

    lines += ["## Evaluation data", ""]
    if evaluation:
        lines += [f"- The {evaluation.get('split')} split of `{(evaluation.get('data') or {}).get('root')}`: "
                  f"{evaluation.get('n_images')} images, {evaluation.get('n_positive')} {classes[1]}; evaluated "
                  f"in `{run.evaluation.dir}` with TTA {evaluation.get('tta')}.", ""]
    else:
        lines += [f"- Not evaluated on a test split yet: run `melanoma-eval ckpt={run.dir}` (its output is found "
                  "under the run or under outputs/eval).", ""]

    counts = audit.get("counts") or {}
    lines += ["## Training data", "",
              f"- `{data.get('root')}` ({data.get('layout')} layout"
              + (f", manifest {data['manifest']}" if data.get("manifest") else "") + "): "
              f"{m.get('n_images', '?')} training images, {m.get('n_positive', '?')} {classes[1]}"
              + (f"; {m['n_skipped']} unreadable skipped" if m.get("n_skipped") else "") + ".",
              *(["- Per split: " + "; ".join(f"{split}: " + ", ".join(f"{n} {c}" for c, n in by_class.items())
                                               for split, by_class in counts.items())] if counts else []),
              (f"- Audit ({(audit.get('hash') or {}).get('kind', 'pHash')}): {audit.get('exact_duplicate_pairs', 0)} "
               f"exact and {audit.get('near_duplicate_pairs', 0)} near-duplicate pairs, "
               f"{audit.get('pairs_crossing_splits', 0)} crossing train/test, {audit.get('label_conflicts', 0)} "
               "label conflicts" + ("; each duplicate group was kept in one fold" if m.get("grouped_folds") else
                                    "; folds were not grouped by them")) if audit else
              "- Audit: not run (audit.enabled=false).",
              *([f"- Folds grouped by `{m['group_column']}` (all of a patient's images in one fold)."]
                if m.get("group_column") else []),
              f"- Recipe: {epochs}, batch {data.get('batch_size', '?')}, "
              f"{opt.get('name', '?')} lr {opt.get('lr', '?')} (weight decay {opt.get('weight_decay', '?')}"
              + (f", layer decay {opt['layer_decay']}" if opt.get("layer_decay") else "")
              + f"), schedule {sched.get('name', '?')}"
              + (f", EMA {trainer['ema_decay']}" if trainer.get("ema_decay") else "")
              + f"; augmentation `{aug.get('name', '?')}` (crop scale {aug.get('scale')}, flips h {aug.get('hflip')}"
              f" / v {aug.get('vflip')}, rot90 {aug.get('rot90')}, rotation {aug.get('rotation')}, colour jitter "
              f"{aug.get('color_jitter')}{vignette}).", ""]

    lines += ["## Quantitative analyses", "",
              f"Cross-validation ({len(m.get('folds', []))} folds, threshold 0.5): AUC "
              f"{_f((m.get('mean') or {}).get('auc'))} ± {_f((m.get('std') or {}).get('auc'))}; pooled OOF AUC "
              f"{_f((m.get('oof') or {}).get('auc'))}{_oof_interval(run.dir)}.", "",
              *([f"Thresholds and OOF values chosen on OOF predictions with TTA `{views}`, as the evaluation "
                 "scored.", ""] if views != "none" else []),
              "| operating point | threshold | OOF sensitivity | OOF specificity | test sensitivity (CI) | "
              "test specificity (CI) |", "| --- | --- | --- | --- | --- | --- |"]
    tested = (evaluation or {}).get("thresholds") or {}
    for name, value in points.items():
        test = (tested.get(name) or {}).get("metrics") or {}
        lines.append(f"| {name}{' (recommended)' if name == point else ''} | {_f(value, '.4g')} | "
                     f"{_f((at.get(name) or {}).get('sensitivity'))} | {_f((at.get(name) or {}).get('specificity'))} | "
                     f"{_ci(test.get('sensitivity'))} | {_ci(test.get('specificity'))} |")
    lines.append("")
    if evaluation:
        block = (tested.get(evaluation.get("operating_point")) or {}).get("metrics") or {}
        lines.append(f"Test AUC {_ci(block.get('auc'))}, balanced accuracy {_ci(block.get('balanced_accuracy'))} "
                     f"at {evaluation.get('operating_point')}.")
        dedup = evaluation.get("dedup")
        if dedup and dedup.get("n_removed"):
            kept = (dedup["thresholds"].get(evaluation.get("operating_point")) or {}).get("metrics") or {}
            shared = " or share a patient with it" if dedup.get("n_shared_patient") else ""
            why = f"have a near-duplicate in train{shared}"
            lines.append(f"Without the {dedup['n_removed']} test images that {why}: AUC "
                         f"{_ci(kept.get('auc'))} on {dedup['n_images']} images.")
        card = evaluation.get("subgroups")
        if card:
            lines += ["", f"Subgroups at the {card.get('operating_point')} threshold:", "",
                      "| subgroup | n | malignant | AUC | sensitivity | flagged |",
                      "| --- | --- | --- | --- | --- | --- |"]
            for r in card["rows"]:
                lines.append(f"| {r['column']} = {r['level']} | {r['n']} | {r['n_positive']} | {_ci(r.get('auc'))} | "
                             f"{_ci(r.get('sensitivity'))} | {'yes' if r.get('flagged') else ''} |")
        lines.append("")

    lines += ["## Ethical considerations", "",
              "- Dermoscopy archives over-represent light skin; models trained on them have scored markedly lower "
              "AUCs on dark skin (Daneshjou et al. 2022, the Diverse Dermatology Images set). The skin-tone "
              "subgroup here is an image-based ITA estimate, not a recorded Fitzpatrick type.",
              "- A false negative delays the treatment of a melanoma; the recommended operating point trades "
              "specificity for sensitivity for that reason.", ""]

    caveats = []
    if m.get("group_column") is None:
        caveats.append("Folds are not grouped by patient (data.group_column unset): lesions of one patient can sit "
                       "in training and validation folds, which flatters the CV numbers.")
    if audit.get("pairs_crossing_splits"):
        caveats.append(f"{audit['pairs_crossing_splits']} near-duplicate pairs cross train and test: the test "
                       "numbers are optimistic (see the deduplicated AUC above).")
    patients = m.get("patients") or {}
    if patients.get("test_with_train_patient"):
        caveats.append(f"{patients['test_with_train_patient']} test images share a patient "
                       f"(`{patients['column']}`) with the training split: the test numbers are optimistic "
                       "(the deduplicated AUC above leaves them out).")
    sens95 = at.get("sens95") or {}
    if sens95.get("specificity") is not None and sens95["specificity"] < 0.2:
        caveats.append(f"At sens95 the OOF specificity is only {_f(sens95['specificity'])}: that point calls "
                       "most lesions malignant.")
    if evaluation and (evaluation.get("n_positive") or 0) < SMALL_TEST:
        caveats.append(f"The test split holds {evaluation.get('n_positive')} malignant images: its intervals are "
                       "wide, and a difference smaller than them is not a difference.")
    flagged = [f"{r['column']} = {r['level']}" for r in ((evaluation or {}).get("subgroups") or {}).get("rows", [])
               if r.get("flagged")]
    if flagged:
        caveats.append(f"Sensitivity is below the overall in: {', '.join(flagged)}.")
    occluded = read_json(run.dir / OCCLUSION)
    if occluded and (warning := shortcut_warning(occluded)) is not None:
        caveats.append(f"{warning[0].upper()}{warning[1:].split('; ')[0]} ({occlusion_summary(occluded)}).")
    caveats.append("Trained on one source of images; performance on other devices, clinics and populations is "
                   "untested until measured there.")
    lines += ["## Caveats and recommendations", "", *[f"- {c}" for c in caveats], ""]

    recorded = (run.dir / ".hydra" / "overrides.yaml").is_file()
    ran = m.get("runtime")  # trainer.precision=auto resolves per machine: name what this run trained in
    trained_in = (f"; it trained in {ran['precision']} on the {'GPU' if ran['device'] == 'cuda' else 'CPU'} "
                  f"(trainer.precision={ran['precision']} asks for that elsewhere)") if ran else ""
    lines += ["## How to reproduce", "", "```",
              f"melanoma-train {' '.join(run.overrides)}".rstrip() if recorded else
              "# the run was not started by melanoma-train (no .hydra/overrides.yaml): its every key is in config.yaml",
              f"melanoma-eval ckpt={run.dir}{_evaluation_overrides(run)}", "```", "",
              f"at commit {origin.get('commit') or '(not recorded: provenance.json is missing)'}"
              f"{' plus uncommitted changes' if origin.get('dirty') else ''}; the resolved config is "
              f"`{run.dir / 'config.yaml'}`{trained_in}.", ""]
    return "\n".join(lines)


def write_model_card(run: Run, path: str | Path, export: dict | None = None) -> Path:
    """Write :func:`model_card` of ``run`` to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(model_card(run, export))
    return path
