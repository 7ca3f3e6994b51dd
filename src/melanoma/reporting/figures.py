"""The README's figures of a run (``melanoma-report --figures DIR``), each titled with its data.

``write_figures`` draws ``sample_augmented.png``, ``loss_curve.png``, ``roc_curve.png``,
``confusion_matrix.png`` and ``activation_map.png`` from the run's files, like every figure of
``report.pdf``.
"""

from __future__ import annotations

import contextlib
import json
import textwrap
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.image import imread

from melanoma.checkpoint import PREPROCESS
from melanoma.data import load_image
from melanoma.errors import MelanomaError
from melanoma.gradcam import attention_summary
from melanoma.occlusion import occlusion_summary
from melanoma.plots import (
    matrix_threshold,
    plot_augmented_samples,
    plot_confusion_matrix,
    plot_loss_curves,
    plot_run_roc,
    read_histories,
    save_figure,
)
from melanoma.reporting.runs import Run, Skipped
from melanoma.transforms import build_transforms, describe_vignette, split_augmentation

ACTIVATION_MAPS = Path("explain") / "activation_maps.png"  # where melanoma-explain ckpt=RUN writes
EXPLAIN_TABLE = Path("explain") / "explain.csv"
OCCLUSION = Path("explain") / "occlusion.json"
# What a figure may fail on: missing or moved files, configs without a key, a bad checkpoint.
FIGURE_ERRORS = (OSError, KeyError, TypeError, ValueError, pd.errors.ParserError, MelanomaError)


def describe_data(run: Run, short: bool = False) -> str:
    """Which images a run learned from, e.g. 'the ISIC UDA-1 demo set shipped with melanoma'."""
    data = run.config.get("data") or {}
    where = Path(str(data.get("root") or data.get("manifest")))
    if data.get("synthetic"):
        what = "synthetic demo data (melanoma-synth)"
    elif where.parent.name == "demo_data" and where.parent.parent.name == "melanoma":
        what = f"the {where.name} demo set shipped with melanoma (real dermoscopy)"
    elif data.get("root") or data.get("manifest"):
        what = f"{data.get('layout')} data at {where}"
    else:
        what = "data not recorded"
    n, positive = run.metrics.get("n_images"), run.metrics.get("n_positive")
    return what if short or n is None else f"{what}: {n} training images ({positive} malignant)"


def caption(run: Run, sep: str = ", ") -> str:
    """What a figure of ``run`` shows: data, folds, model (``sep="\\n"`` for narrow figures)."""
    return f"{describe_data(run, short=True)}{sep}{len(run.metrics['folds'])}-fold CV, {run.metrics.get('model')}"


def augmentation_samples(run: Run, path: Path | None = None, n_images: int = 4, n_views: int = 5,
                         title: str | None = None) -> Figure:
    """A few of the run's training images and draws of its training transform.

    The transform is rebuilt from the run's files: the augmentation recipe of its ``config.yaml``
    and the preprocessing of its ``preprocess.json`` (what the model's weights expected).

    Raises:
        OSError, KeyError, ValueError, MelanomaError: a file or config key it needs is missing.
    """
    _, aug = split_augmentation(run.config["augmentation"])  # preprocess.json has the preprocessing used
    recipe = aug.pop("name", "?")
    aug.pop("on_device", None)  # drawn here by the CPU path of the same recipe (statistically equivalent)
    pre = json.loads((run.dir / PREPROCESS).read_text())
    mean, std = pre["mean"], pre["std"]
    transform = build_transforms(pre["image_size"], train=True, mean=mean, std=std, crop_pct=pre["crop_pct"],
                                 interpolation=pre.get("interpolation", "bilinear"), **aug)
    folds = pd.read_csv(run.dir / "folds.csv")
    picks = pd.concat([part.sample(min(len(part), n_images // 2 or 1), random_state=0)
                       for _, part in folds.groupby("label")])
    classes = run.config["data"].get("classes") or ["benign", "malignant"]
    vignette = f" + {drawn}" if (drawn := describe_vignette(aug)) else ""
    title = title or (f"Training augmentation '{recipe}'{vignette} at {run.config['data']['image_size']} px: "
                      f"{caption(run)}")
    return plot_augmented_samples([load_image(p) for p in picks["path"]], transform, mean, std, path,
                                  n_views=n_views, names=[classes[int(y)] for y in picks["label"]], title=title)


def attention_notes(run: Run) -> list[str]:
    """What ``melanoma-explain`` measured of where the run's model looks, one line each.

    The Grad-CAM mass on the lesion and in the corners (from ``explain/explain.csv``) and the
    occlusion test (``explain/occlusion.json``), where the run has them.
    """
    notes = []
    with contextlib.suppress(FIGURE_ERRORS):  # missing, or from an older melanoma-explain: no note
        table = pd.read_csv(run.dir / EXPLAIN_TABLE)
        if {"cam_lesion", "lesion_area", "cam_corners", "corner_area", "peak"} <= set(table.columns):
            notes.append(attention_summary(table))
    with contextlib.suppress(FIGURE_ERRORS):
        notes.append(occlusion_summary(json.loads((run.dir / OCCLUSION).read_text())))
    return notes


def _activation_figure(run: Run, path: Path) -> None:
    """melanoma-explain's figure with a caption band naming the data and what the maps show, at its own pixel size."""
    image = imread(run.dir / ACTIVATION_MAPS)
    h, w = image.shape[:2]
    width = max(60, int(w / 12.5))  # characters that fit: 10 pt at 150 dpi is ~12.5 px per character
    lines = [part for line in [f"Grad-CAM activation maps: {caption(run)}", *attention_notes(run)]
             for part in textwrap.wrap(line, width)]
    band = 30 + 30 * len(lines)  # pixels
    fig = Figure(figsize=(w / 150, (h + band) / 150))
    ax = fig.add_axes((0, 0, 1, h / (h + band)))
    ax.imshow(image, interpolation="none")
    ax.axis("off")
    fig.text(0.5, 1 - band / 2 / (h + band), "\n".join(lines), ha="center", va="center")
    save_figure(fig, path, tight=False)


def write_figures(run: Run, out: Path) -> list[Skipped]:
    """The README's figures of one run, each titled with the data it shows.

    Writes ``sample_augmented.png``, ``loss_curve.png``, ``roc_curve.png``, ``confusion_matrix.png`` (test split at
    the evaluation's operating point, else out-of-fold at the run's) and ``activation_map.png`` (from
    ``melanoma-explain``) into ``out``.

    Returns:
        The figures that could not be drawn, with the reason.
    """
    about = caption(run)

    def loss_curve(path: Path) -> None:
        histories = read_histories(run.dir)
        if not histories:
            raise FileNotFoundError(f"no {run.dir}/fold*/history.csv")
        best = {f["fold"]: f["best_epoch"] for f in run.metrics.get("folds", []) if "best_epoch" in f}
        plot_loss_curves(histories, path, title=f"Loss per fold (solid train, dashed validation, star: kept)\n{about}",
                         best_epochs=best)

    def confusion_matrix(path: Path) -> None:
        if run.evaluation:
            e = run.evaluation.metrics
            pred, threshold = pd.read_csv(run.evaluation.dir / "predictions.csv"), e["threshold"]
            title = f"Test split ({len(pred)} images), {e['operating_point']} threshold {threshold:.3g}"
        else:  # the operating point a user of the run would apply, as the test split's matrix
            pred = pd.read_csv(run.dir / "oof_predictions.csv")
            threshold, words = matrix_threshold(run.metrics)
            title = f"Out-of-fold predictions, {words}"
        title += "\n" + caption(run, sep="\n")
        plot_confusion_matrix(pred["label"], pred["prob"], path, threshold, title=title)

    def activation_map(path: Path) -> None:
        if not (run.dir / ACTIVATION_MAPS).is_file():
            raise FileNotFoundError(f"no {run.dir / ACTIVATION_MAPS}: run melanoma-explain ckpt={run.dir}")
        _activation_figure(run, path)

    out.mkdir(parents=True, exist_ok=True)
    skipped = []
    for name, draw in (("sample_augmented", lambda path: augmentation_samples(run, path)),
                       ("loss_curve", loss_curve), ("roc_curve", lambda path: plot_run_roc(run.dir, path, title=(
                           f"ROC curve, out-of-fold\n{about}"))), ("confusion_matrix", confusion_matrix),
                       ("activation_map", activation_map)):
        try:
            draw(out / f"{name}.png")
        except FIGURE_ERRORS as exc:
            skipped.append(Skipped(str(out / f"{name}.png"), str(exc) if isinstance(exc, FileNotFoundError)
                                   else f"{type(exc).__name__}: {exc}"))
    return skipped
