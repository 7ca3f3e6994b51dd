"""A run's fold ensemble as one self-contained model file: ONNX or TorchScript, checked against melanoma-eval.

The exported graph takes a batch of uint8 RGB images ``(N, 3, S, S)``, resized and centre-cropped as
the run's evaluation does (:func:`melanoma.transforms.eval_pixels`), and returns the ensemble's
probability of malignancy ``(N,)``. Everything else is inside: the scaling to [0, 1], the run's
normalisation, every fold model with its calibration temperature, the TTA views and the means over
views and models, so an app needs only the file and its ``model.json``. Fused models
(``model.fusion=concat``) take a second input, the encoded metadata, whose encoding ``model.json``
spells out.

The ONNX file comes from ``torch.onnx.export``'s ``torch.export``-based exporter (opset :data:`OPSET`,
a dynamic batch axis), is checked with ``onnx.checker`` and run with ``onnxruntime``. TorchScript
(``torch.jit.trace``) is deprecated by PyTorch but still what many C++ and mobile runtimes load.
Either file is written only after it reproduced :func:`melanoma.inference.predict_paths` (what
melanoma-eval scores with) on real images within a tolerance, at batch sizes 1 and N.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from melanoma.calibration import scale_logits
from melanoma.checkpoint import atomic_path
from melanoma.data import load_image
from melanoma.errors import ConfigError, ExportError
from melanoma.inference import Ensemble
from melanoma.provenance import versions
from melanoma.transforms import eval_pixels

log = logging.getLogger(__name__)

Format = Literal["onnx", "torchscript"]
FORMATS = ("onnx", "torchscript")
TTAS = ("none", "flip", "d4")
OPSET = 18  # ONNX opset: onnxruntime >= 1.14, TensorRT 8.6+, ONNX.js and CoreML converters read it
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
INPUT, METADATA, OUTPUT = "images", "metadata", "prob"


def _views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """:func:`melanoma.inference.tta_views` from flips and transposes, which every exporter has (``rot90`` is not
    an ONNX operator): a quarter turn is a mirror then a transpose."""
    if tta == "none":
        return [x]
    mirror = x.flip(-1)
    if tta == "flip":
        return [x, mirror]
    views = []
    for start in (x, mirror):
        view = start
        for _ in range(4):
            views.append(view)
            view = view.flip(-1).transpose(-2, -1)
    return views


class EnsembleGraph(nn.Module):
    """uint8 images (and encoded metadata) in, the calibrated ensemble's probability of malignancy out.

    Args:
        models: the fold models, in eval mode on the CPU.
        mean, std: the run's per-channel normalisation, in [0, 1] units.
        temperatures: each model's calibration temperature.
        tta: ``none``, ``flip`` or ``d4``: the views averaged, as ``eval.tta`` does.
        widths: each fused model's metadata columns, side by side in the second input; empty for image-only models.
    """

    def __init__(self, models: Sequence[nn.Module], mean: Sequence[float], std: Sequence[float],
                 temperatures: Sequence[float], tta: str = "none", widths: Sequence[int] = ()) -> None:
        super().__init__()
        if tta not in TTAS:
            raise ConfigError(f"tta={tta!r} is not one of {', '.join(TTAS)}")
        self.models = nn.ModuleList(models)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.temperatures = [float(t) for t in temperatures]  # traced as constants, with inference's clipping
        self.tta = tta
        self.edges = [int(e) for e in np.cumsum([0, *widths])] if widths else []

    def forward(self, images: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        x = (images.float() / 255.0 - self.mean) / self.std  # transforms v2: ToDtype(scale=True), Normalize
        views = _views(x, self.tta)
        batch = torch.cat(views)  # every view through each model at once
        total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
        for i, model in enumerate(self.models):
            extra = []
            if self.edges:
                extra = [metadata[:, self.edges[i]:self.edges[i + 1]].repeat(len(views), 1)]
            logits = scale_logits(model(batch, *extra).float().reshape(len(views), -1), self.temperatures[i])
            total = total + torch.sigmoid(logits).mean(0)
        return total / len(self.models)


def build_graph(ensemble: Ensemble, tta: str = "none") -> EnsembleGraph:
    """The export graph of a loaded ensemble (its models moved to the CPU, in float32 and eval mode)."""
    models = [model.float().to("cpu", memory_format=torch.contiguous_format).eval() for model in ensemble.models]
    pre = ensemble.preprocess
    return EnsembleGraph(models, pre["mean"], pre["std"], ensemble.temperatures, tta,
                         [e.width for e in ensemble.encoders]).eval()


def image_batch(paths: Sequence[str], preprocess: dict) -> torch.Tensor:
    """The uint8 ``(N, 3, S, S)`` batch an exported model takes, made from image files as melanoma-eval makes it."""
    pixels = eval_pixels(preprocess)
    return torch.stack([pixels(load_image(p)) for p in paths])


def _inputs(graph: EnsembleGraph, images: torch.Tensor, metadata: np.ndarray | None) -> tuple:
    if graph.edges:
        if metadata is None:
            raise ValueError("the models are fused: pass the encoded metadata (Ensemble.encode)")
        return images, torch.as_tensor(metadata, dtype=torch.float32)
    return (images,)


def _quiet() -> contextlib.AbstractContextManager:
    """The exporters' progress and deprecation chatter, kept out of the user's console."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir", "torch.fx.experimental"):
        logger = logging.getLogger(name)
        stack.callback(logger.setLevel, logger.level)
        logger.setLevel(logging.ERROR)
    return stack


def _write(graph: EnsembleGraph, inputs: tuple, fmt: str, path: Path) -> None:
    names = [INPUT, METADATA][:len(inputs)]
    with _quiet(), torch.inference_mode(False), torch.no_grad():
        if fmt == "onnx":
            batch = torch.export.Dim("batch", min=1)
            shapes = tuple({0: batch} for _ in inputs)
            # stdout too: the exporter prints its progress ("[torch.onnx] Obtain model graph ...")
            with contextlib.redirect_stdout(None):
                torch.onnx.export(graph, inputs, str(path), dynamo=True, opset_version=OPSET, input_names=names,
                                  output_names=[OUTPUT], dynamic_shapes=shapes, external_data=False)
        else:
            torch.jit.trace(graph, inputs, check_trace=False).save(str(path))


def run_exported(path: str | Path, fmt: str, images: torch.Tensor, metadata: np.ndarray | None = None) -> np.ndarray:
    """Score a uint8 batch with an exported file, as an app would: onnxruntime for ONNX, ``torch.jit.load``
    for TorchScript."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {INPUT: images.numpy()}
        if metadata is not None:
            feed[METADATA] = np.asarray(metadata, dtype=np.float32)
        return session.run([OUTPUT], feed)[0]
    with _quiet():
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        args = (images,) if metadata is None else (images, torch.as_tensor(metadata, dtype=torch.float32))
        return module(*args).numpy()


MAX_ONNX_BYTES = 1_800_000_000  # one protobuf file holds at most 2 GB


def _require(fmt: str) -> None:
    """The packages an ONNX export needs, or one line naming the extra that brings them."""
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
            raise ConfigError(f"format=onnx needs torch >= 2.5 (its torch.export-based exporter); this is torch "
                              f"{torch.__version__}: upgrade torch, or use format=torchscript")
        for module in ("onnx", "onnxruntime", "onnxscript"):
            try:
                __import__(module)
            except ImportError:
                raise ConfigError(f"format=onnx needs the {module} package: pip install 'melanoma[export]'") from None


def export_ensemble(ensemble: Ensemble, path: str | Path, fmt: Format, images: torch.Tensor, reference: np.ndarray,
                    metadata: np.ndarray | None = None, tta: str = "none", tolerance: float = 1e-4) -> dict:
    """Write ``ensemble`` as one model file, and keep it only if it reproduces ``reference``.

    Args:
        ensemble: the loaded fold models (:func:`melanoma.inference.load_ensemble`).
        path: the model file to write.
        fmt: ``onnx`` or ``torchscript``.
        images: a uint8 batch of real images (:func:`image_batch`), at least 2.
        reference: the ensemble's probabilities of those images as melanoma-eval computes them
            (:func:`melanoma.inference.predict_paths` with the same ``tta``, mean over models).
        metadata: fused models: the encoded metadata of the images (:meth:`Ensemble.encode`).
        tta: the views inside the graph (``none``, ``flip``, ``d4``).
        tolerance: the largest absolute difference in probability allowed.

    Returns:
        What was checked: the number of images, the largest difference at batch size N and at batch size 1.

    Raises:
        ConfigError: an unknown format or TTA, or the ONNX packages are missing.
        ExportError: the file does not reproduce ``reference``; nothing is left at ``path``.
    """
    _require(fmt)
    if len(images) < 2:
        raise ValueError("check the export on at least 2 images: batch size 1 and N are both run")
    graph = build_graph(ensemble, tta)
    size = sum(t.numel() * t.element_size() for t in graph.state_dict().values())
    if fmt == "onnx" and size > MAX_ONNX_BYTES:
        raise ExportError(f"the {len(ensemble.models)} models hold {size / 1e9:.1f} GB of weights, more than one ONNX "
                          "file holds (2 GB); export fewer folds (ckpt=RUN/foldK/best.pt) or use format=torchscript")
    inputs = _inputs(graph, images[:2], None if metadata is None else metadata[:2])
    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            _write(graph, inputs, fmt, tmp)
            if fmt == "onnx":
                import onnx

                onnx.checker.check_model(str(tmp), full_check=True)
            probs = run_exported(tmp, fmt, images, metadata)
            one = run_exported(tmp, fmt, images[:1], None if metadata is None else metadata[:1])
        except Exception as exc:  # the exporter's or the runtime's own failure, as one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ExportError(f"the {fmt} export of {ensemble.config['model']['name']} failed ({type(exc).__name__}: "
                              f"{first}); nothing was written. Try format="
                              f"{'torchscript' if fmt == 'onnx' else 'onnx'}") from exc
        diff = float(np.abs(probs - reference).max()) if probs.shape == reference.shape else float("inf")
        diff_one = float(np.abs(one - reference[:1]).max()) if one.shape == (1,) else float("inf")
        if not max(diff, diff_one) <= tolerance:
            raise ExportError(f"the {fmt} export of {ensemble.paths[0].parent.parent} gives probabilities up to "
                              f"{max(diff, diff_one):.3g} away from melanoma-eval's on {len(images)} images (tolerance "
                              f"{tolerance:g}); nothing was written. Report it with the model name "
                              f"{ensemble.config['model']['name']}, or try format="
                              f"{'torchscript' if fmt == 'onnx' else 'onnx'}")
    log.info("%s: %d images within %.2g of melanoma-eval (batch %d) and %.2g (batch 1)", path, len(images), diff,
             len(images), diff_one)
    return {"n_images": int(len(images)), "max_abs_diff": diff, "max_abs_diff_batch1": diff_one,
            "tolerance": tolerance}


def model_description(ensemble: Ensemble, fmt: str, file: str, tta: str, check: dict) -> dict:
    """``model.json``: what an app needs to feed the file and read its output, and where it came from."""
    pre = ensemble.preprocess
    size = int(pre["image_size"])
    fused = bool(ensemble.encoders)
    oof = ensemble.oof_at_thresholds
    return {
        "file": file,
        "format": fmt,
        **({"opset": OPSET} if fmt == "onnx" else {}),
        "inputs": [
            {"name": INPUT, "dtype": "uint8", "layout": "NCHW", "channels": "RGB", "shape": ["batch", 3, size, size],
             "preprocessing": (f"resize the short side to {pre.get('resize', round(size / pre['crop_pct']))} px "
                               f"({pre.get('interpolation', 'bilinear')}, antialiased), then centre-crop "
                               f"{size}x{size}; the graph scales to [0, 1] and normalises with mean {pre['mean']} "
                               f"and std {pre['std']}")},
            *([{"name": METADATA, "dtype": "float32", "shape": ["batch", sum(e.width for e in ensemble.encoders)],
                "columns": ensemble.metadata_columns,
                "encoding": "each fold model's encoding of the columns, side by side, in model order",
                "encoders": [e.to_dict() for e in ensemble.encoders]}] if fused else []),
        ],
        "output": {"name": OUTPUT, "dtype": "float32", "shape": ["batch"],
                   "meaning": f"probability of {ensemble.config['data']['classes'][1]!r}: the mean over "
                              f"{len(ensemble.models)} fold models (each calibrated by its temperature) and "
                              f"{len(_views(torch.zeros(1, 1, 2, 2), tta))} TTA view(s)"},
        "classes": list(ensemble.config["data"]["classes"]),
        "model": ensemble.config["model"]["name"],
        "n_models": len(ensemble.models),
        "tta": tta,
        "thresholds_tta": ensemble.thresholds_tta,  # the views of the OOF predictions they were chosen on
        "temperatures": list(ensemble.temperatures),
        "thresholds": {name: {"threshold": float(value),
                              **({"oof_sensitivity": oof[name]["sensitivity"],
                                  "oof_specificity": oof[name]["specificity"]} if name in oof else {})}
                       for name, value in ensemble.thresholds.items()},
        "recommended_threshold": ensemble.operating_point,
        "decision": f"{ensemble.config['data']['classes'][1]} when prob >= the threshold",
        "check": check | {"reference": "melanoma.inference.predict_paths, as melanoma-eval scores"},
        "source": {"run": str(ensemble.paths[0].parent.parent.resolve()),
                   "checkpoints": [str(p.resolve()) for p in ensemble.paths]},
        "versions": versions(("torch", "timm", *(("onnx", "onnxruntime", "onnxscript") if fmt == "onnx" else ()))),
    }
