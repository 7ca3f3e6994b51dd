"""``melanoma-export``: a run's fold ensemble as one ONNX or TorchScript file (the work is in :mod:`melanoma.export`).

    melanoma-export ckpt=outputs/train/RUN                             # RUN/export/model.onnx
    melanoma-export ckpt=outputs/train/RUN format=torchscript tta=flip out=deploy/

Writes ``model.onnx`` (or ``model.pt``), ``model.json`` (inputs, output, thresholds, versions) and
``MODEL_CARD.md`` into ``out``, by default ``RUN/export/``. The model file is kept only if it gives
melanoma-eval's probabilities, within ``tolerance``, on ``n_images`` real images of the run's data.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from melanoma.checkpoint import write_json
from melanoma.cli import check_overrides
from melanoma.data import find_images, load_eval_set, readable_images
from melanoma.errors import DataError, log_to_file, report_user_errors
from melanoma.export import SUFFIX, export_ensemble, image_batch, model_description
from melanoma.inference import Ensemble, find_checkpoints, load_ensemble, predict_paths, run_dir_of
from melanoma.reporting.model_card import NAME as CARD
from melanoma.reporting.model_card import find_run, write_model_card
from melanoma.runtime import resolve_runtime

log = logging.getLogger("melanoma.export")


def _check_images(ensemble: Ensemble, images: str | None, n: int) -> pd.DataFrame:
    """``n`` real images to check the export on (with the fused models' metadata columns).

    Raises:
        DataError: the run's data is gone (pass images=), or fused models and images= (no metadata for them).
    """
    if images is not None:
        if ensemble.encoders:
            raise DataError(f"images={images}: the run's models are fused with metadata "
                            f"({', '.join(ensemble.metadata_columns)}), which a folder of images lacks; leave images= "
                            "out to check on the run's own data")
        table = pd.DataFrame({"path": readable_images(images, "images")[0]})
    else:
        data = ensemble.config["data"]
        try:
            table, _ = load_eval_set(data | {"on_bad_file": "skip"}, "test", "export",
                                     columns=ensemble.metadata_columns)
        except DataError as exc:
            try:  # a layout without a test split: any of its images
                table, _ = load_eval_set(data | {"on_bad_file": "skip"}, "all", "export",
                                         columns=ensemble.metadata_columns)
            except DataError:
                raise DataError(f"the run's data cannot be read to check the export ({exc}); pass images=FOLDER "
                                "with a few real images of the kind the model scores") from None
    if len(table) < 2:
        raise DataError(f"the export is checked on at least 2 readable images; {len(table)} found "
                        f"({images or 'the run data'}); pass images=FOLDER")
    step = max(1, len(table) // n)  # spread over the list (both classes of a sorted layout)
    return table.iloc[::step].head(n).reset_index(drop=True)


def export_run(cfg: DictConfig, out_dir: Path) -> dict:
    """Export ``cfg.ckpt`` into ``out_dir``; returns ``model.json``'s content."""
    runtime = resolve_runtime("cpu", "fp32", channels_last=False)  # the reference melanoma-eval computes on a CPU
    ensemble, tta_warning = load_ensemble(cfg.ckpt, runtime).for_tta(cfg.tta)  # model.json's thresholds: these views'
    if tta_warning:
        log.warning("%s", tta_warning)
    sample = _check_images(ensemble, cfg.images, cfg.n_images)
    paths = sample["path"].tolist()
    encoded = ensemble.encode(sample, f"the data of {run_dir_of(cfg.ckpt)}")
    reference = predict_paths(ensemble, paths, runtime, cfg.tta, num_workers=0, metadata=sample,
                              source="the run's data").mean(0)
    file = f"model{SUFFIX[cfg.format]}"
    check = export_ensemble(ensemble, out_dir / file, cfg.format, image_batch(paths, ensemble.preprocess), reference,
                            metadata=encoded, tta=cfg.tta, tolerance=cfg.tolerance)
    description = model_description(ensemble, cfg.format, file, cfg.tta, check)
    write_json(description, out_dir / "model.json")
    card = "no model card (ckpt= names one checkpoint, not a finished run)"
    if Path(cfg.ckpt).expanduser().is_dir():
        try:
            card = str(write_model_card(find_run(cfg.ckpt), out_dir / CARD, description))
        except DataError as exc:  # the model file is good; only the card lacks its source
            card = f"no model card ({exc})"
    summary = (f"{len(ensemble.models)} models, tta={cfg.tta}: {out_dir / file} ({cfg.format}) reproduces "
               f"melanoma-eval within {max(check['max_abs_diff'], check['max_abs_diff_batch1']):.1e} on {len(paths)} "
               f"images (batch {len(paths)} and 1); wrote {out_dir / 'model.json'} and {card}; "
               f"recommended threshold {ensemble.operating_point} = "
               f"{float(np.float64(ensemble.thresholds.get(ensemble.operating_point, 0.5))):.4f}")
    print(summary)
    log_to_file("melanoma.export", logging.INFO, summary)
    return description


def _preflight(cfg: DictConfig) -> None:
    """The checkpoint (and images=) exist, before Hydra creates the output folder."""
    find_checkpoints(cfg.ckpt)
    if cfg.images is not None:
        find_images(cfg.images)


@hydra.main(version_base="1.3", config_path="../configs", config_name="export")
def _hydra_main(cfg: DictConfig) -> None:
    report_user_errors("melanoma-export", export_run, cfg, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    """Console entry point ``melanoma-export``."""
    check_overrides("melanoma-export", "export", preflight=_preflight)
    _hydra_main()


if __name__ == "__main__":
    main()
