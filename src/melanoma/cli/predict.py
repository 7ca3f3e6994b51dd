"""``melanoma-predict``: score unlabelled images with a trained run.

    melanoma-predict ckpt=outputs/train/RUN input=/photos/lesions/
    melanoma-predict ckpt=outputs/train/RUN input=lesion.jpg threshold=youden tta=d4

Writes ``predictions.csv`` (``path,prob,decision``) with the run's operating threshold
(chosen on its out-of-fold predictions) unless ``threshold=`` says otherwise. Unreadable
files are skipped with a warning; every readable image gets one row.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from melanoma.checkpoint import write_csv
from melanoma.cli import check_overrides
from melanoma.data import find_images, readable_images
from melanoma.errors import DataError, log_to_file, report_user_errors
from melanoma.inference import find_checkpoints, load_ensemble, predict_paths, resolve_threshold, run_dir_of
from melanoma.runtime import resolve_runtime
from melanoma.stacking import with_stacker

log = logging.getLogger("melanoma.predict")


def _metadata_of(paths: list[str], csv: str | None, columns: list[str], reader: str = "the run's models"
                 ) -> pd.DataFrame | None:
    """The metadata rows of ``paths`` (in order) from ``csv`` (``path`` + columns, relative paths from its folder).

    Raises:
        DataError: fused models and no CSV, or an image without a row in it.
    """
    if not columns:
        if csv is not None:
            log.info("metadata=%s is not used: the run's models read images only", csv)
        return None
    if csv is None:
        raise DataError(f"{reader} also read metadata ({', '.join(columns)}); pass metadata=CSV with a path "
                        "column and those columns for the images (empty cells are unknown values)")
    source = Path(csv).expanduser()
    if not source.is_file():
        raise DataError(f"metadata={csv} does not exist; point it at a CSV with path,{','.join(columns)}")
    table = pd.read_csv(source, dtype=str, keep_default_na=False)
    if "path" not in table.columns:
        raise DataError(f"metadata={csv} has no 'path' column (columns: {', '.join(table.columns)})")
    resolved = [str((source.parent / p).resolve()) if not Path(p).is_absolute() else str(Path(p).resolve())
                for p in table["path"]]
    rows = table.assign(path=resolved).drop_duplicates("path").set_index("path")
    absent = [p for p in paths if str(Path(p).resolve()) not in rows.index]
    if absent:
        raise DataError(f"metadata={csv} has no row for {absent[0]} ({len(absent)} of {len(paths)} images have none); "
                        "add a row per image (empty cells are unknown values)")
    return rows.loc[[str(Path(p).resolve()) for p in paths]].reset_index()


def predict_images(cfg: DictConfig, out_dir: Path) -> pd.DataFrame:
    """Score the images of ``cfg.input`` and write ``out_dir/predictions.csv``.

    Returns:
        The predictions table.
    """
    runtime = resolve_runtime(cfg.trainer.device, cfg.trainer.precision, cfg.trainer.channels_last)
    ensemble = load_ensemble(cfg.ckpt, runtime)
    ensemble, stacked = with_stacker(run_dir_of(cfg.ckpt), ensemble, cfg.stack)
    ensemble, tta_warning = ensemble.for_tta(cfg.tta)  # thresholds chosen on OOF predictions with these views
    if tta_warning:
        log.warning("%s", tta_warning)
    name, threshold = resolve_threshold(cfg.threshold, ensemble)
    if warning := ensemble.degenerate_warning(name, threshold):
        log.warning("%s", warning)
    paths, bad = readable_images(cfg.input)
    columns = list(dict.fromkeys([*ensemble.metadata_columns, *(stacked.stacker.columns if stacked else [])]))
    metadata = _metadata_of(paths, cfg.metadata, columns,
                            "the run's models" if ensemble.metadata_columns else "the run's stacked trees")
    if stacked is not None:  # a missing column is found before any image is scored
        stacked.stacker.check_columns(metadata, f"metadata={cfg.metadata}")
    probs = predict_paths(ensemble, paths, runtime, cfg.tta, cfg.batch_size, cfg.num_workers, metadata=metadata,
                          source=f"metadata={cfg.metadata}").mean(0)
    image_probs = probs
    if stacked is not None:
        probs = stacked.stacker.predict(probs, metadata, f"metadata={cfg.metadata}")
    classes = ensemble.config["data"]["classes"]
    table = pd.DataFrame({"path": paths, "prob": probs})
    if stacked is not None:
        table["image_prob"] = image_probs
    table["decision"] = [classes[1] if p >= threshold else classes[0] for p in probs]
    write_csv(table, out_dir / "predictions.csv")
    how = f"stacked on {', '.join(stacked.stacker.columns)}, " if stacked is not None else ""
    summary = (f"{len(table)} images scored ({how}{len(bad)} unreadable skipped), {int((probs >= threshold).sum())} "
               f"called {classes[1]} at the {name} threshold {threshold:.4f} of {cfg.ckpt} (tta={cfg.tta}); "
               f"wrote {out_dir / 'predictions.csv'}")
    print(summary)
    log_to_file("melanoma.predict", logging.INFO, summary)  # predict.log says what this folder holds
    return table


def _preflight(cfg: DictConfig) -> None:
    """The checkpoint and the input exist, before Hydra creates the output folder."""
    find_checkpoints(cfg.ckpt)
    find_images(cfg.input)


@hydra.main(version_base="1.3", config_path="../configs", config_name="predict")
def _hydra_main(cfg: DictConfig) -> None:
    report_user_errors("melanoma-predict", predict_images, cfg, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    """Console entry point ``melanoma-predict``."""
    check_overrides("melanoma-predict", "predict", preflight=_preflight)
    _hydra_main()


if __name__ == "__main__":
    main()
