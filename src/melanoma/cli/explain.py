"""``melanoma-explain``: Grad-CAM activation maps of a trained run (the work is in :mod:`melanoma.gradcam`).

    melanoma-explain ckpt=outputs/train/RUN                  # 4 benign + 4 malignant test images
    melanoma-explain ckpt=outputs/train/RUN/fold1/best.pt n=8 seed=1
    melanoma-explain ckpt=outputs/train/RUN input=/photos/   # unlabelled images

Writes ``activation_maps.png``, ``explain.csv`` (``path,label,prob,pred`` and where each map lies)
and, for the run's own labelled images, ``occlusion.json`` (:mod:`melanoma.occlusion`) into ``out``,
by default ``RUN/explain/``, where ``melanoma-report`` looks for them.
"""

from __future__ import annotations

import hydra
import pandas as pd
from omegaconf import DictConfig

from melanoma.cli import check_overrides
from melanoma.data import find_images
from melanoma.errors import report_user_errors
from melanoma.gradcam import explain
from melanoma.inference import find_checkpoints
from melanoma.runtime import resolve_runtime


def _preflight(cfg: DictConfig) -> None:
    """The checkpoint and the input exist, before Hydra creates the output folder."""
    find_checkpoints(cfg.ckpt)
    if cfg.input is not None:
        find_images(cfg.input)


def explain_run(cfg: DictConfig) -> pd.DataFrame:
    """Unpack the ``explain`` config and call :func:`explain`."""
    runtime = resolve_runtime(cfg.trainer.device, cfg.trainer.precision, cfg.trainer.channels_last)
    return explain(cfg.ckpt, runtime, input=cfg.input, n=cfg.n, split=cfg.split, seed=cfg.seed,
                   threshold=cfg.threshold, out=cfg.out, occlusion=cfg.occlusion)


@hydra.main(version_base="1.3", config_path="../configs", config_name="explain")
def _hydra_main(cfg: DictConfig) -> None:
    report_user_errors("melanoma-explain", explain_run, cfg)


def main() -> None:
    """Console entry point ``melanoma-explain``."""
    check_overrides("melanoma-explain", "explain", preflight=_preflight)
    _hydra_main()


if __name__ == "__main__":
    main()
