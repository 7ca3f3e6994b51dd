"""``melanoma-report``: one results table, as CSV, markdown and PDF, over training runs and sweeps.

    melanoma-report multirun/train/2026-01-01_12-00-00            # a sweep; writes into it
    melanoma-report outputs/train/RUN_A outputs/train/RUN_B outputs/eval --out reports/ab
    melanoma-report outputs/train/RUN outputs/eval/DATE --out reports/run --figures assets  # + README PNGs

Every ``metrics.json`` under the PATHs is read (see :mod:`melanoma.reporting.tables`); the figures
are drawn from the runs' files alone (:mod:`melanoma.reporting.pdf`, :mod:`melanoma.reporting.figures`).
"""

from __future__ import annotations

from pathlib import Path

from melanoma.checkpoint import atomic_path, write_csv
from melanoma.cli import argument_parser
from melanoma.errors import report_user_errors
from melanoma.plots import plot_optimization_history
from melanoma.reporting.figures import write_figures
from melanoma.reporting.model_card import NAME as CARD
from melanoma.reporting.model_card import write_model_card
from melanoma.reporting.pdf import write_pdf
from melanoma.reporting.tables import Report, build_report, to_markdown


def write_report(paths: list[str], out: Path, figures: Path | None = None) -> Report:
    """Collect the runs under ``paths`` and write ``results.csv``, ``results.md``, ``report.pdf`` and the best
    run's ``MODEL_CARD.md``.

    Args:
        paths: run directories, sweep directories, evaluation directories or folders above them.
        out: output folder.
        figures: also write the best run's README figures there (see :func:`melanoma.reporting.figures.write_figures`).

    Returns:
        What was reported.

    Raises:
        DataError: no finished run under any of the paths (nothing is written).
    """
    report = build_report(paths)
    write_pdf(report, out / "report.pdf")  # first: it adds the figures it had to leave out to the list
    if figures is not None:
        report.skipped += write_figures(report.runs[0], figures)
    write_csv(report.table, out / "results.csv")
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(to_markdown(report))
    write_model_card(report.runs[0], out / CARD)
    if report.search is not None:
        plot_optimization_history(report.search.trials, out / "optimization_history.png",
                                  f"Optimisation history of {report.search.dir.name} ({report.search.objective})",
                                  report.search.objective)
    return report


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``melanoma-report``."""
    parser = argument_parser("melanoma-report", __doc__)
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="run, multirun or melanoma-eval directories, or folders above them")
    parser.add_argument("--out", type=Path, help="output folder (default: the PATH, when only one is given)")
    parser.add_argument("--figures", type=Path, metavar="DIR",
                        help="also write the best run's figures as PNGs (sample_augmented, loss_curve, "
                             "roc_curve, confusion_matrix, activation_map) into DIR, captioned with their data")
    args = parser.parse_args(argv)
    if args.out is None and len(args.paths) > 1:
        parser.error("several PATHs given: name the output folder with --out DIR")
    out = args.out or Path(args.paths[0])
    report = report_user_errors("melanoma-report", write_report, args.paths, out, args.figures)
    print(to_markdown(report))
    print(f"wrote {out / 'results.csv'}, {out / 'results.md'}, {out / 'report.pdf'}, {out / CARD} (of the best run)"
          + (f" and the figures in {args.figures}" if args.figures else ""))


if __name__ == "__main__":
    main()
