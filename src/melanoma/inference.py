"""Loading trained fold models as an ensemble and predicting with test-time augmentation.

Images are decoded once per batch; every fold model and every TTA view reuses the same
batch tensor, so an ensemble of three models with 8 views still decodes each JPEG once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from melanoma.calibration import scale_logits
from melanoma.checkpoint import load_checkpoint
from melanoma.data import ImageDataset, make_loader, resolve_num_workers
from melanoma.errors import ConfigError, DataError, WeightsError, raise_if_stopped
from melanoma.fusion import fuse
from melanoma.metadata import MetadataEncoder
from melanoma.metrics import degenerate_operating_point
from melanoma.models import create_model
from melanoma.runtime import Runtime
from melanoma.transforms import eval_transform

TTA = Literal["none", "flip", "d4"]


def run_dir_of(ckpt: str | Path) -> Path:
    """The training run that ``ckpt`` (a run directory or a fold's ``best.pt``) belongs to."""
    path = Path(ckpt).expanduser()
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name.startswith("fold") else path.parent


def find_checkpoints(ckpt: str | Path) -> list[Path]:
    """The checkpoints named by ``ckpt``: one ``.pt`` file, or every ``fold*/best.pt`` of a run.

    Raises:
        WeightsError: nothing to load there.
    """
    path = Path(ckpt).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(path.glob("fold*/best.pt"), key=lambda p: int(p.parent.name.removeprefix("fold") or 0))
        if found:
            return found
        raise WeightsError(f"ckpt={path} holds no fold*/best.pt; point it at a training run directory "
                           "or at one checkpoint file")
    raise WeightsError(f"ckpt={path} does not exist; point it at a training run directory or a .pt file")


@dataclass
class Ensemble:
    """Fold models that share one preprocessing, with what their training run decided.

    Attributes:
        models: the models, in eval mode on the runtime's device.
        paths: their checkpoint files.
        config: the resolved training config of the first checkpoint.
        preprocess: how the models' input was made (``transforms.Preprocess.to_dict``: image_size, resize,
            crop_pct, interpolation, mean, std; older runs lack resize and interpolation).
        thresholds: operating points chosen on the run's out-of-fold predictions.
        operating_point: the name of the run's chosen threshold.
        temperatures: each model's calibration temperature (1 for an uncalibrated model).
        oof_at_thresholds: out-of-fold metrics at each operating point, as training measured them.
        encoders: each fused model's metadata encoding (fitted on its fold's training part); empty for
            image-only models.
        thresholds_by_tta: operating points chosen on OOF predictions made with each TTA mode
            (``cv.oof_tta``), ``{mode: {name: threshold}}``; empty for runs without them.
        oof_at_thresholds_by_tta: the OOF metrics at those, ``{mode: {name: metrics}}``.
        thresholds_tta: the TTA mode of the OOF predictions that ``thresholds`` were chosen on (:meth:`for_tta`).
        stacked: the thresholds are a metadata stacker's (:meth:`melanoma.stacking.RunStacker.operating_points_of`).
    """

    models: list[nn.Module]
    paths: list[Path]
    config: dict
    preprocess: dict
    thresholds: dict
    operating_point: str
    temperatures: list[float]
    oof_at_thresholds: dict
    encoders: list[MetadataEncoder] = field(default_factory=list)
    thresholds_by_tta: dict = field(default_factory=dict)
    oof_at_thresholds_by_tta: dict = field(default_factory=dict)
    thresholds_tta: str = "none"
    stacked: bool = False

    @property
    def metadata_columns(self) -> list[str]:
        """The manifest columns the models read besides the image (none for image-only models)."""
        return list(self.encoders[0].columns) if self.encoders else []

    def encode(self, metadata: pd.DataFrame | None, source: str) -> np.ndarray | None:
        """Every fused model's encoding of ``metadata``, side by side (``None`` for image-only models).

        Raises:
            DataError: a column the models need is missing from ``metadata`` (from ``source``).
        """
        if not self.encoders:
            return None
        missing = [c for c in self.metadata_columns if metadata is None or c not in metadata.columns]
        if missing:
            raise DataError(f"{source} has no metadata column {missing[0]!r}, which the fused models of "
                            f"{self.paths[0].parent.parent} read (they need {', '.join(self.metadata_columns)}); "
                            "add the column (empty cells are unknown values)")
        return np.concatenate([encoder.transform(metadata) for encoder in self.encoders], axis=1)

    def split_encoding(self, encoded: np.ndarray | None) -> list[np.ndarray | None]:
        """:meth:`encode`'s columns cut into each model's own part (``None`` per model when image-only)."""
        if encoded is None:
            return [None] * len(self.models)
        edges = np.cumsum([0, *(e.width for e in self.encoders)])
        return [encoded[:, a:b] for a, b in zip(edges[:-1], edges[1:], strict=True)]

    def for_tta(self, tta: str) -> tuple[Ensemble, str | None]:
        """The ensemble whose operating points were chosen on OOF predictions made with ``tta``.

        Averaging TTA views moves probabilities, so a threshold chosen without them need not keep its
        out-of-fold sensitivity and specificity with them. Returns the ensemble with the matching
        thresholds and OOF metrics (``thresholds_tta`` set to ``tta``), or, where the run has none for
        that mode (not in ``cv.oof_tta``, or stacked thresholds), the ensemble as it is and a one-line warning.
        """
        if tta == "none":
            return self, None
        if tta in self.thresholds_by_tta:
            return replace(self, thresholds=dict(self.thresholds_by_tta[tta]), thresholds_tta=tta,
                           oof_at_thresholds=dict(self.oof_at_thresholds_by_tta.get(tta, {}))), None
        if self.stacked:
            return self, (f"tta={tta}: the stacked thresholds were chosen on out-of-fold predictions without TTA, "
                          "so their OOF sensitivity and specificity may not hold with it; tta=none matches them")
        return self, (f"tta={tta}: the thresholds of {run_dir_of(self.paths[0])} were chosen on out-of-fold "
                      "predictions without TTA, so their OOF sensitivity and specificity may not hold with it; "
                      f"train with cv.oof_tta=[{tta}] to choose them with it")

    def degenerate_warning(self, name: str, threshold: float) -> str | None:
        """The one-line warning when the named point kept too little OOF specificity, else ``None``."""
        oof = self.oof_at_thresholds.get(name)
        return degenerate_operating_point(name, threshold, oof) if oof else None


def load_ensemble(ckpt: str | Path, runtime: Runtime) -> Ensemble:
    """Load every checkpoint named by ``ckpt`` (weights only, never executing a pickle).

    Raises:
        WeightsError: a checkpoint is missing, broken, or its weights do not fit its model.
        ConfigError: the checkpoints were trained with different preprocessing.
    """
    models, temperatures, encoders, paths, first = [], [], [], find_checkpoints(ckpt), None
    for path in paths:
        payload = load_checkpoint(path)
        config, preprocess = payload.get("config", {}), payload.get("preprocess")
        if preprocess is None or "model" not in config:
            raise WeightsError(f"{path} lacks the training config or preprocessing; was it written by melanoma-train?")
        encoder = MetadataEncoder.from_dict(payload["metadata"]) if payload.get("fusion", "none") != "none" else None
        model = fuse(create_model(config["model"]["name"], pretrained=False, num_classes=1),
                     payload.get("fusion", "none"), encoder.width if encoder else 0)
        if encoder is not None:
            encoders.append(encoder)
        try:
            model.load_state_dict(payload["model"])
        except RuntimeError as exc:
            raise WeightsError(f"{path}: its weights do not fit {config['model']['name']} "
                               f"({str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else exc})"
                               ) from None
        models.append(model.to(runtime.device, memory_format=runtime.memory_format).eval())
        temperatures.append(float(payload.get("temperature", 1.0)))
        if first is None:
            first = payload
        elif (name := config["model"]["name"]) != (first_name := first["config"]["model"]["name"]):
            raise ConfigError(f"{path} is a {name}, {paths[0]} a {first_name}: one ensemble holds one architecture; "
                              "evaluate them separately")
        elif preprocess != first["preprocess"]:
            raise ConfigError(f"{path} was trained with {preprocess}, {paths[0]} with {first['preprocess']}; "
                              "evaluate them separately")
        elif (fusion := payload.get("fusion", "none")) != (first_fusion := first.get("fusion", "none")):
            raise ConfigError(f"{path} has model.fusion={fusion}, {paths[0]} model.fusion={first_fusion}: one "
                              "ensemble reads one kind of input; evaluate them separately")
    return Ensemble(models, paths, first["config"], first["preprocess"], first.get("thresholds", {"0.5": 0.5}),
                    first.get("operating_point", "0.5"), temperatures, first.get("oof_at_thresholds", {}), encoders,
                    first.get("thresholds_by_tta") or {}, first.get("oof_at_thresholds_by_tta") or {})


def tta_views(images: torch.Tensor, tta: TTA) -> list[torch.Tensor]:
    """Label-preserving views of a batch (N, C, H, W).

    ``none``: the batch; ``flip``: plus its horizontal mirror; ``d4``: the 8 elements of the
    dihedral group, the four 90-degree rotations of the image and of its mirror.
    """
    if tta == "none":
        return [images]
    if tta == "flip":
        return [images, images.flip(-1)]
    if tta == "d4":
        mirror = images.flip(-1)
        return [torch.rot90(x, k, dims=(-2, -1)) for x in (images, mirror) for k in range(4)]
    raise ConfigError(f"eval.tta={tta!r} is not one of none, flip, d4")


@torch.inference_mode()
def predict_probs(models: list[nn.Module], loader: DataLoader, runtime: Runtime, tta: TTA = "none",
                  temperatures: list[float] | None = None, widths: list[int] | None = None) -> np.ndarray:
    """Probability of malignancy from each model, averaged over TTA views.

    ``temperatures`` (one per model, default 1) divide each model's logits before the sigmoid. A loader
    of ``(images, metadata, labels)`` feeds fused models: ``widths`` says how many metadata columns
    each model reads, side by side (:meth:`Ensemble.encode`).

    Returns:
        An array (models x images); the ensemble's prediction is its mean over axis 0.
    """
    tta_views(torch.zeros(1, 1, 2, 2), tta)  # validate before the first batch
    out = [[] for _ in models]
    temperatures = temperatures or [1.0] * len(models)
    offsets = np.cumsum([0, *(widths or [])])
    if widths and len(widths) != len(models):
        raise ValueError(f"widths names {len(widths)} models' metadata, for {len(models)} models")
    for images, *metadata, _ in tqdm(loader, desc="predict", leave=False, disable=None, dynamic_ncols=True):
        raise_if_stopped()
        images = images.to(runtime.device, non_blocking=True, memory_format=runtime.memory_format)
        metadata = [m.to(runtime.device, non_blocking=True) for m in metadata]
        if metadata and not widths:
            raise ValueError("the batches carry metadata: pass widths, each model's share of its columns")
        views = tta_views(images, tta)
        for i, (model, temperature) in enumerate(zip(models, temperatures, strict=True)):
            extra = [metadata[0][:, offsets[i]:offsets[i + 1]]] if metadata else []  # this model's own encoding
            with runtime.autocast():
                probs = [torch.sigmoid(scale_logits(model(v, *extra).squeeze(1).float(), temperature)) for v in views]
            out[i].append(torch.stack(probs).mean(0))
    return np.stack([torch.cat(p).cpu().numpy() for p in out])


def predict_paths(ensemble: Ensemble, paths: list[str], runtime: Runtime, tta: TTA = "none",
                  batch_size: int = 128, num_workers: int | str = "auto", metadata: pd.DataFrame | None = None,
                  source: str = "the metadata") -> np.ndarray:
    """Score image files with every model of ``ensemble``, preprocessed as they were trained.

    Args:
        metadata: for fused models, one row per path (in order) with their metadata columns; ignored
            by image-only models.
        source: where ``metadata`` came from, for the error of a missing column.

    Returns:
        An array (models x images) of probabilities of malignancy.

    Raises:
        DataError: fused models and ``metadata`` lacks one of their columns.
    """
    pre = ensemble.preprocess
    transform = eval_transform(pre)
    encoded = ensemble.encode(metadata, source)
    loader = make_loader(ImageDataset(paths, [0] * len(paths), transform, metadata=encoded), batch_size, train=False,
                         num_workers=resolve_num_workers(num_workers), seed=0,
                         pin_memory=runtime.device.type == "cuda")
    return predict_probs(ensemble.models, loader, runtime, tta, ensemble.temperatures,
                         [e.width for e in ensemble.encoders])


def resolve_threshold(choice: str | float | None, ensemble: Ensemble) -> tuple[str, float]:
    """The (name, value) of ``eval.threshold``: a named operating point, a number, or the run's choice.

    Raises:
        ConfigError: unknown name or a number outside [0, 1].
    """
    if choice is None:
        choice = ensemble.operating_point
    if isinstance(choice, str) and choice in ensemble.thresholds:
        return choice, float(ensemble.thresholds[choice])
    try:
        value = float(choice)
    except (TypeError, ValueError):
        raise ConfigError(f"threshold={choice!r} is not one of {', '.join(ensemble.thresholds)} "
                          "or a number in [0, 1]") from None
    if not 0 <= value <= 1:
        raise ConfigError(f"threshold={value} must be in [0, 1]")
    return f"{value:g}", value
