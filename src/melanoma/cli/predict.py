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
from melanoma.data import find_images, scan_images
from melanoma.errors import DataError, log_to_file, report_user_errors
from melanoma.inference import find_checkpoints, load_ensemble, predict_paths, resolve_threshold
from melanoma.runtime import resolve_runtime

log = logging.getLogger("melanoma.predict")


def predict_images(cfg: DictConfig, out_dir: Path) -> pd.DataFrame:
    """Score the images of ``cfg.input`` and write ``out_dir/predictions.csv``.

    Returns:
        The predictions table.
    """
    runtime = resolve_runtime(cfg.trainer.device, cfg.trainer.precision, cfg.trainer.channels_last)
    ensemble = load_ensemble(cfg.ckpt, runtime)
    name, threshold = resolve_threshold(cfg.threshold, ensemble)
    if warning := ensemble.degenerate_warning(name, threshold):
        log.warning("%s", warning)
    paths = find_images(cfg.input)
    bad = {p for p, _ in scan_images(paths, "skip")}
    paths = [p for p in paths if p not in bad]
    if not paths:
        raise DataError(f"none of the images in input={cfg.input} could be read")
    probs = predict_paths(ensemble, paths, runtime, cfg.tta, cfg.batch_size, cfg.num_workers).mean(0)
    classes = ensemble.config["data"]["classes"]
    table = pd.DataFrame({"path": paths, "prob": probs})
    table["decision"] = [classes[1] if p >= threshold else classes[0] for p in probs]
    write_csv(table, out_dir / "predictions.csv")
    summary = (f"{len(table)} images scored ({len(bad)} unreadable skipped), {int((probs >= threshold).sum())} "
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
