"""The pages of ``melanoma-report``'s ``report.pdf``, each drawn from the files of the runs.

Pages of ``report.pdf``, in order (a page that cannot be drawn is left out and listed on the
"skipped" page, so the count is a function of the input only):

1. title: data, date, code commit, runs, settings shared by every run, and what was skipped and
   why when that fits (else on a page of its own after the table)
2. the results table (18 runs a page)
4. heat maps of mean CV AUC over learning rate x batch size, one per model (needs 2 x 2 values)
   and, for an Optuna search (``hparams=optuna``), its optimisation history
5. one page per run: loss curves, out-of-fold confusion matrix, test confusion matrix if evaluated
6. ROC curves of the top 5 runs, out-of-fold (solid) and test (dashed)
7. augmentation samples of the best run's training transform
8. activation maps of the best run that has them (``melanoma-explain``)
9. the subgroup card of the best evaluated run that has one (``melanoma-eval``'s ``subgroups.csv``)
10. one page per run: its overrides and resolved config
"""

from __future__ import annotations

import subprocess
import tempfile
import textwrap
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from matplotlib.image import imread
from sklearn.metrics import RocCurveDisplay

import melanoma
from melanoma.checkpoint import atomic_path
from melanoma.plots import (
    matrix_threshold,
    plot_confusion_matrix,
    plot_loss_curves,
    plot_optimization_history,
    plot_subgroups,
    read_histories,
)
from melanoma.reporting.figures import (
    ACTIVATION_MAPS,
    FIGURE_ERRORS,
    attention_notes,
    augmentation_samples,
    describe_data,
)
from melanoma.reporting.runs import Run, Skipped
from melanoma.reporting.tables import Report, display_rows, format_cell

A4 = (11.69, 8.27)  # landscape, inches
TITLE_CHARS = 110  # a page title longer than this wraps onto a second line
NBSP = "\u00a0"  # a space that textwrap does not break at
SKIPPED_ON_TITLE = 12  # lines of "skipped" that the title page holds; more get a page of their own
TABLE_ROWS = 18
TOP_ROC = 5


def _page(title: str) -> Figure:
    fig = Figure(figsize=A4)
    fig.suptitle("\n".join(textwrap.wrap(title, TITLE_CHARS)), x=0.03, ha="left", fontsize=13, fontweight="bold")
    return fig


def _text_page(title: str, lines: list[str], fontsize: float = 9, columns: int = 1, family: str = "sans-serif",
               per_column: int = 60) -> Figure:
    fig = _page(title)
    for c in range(columns):
        chunk = lines[c * per_column:(c + 1) * per_column]
        fig.text(0.03 + c * 0.94 / columns, 0.92, "\n".join(chunk), va="top", fontsize=fontsize, family=family)
    if len(lines) > columns * per_column:
        fig.text(0.03, 0.02, f"... {len(lines) - columns * per_column} more lines", fontsize=fontsize)
    return fig


def _show(ax, path: Path | None, title: str, missing: str = "not available") -> None:
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    if path is not None and path.is_file():
        ax.imshow(imread(path))
    else:
        ax.text(0.5, 0.5, missing, ha="center", va="center", wrap=True, fontsize=9)


def _commit() -> str:
    here = str(Path(melanoma.__file__).resolve().parent)
    try:
        sha = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True, timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return sha + (" with uncommitted changes" if dirty else "")


def _title_page(report: Report, skipped_lines: list[str]) -> Figure:
    best, row = report.runs[0], report.table.iloc[0]
    shared = set.intersection(*(set(r.overrides) for r in report.runs))
    lines = [
        f"generated {datetime.now():%Y-%m-%d %H:%M} by melanoma {melanoma.__version__}, code commit {_commit()}",
        "", "data:", *sorted({f"    {describe_data(r)}" for r in report.runs}),
        "", f"{len(report.runs)} run{'s' * (len(report.runs) != 1)} from:", *[f"    {p}" for p in report.paths],
        "", f"best mean cross-validated AUC: {best.label} ({row['model']}), "
            f"{row['auc_mean']:.4f} ± {row['auc_std']:.4f}" if row["best"] else "no run has an AUC",
        "", "overrides shared by every run:", *textwrap.wrap(" ".join(sorted(shared)) or "none", 130,
                                                             initial_indent="    ", subsequent_indent="    "),
    ]
    n = len(report.skipped)
    if len(skipped_lines) <= SKIPPED_ON_TITLE:
        lines += ["", f"skipped or incomplete ({n}):", *[f"    {line}" for line in skipped_lines]]
    else:
        lines += ["", f"{n} item{'s' * (n != 1)} skipped or incomplete (page {2 + _table_pages(report)})"]
    return _text_page("melanoma report", lines, fontsize=11)


def _table_pages(report: Report) -> int:
    return -(-len(report.table) // TABLE_ROWS)


def _table_figures(report: Report):
    header, rows = display_rows(report)
    for start in range(0, len(rows), TABLE_ROWS):
        fig = _page("Results: cross-validation mean ± std over folds (threshold 0.5), sorted by AUC; ★ best")
        ax = fig.add_axes((0.02, 0.05, 0.96, 0.85))
        ax.axis("off")
        table = ax.table(cellText=rows[start:start + TABLE_ROWS], colLabels=header, loc="upper center",
                         cellLoc="center")
        table.auto_set_font_size(False)
        table.auto_set_column_width(list(range(len(header))))
        table.scale(1, 1.5)
        for size in (8, 7, 6, 5):  # columns fit their text: shrink the text until the table fits the page
            table.set_fontsize(size)
            fig.draw_without_rendering()
            if sum(cell.get_width() for (r, _), cell in table.get_celld().items() if r == 0) <= 1:
                break
        for (r, _), cell in table.get_celld().items():
            if r == 0:
                cell.set_text_props(fontweight="bold")
            elif start + r == 1 and report.table.loc[0, "best"]:
                cell.set_facecolor("#fff3c4")
        yield fig


def _heatmap(report: Report) -> Figure | Skipped:
    table = report.table
    grids = []
    for model, part in table.groupby("model", sort=False):
        lrs, sizes = sorted(part["lr"].dropna().unique()), sorted(part["batch_size"].dropna().unique())
        if len(lrs) >= 2 and len(sizes) >= 2:
            grid = part.pivot_table(index="lr", columns="batch_size", values="auc_mean", aggfunc="max")
            grids.append((model, grid.reindex(index=lrs, columns=sizes)))
    if not grids:
        values = {c: ", ".join(format_cell(v, "g") for v in sorted(table[c].dropna().unique())) or "none"
                  for c in ("lr", "batch_size")}
        return Skipped("heat map", "needs 2+ learning rates and 2+ batch sizes of one model; found lr "
                       f"{values['lr']} and batch size {values['batch_size']}")
    fig = _page("Mean cross-validated AUC over learning rate x batch size (best run per cell)")
    ncols = min(len(grids), 3)
    axes = fig.subplots(-(-len(grids) // ncols), ncols, squeeze=False)
    for ax in axes.flat[len(grids):]:
        ax.axis("off")
    for ax, (model, grid) in zip(axes.flat, grids, strict=False):
        values = grid.to_numpy(dtype=float)
        shown = ax.imshow(np.ma.masked_invalid(values), cmap="viridis")
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.3f}", ha="center", va="center",
                    color="black" if np.isnan(v) or v > np.nanmean(values) else "white")
        ax.set_xticks(range(len(grid.columns)), [f"{c:g}" for c in grid.columns])
        ax.set_yticks(range(len(grid.index)), [f"{i:g}" for i in grid.index])
        ax.set_xlabel("batch size")
        ax.set_ylabel("learning rate")
        ax.set_title(str(model))
        fig.colorbar(shown, ax=ax, label="mean AUC")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return fig


def _file_or_redrawn(run: Run, name: str, tmp: Path) -> Path | None:
    """The run's own figure, or the same figure redrawn from its files if it is missing."""
    if (run.dir / name).is_file():
        return run.dir / name
    try:
        if name == "loss_curves.png":
            histories = read_histories(run.dir)
            if not histories:
                return None
            plot_loss_curves(histories, tmp / name)
        else:
            oof = pd.read_csv(run.dir / "oof_predictions.csv")
            threshold, words = matrix_threshold(run.metrics)  # as plot_run draws it
            plot_confusion_matrix(oof["label"], oof["prob"], tmp / name, threshold, title=f"Out-of-fold, {words}")
    except FIGURE_ERRORS:
        return None
    return tmp / name


def _run_page(run: Run, row: pd.Series) -> Figure:
    fmt = format_cell
    fig = _page(f"{run.label}: {row['model']}, lr {fmt(row['lr'], 'g')}, batch size {fmt(row['batch_size'], 'g')}; "
                f"CV AUC {fmt(row['auc_mean'])} ± {fmt(row['auc_std'])}, "
                f"best epochs {str(row['best_epochs']).replace(' ', NBSP)}")  # the list is never split by the wrap
    evaluation = run.evaluation
    axes = fig.subplots(1, 3 if evaluation else 2, width_ratios=[1.5, 1.15, 1.15][:3 if evaluation else 2])
    with tempfile.TemporaryDirectory() as tmp:
        _show(axes[0], _file_or_redrawn(run, "loss_curves.png", Path(tmp)), "loss per fold",
              "no fold*/history.csv")
        _show(axes[1], _file_or_redrawn(run, "confusion_matrix.png", Path(tmp)), "out-of-fold predictions",
              "no oof_predictions.csv")
    if evaluation:
        _show(axes[2], evaluation.dir / "confusion_matrix.png",
              f"test ({evaluation.metrics.get('n_images')} images), AUC {fmt(row['test_auc'], '.3f')}")
    fig.text(0.03, 0.03, f"{run.dir}" + (f"; evaluation: {evaluation.dir}" if evaluation else ""), fontsize=7)
    fig.tight_layout(rect=(0, 0.05, 1, 0.93))
    return fig


def _roc(report: Report) -> Figure | Skipped:
    fig = _page(f"ROC curves of the top {TOP_ROC} runs: out-of-fold (solid) and test (dashed)")
    ax = fig.add_axes((0.3, 0.1, 0.45, 0.78))
    drawn = 0
    for run in report.runs[:TOP_ROC]:
        sources = [("out-of-fold", run.dir / "oof_predictions.csv", "-")]
        if run.evaluation:
            sources.append(("test", run.evaluation.dir / "predictions.csv", "--"))
        color = f"C{drawn}"
        for name, path, style in sources:
            try:
                pred = pd.read_csv(path)
                if pred["label"].nunique() < 2:
                    continue
                RocCurveDisplay.from_predictions(pred["label"], pred["prob"], ax=ax, name=f"{run.label} {name}",
                                                 pos_label=1).line_.set(linestyle=style, color=color)
            except FIGURE_ERRORS:  # a missing or unreadable file
                continue
        drawn += 1
    if not ax.lines:
        return Skipped("ROC curves", "no run has a readable oof_predictions.csv with both classes")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_aspect("equal")
    ax.legend(fontsize=7, loc="lower right")
    return fig


def _augmentation(report: Report) -> Figure | Skipped:
    run = report.runs[0]
    try:
        fig = augmentation_samples(run)
    except FIGURE_ERRORS as exc:
        return Skipped("augmentation samples", f"cannot rebuild {run.label}'s training transform or read its "
                                               f"images ({type(exc).__name__}: {exc})")
    fig.set_size_inches(*A4)
    fig.tight_layout(rect=(0.1, 0, 0.9, 1))
    return fig


def _activation_maps(report: Report) -> Figure | Skipped:
    for run in report.runs:
        if (run.dir / ACTIVATION_MAPS).is_file():
            fig = _page(f"Activation maps of {run.label} ({run.metrics.get('model')}), from melanoma-explain")
            notes = attention_notes(run)
            _show(fig.add_axes((0.03, 0.03 + 0.04 * len(notes), 0.94, 0.87 - 0.04 * len(notes))),
                  run.dir / ACTIVATION_MAPS, "")
            fig.text(0.03, 0.02, "\n\n".join(textwrap.fill(n, 110) for n in notes), fontsize=8, va="bottom")
            return fig
    return Skipped("activation maps", f"no run has {ACTIVATION_MAPS}: run melanoma-explain ckpt={report.runs[0].dir}")


def _subgroups(report: Report) -> Figure | Skipped:
    """The best evaluated run's subgroup card, redrawn from its evaluation's subgroups.csv and metrics.json."""
    for run in report.runs:
        card = run.evaluation.metrics.get("subgroups") if run.evaluation else None
        if card and (run.evaluation.dir / "subgroups.csv").is_file():
            table = pd.read_csv(run.evaluation.dir / "subgroups.csv")
            flagged = [f"{r.column} = {r.level}" for r in table.itertuples() if r.flagged]
            split = run.evaluation.metrics.get("split")
            fig = _page(f"Subgroups of {run.label} ({run.metrics.get('model')}) on {split} images at the "
                        f"{card.get('operating_point', '')} threshold {card['threshold']:.3g}; flagged (sensitivity "
                        f"CI below the overall): {', '.join(flagged) or 'none'}")
            with tempfile.TemporaryDirectory() as tmp:
                plot_subgroups(table, card["overall"], Path(tmp) / "subgroups.png",
                               f"{run.evaluation.dir}: AUC, sensitivity and specificity with "
                               f"{card['bootstrap']['level']:.0%} CIs")
                _show(fig.add_axes((0.03, 0.03, 0.94, 0.85)), Path(tmp) / "subgroups.png", "")
            return fig
    return Skipped("subgroup card", "no evaluated run has a subgroup card: run melanoma-eval ckpt=RUN "
                                    "(eval.subgroups=true, the default)")


def _config_page(run: Run) -> Figure:
    source = next((p for p in (run.dir / "config.yaml", run.dir / ".hydra" / "config.yaml") if p.is_file()), None)
    text = yaml.safe_dump(run.config, sort_keys=False) if run.config else "(no config.yaml)"
    lines = ["overrides:", *textwrap.wrap(" ".join(run.overrides) or "none", 60, initial_indent="  ",
                                          subsequent_indent="  "), ""]
    lines += [part for line in text.splitlines() for part in textwrap.wrap(line, 60, subsequent_indent="    ")]
    return _text_page(f"Config of {run.label} ({source or 'not recorded'})", lines, fontsize=7, columns=3,
                      family="monospace", per_column=56)


def _search(report: Report) -> Figure | None:
    """The optimisation history of the search the runs are the trials of (no page when there is none)."""
    search = report.search
    if search is None:
        return None
    fig = _page(f"Optuna search: {len(search.trials)} trials in {search.dir}; best {format_cell(search.best_value)} "
                f"with " + (", ".join(f"{k}={format_cell(v, 'g')}" for k, v in search.best_params.items()) or "none"))
    with tempfile.TemporaryDirectory() as tmp:
        plot_optimization_history(search.trials, Path(tmp) / "history.png",
                                  f"Optimisation history ({search.objective})", search.objective)
        _show(fig.add_axes((0.1, 0.05, 0.8, 0.82)), Path(tmp) / "history.png", "")
    return fig


def write_pdf(report: Report, path: Path) -> None:
    """Write ``report.pdf`` atomically; figures that cannot be drawn are added to ``report.skipped``."""
    optional = [_heatmap(report), _roc(report), _augmentation(report), _activation_maps(report), _subgroups(report)]
    report.skipped += [page for page in optional if isinstance(page, Skipped)]
    heatmap, roc, augmentation, activations, subgroups = (p if isinstance(p, Figure) else None for p in optional)
    skipped = [f"- {s}" for s in report.skipped] or ["nothing: every run and figure is in this report"]
    skipped_lines = [w for line in skipped for w in textwrap.wrap(line, 150, subsequent_indent="    ")]
    with atomic_path(path) as tmp, PdfPages(tmp, metadata={"Title": "melanoma report",
                                                           "Creator": "melanoma-report"}) as pdf:
        pdf.savefig(_title_page(report, skipped_lines))
        for fig in _table_figures(report):
            pdf.savefig(fig)
        if len(skipped_lines) > SKIPPED_ON_TITLE:  # else they are on the title page: no near-empty page
            pdf.savefig(_text_page("Skipped or incomplete", skipped_lines))
        if heatmap:
            pdf.savefig(heatmap)
        if (search := _search(report)) is not None:
            pdf.savefig(search)
        for run, (_, row) in zip(report.runs, report.table.iterrows(), strict=True):
            pdf.savefig(_run_page(run, row))  # one at a time: pages hold full-size images
        for fig in (roc, augmentation, activations, subgroups):
            if fig:
                pdf.savefig(fig)
        for run in report.runs:
            pdf.savefig(_config_page(run))


