"""Grad-CAM activation maps of trained models, and :func:`explain`, the work of ``melanoma-explain``.

:func:`explain` writes ``activation_maps.png`` and ``explain.csv`` (``path,label,prob,pred`` and where
each map lies, :func:`attention_shares`) into ``out``, by default ``RUN/explain/``, where
``melanoma-report`` looks for them.

Grad-CAM comes from Captum's ``LayerGradCam``: pure Python on top of torch, maintained by the
PyTorch team. pytorch-grad-cam would pull in OpenCV, which needs system GL libraries that
headless servers often lack.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from captum.attr import LayerAttribution, LayerGradCam
from kornia.color import rgb_to_lab
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import ResNet
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from melanoma.checkpoint import write_csv, write_json
from melanoma.data import load_eval_set, load_image, readable_images
from melanoma.errors import ConfigError, DataError
from melanoma.fusion import FusionNet
from melanoma.inference import load_ensemble, predict_probs, resolve_threshold, run_dir_of
from melanoma.occlusion import corner_mask, occlusion_summary, occlusion_test, shortcut_warning
from melanoma.plots import plot_activation_maps
from melanoma.runtime import Runtime
from melanoma.skin_tone import split_lesion
from melanoma.transforms import eval_transform

log = logging.getLogger("melanoma.gradcam")
SPLITS = ("test", "train", "all")


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def target_layer_name(model: nn.Module) -> str:
    """The name of the layer whose activations Grad-CAM weighs, chosen per architecture family.

    ResNet and ResNeXt (timm ``ResNet``): ``layer4``, the last convolutional stage.
    EfficientNet and MobileNetV2 (timm ``EfficientNet``): ``conv_head``, the final 1x1 conv;
    their ``feature_info`` ends one stage earlier, at the last block. Any other timm model:
    the last stage listed in its ``feature_info``.

    Raises:
        ConfigError: the model is none of these.
    """
    if isinstance(model, FusionNet):  # image + metadata: the backbone's layer
        return f"backbone.{target_layer_name(model.backbone)}"
    if isinstance(model, ResNet):
        return "layer4"
    if isinstance(model, EfficientNet):
        return "conv_head"
    info = getattr(model, "feature_info", None)
    if info:
        return info[-1]["module"]
    raise ConfigError(f"model {_model_name(model)} has no known Grad-CAM layer (not a timm ResNet/EfficientNet "
                      "and no feature_info); pass layer= explicitly or use a timm convolutional backbone")


def target_layer(model: nn.Module) -> nn.Module:
    """The layer Grad-CAM explains for ``model`` (see :func:`target_layer_name`).

    Raises:
        ConfigError: no layer is known for the model, or the named one does not exist.
    """
    name = target_layer_name(model)
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"model {_model_name(model)} has no module {name!r} for Grad-CAM") from None


def grad_cam(model: nn.Module, images: torch.Tensor, classes: Sequence[int] | torch.Tensor | None = None,
             layer: nn.Module | None = None, metadata: torch.Tensor | None = None) -> np.ndarray:
    """Grad-CAM maps of a one-logit model, upsampled to the image size and scaled to [0, 1].

    The model's single logit is evidence for malignant; its negative is evidence for benign,
    so each image is explained for its class in ``classes`` by attributing the logit or its
    negative. Maps are computed in fp32, whatever the training precision: a few images cost
    little, and fp16 gradients of small activations underflow.

    Args:
        model: a model in eval mode returning (N, 1) logits.
        images: a normalised batch (N, C, H, W) on the model's device.
        classes: per image, 0 (benign) or 1 (malignant) to explain; ``None`` explains the
            model's own decision at probability 0.5.
        layer: the convolutional layer to weigh; ``None`` picks :func:`target_layer`.
        metadata: a fused model's encoded metadata of the images (held fixed: the map shows where
            in the image the evidence lies, given the metadata).

    Returns:
        An array (N, H, W): ReLU of the gradient-weighted activations, bilinearly upsampled,
        min-max scaled per image (an all-zero map stays zero).

    Raises:
        ConfigError: the layer does not output a (N, C, H, W) feature map.
    """
    name = target_layer_name(model) if layer is None else None
    layer = target_layer(model) if layer is None else layer

    extra = () if metadata is None else (metadata,)

    def both_logits(x: torch.Tensor, *meta: torch.Tensor) -> torch.Tensor:  # column 0 benign, column 1 malignant
        logit = model(x, *meta).float()
        return torch.cat([-logit, logit], dim=1)

    shapes = []
    hook = layer.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    try:
        with torch.enable_grad():
            if classes is None:
                classes = (model(images, *extra).squeeze(1) >= 0).long()
            target = torch.as_tensor(classes, device=images.device).long()
            cam = LayerGradCam(both_logits, layer).attribute(images, target=target, relu_attributions=True,
                                                             additional_forward_args=extra or None)
    finally:
        hook.remove()
    # A token sequence (ViT) or a channels-last stage (Swin) is no (N, C, H, W) map; refuse it
    # rather than average gradients over the wrong axes.
    info = getattr(model, "feature_info", None)
    expected = info[-1].get("num_chs") if info and name == info[-1]["module"] else None
    if cam.ndim != 4 or (expected is not None and shapes[-1][1] != expected):
        raise ConfigError(f"Grad-CAM needs a convolutional feature map, but layer {name or type(layer).__name__} "
                          f"of {_model_name(model)} outputs {shapes[-1]}; use a convolutional backbone "
                          "(ResNet, ResNeXt, MobileNetV2, EfficientNet, ConvNeXt, ...)")
    if shapes[-1][-2:] == (1, 1):
        log.warning("the Grad-CAM layer of %s is 1x1 at %dx%d px: its map can only be uniform; use larger images",
                    _model_name(model), *images.shape[-2:])
    cam = LayerAttribution.interpolate(cam.detach().float(), tuple(images.shape[-2:]), interpolate_mode="bilinear")
    flat = cam.flatten(1)
    low, span = flat.min(1).values, flat.max(1).values - flat.min(1).values
    scaled = torch.where(span[:, None] > 0, (flat - low[:, None]) / span.clamp_min(1e-12)[:, None], 0.0)
    return scaled.view(cam.shape[0], *cam.shape[-2:]).cpu().numpy()


def attention_shares(rgb: np.ndarray, maps: np.ndarray) -> pd.DataFrame:
    """Where each Grad-CAM map puts its mass: on the lesion, in the corners, and where it peaks.

    The lesion is the darker part of the skin (:func:`melanoma.skin_tone.split_lesion`, Otsu's
    threshold on L*) outside the corners, which are :func:`corner_mask`. A map that looked everywhere alike would
    put ``lesion_area`` of its mass on the lesion and ``corner_area`` in the corners, so a model
    that uses the lesion has ``cam_lesion`` well above ``lesion_area``, and one that uses the
    vignette or borders has ``cam_corners`` above ``corner_area``.

    Args:
        rgb: the images the model saw, (N, H, W, 3) in [0, 1].
        maps: their Grad-CAM maps, (N, H, W), non-negative.

    Returns:
        One row per image: ``cam_lesion``, ``lesion_area``, ``cam_corners``, ``corner_area`` (shares
        in [0, 1]; the ``cam_`` ones NaN for an all-zero map) and ``peak``: ``corner``, ``lesion``,
        ``skin`` or ``none`` (an all-zero map), where the map's maximum lies (a corner first).
    """
    corners = corner_mask(*maps.shape[1:])
    lab = rgb_to_lab(torch.as_tensor(np.ascontiguousarray(rgb), dtype=torch.float32).permute(0, 3, 1, 2))
    rows = []
    for image, cam in zip(lab, maps, strict=True):
        lesion = split_lesion(image)[1].numpy() & ~corners  # the two regions are disjoint: a corner is a corner
        total = float(cam.sum())
        peak = np.unravel_index(np.argmax(cam), cam.shape)
        where = "none" if total <= 0 else "corner" if corners[peak] else "lesion" if lesion[peak] else "skin"
        rows.append({"cam_lesion": float(cam[lesion].sum()) / total if total > 0 else np.nan,
                     "lesion_area": float(lesion.mean()),
                     "cam_corners": float(cam[corners].sum()) / total if total > 0 else np.nan,
                     "corner_area": float(corners.mean()), "peak": where})
    return pd.DataFrame(rows)


def attention_summary(table: pd.DataFrame) -> str:
    """One sentence on where a set of maps lies (the columns of :func:`attention_shares`)."""
    peaks = table["peak"].value_counts()
    mean = table[["cam_lesion", "lesion_area"]].mean()
    return (f"Grad-CAM mass on the lesion {mean['cam_lesion']:.2f} (its area: {mean['lesion_area']:.2f}), "
            f"in the corners {table['cam_corners'].mean():.2f} (their area: {table['corner_area'].mean():.2f}); "
            f"peaks: {peaks.get('lesion', 0)} on the lesion, {peaks.get('corner', 0)} in a corner, "
            f"{peaks.get('skin', 0)} on skin, of {len(table)}")


def select_images(records: pd.DataFrame, n: int, seed: int, classes: Sequence[str], source: str) -> pd.DataFrame:
    """``n`` images of each label (all of them where fewer), drawn reproducibly from ``seed``.

    Raises:
        DataError: a class has no image.
    """
    rng = np.random.default_rng(seed)
    picked = []
    for label, name in enumerate(classes):
        part = records[records["label"] == label]
        if part.empty:
            raise DataError(f"{source} has no {name} images to explain; pass split=all, or input=FOLDER "
                            "to explain other images")
        if len(part) < n:
            log.info("only %d %s images in %s", len(part), name, source)
        picked.append(part.iloc[np.sort(rng.choice(len(part), min(n, len(part)), replace=False))])
    return pd.concat(picked, ignore_index=True)


def default_out(ckpt: str | Path) -> Path:
    """``RUN_DIR/explain`` of the run that ``ckpt`` (a run directory or a fold's ``best.pt``) belongs to."""
    return run_dir_of(ckpt) / "explain"


def explain(ckpt: str | Path, runtime: Runtime, input: str | Path | None = None, n: int = 4,
            split: str = "test", seed: int = 0, threshold: str | float | None = None,
            out: str | Path | None = None, occlusion: bool = True) -> pd.DataFrame:
    """Draw Grad-CAM maps of a run's predictions and write ``activation_maps.png`` and ``explain.csv``.

    A fold ensemble is explained by the mean of its models' maps (each for the ensemble's
    decision), so a region is brightest where every fold model looks; titles give the
    ensemble's probability.

    Args:
        ckpt: a training run directory (its fold ensemble) or one checkpoint.
        runtime: device and precision for the predictions.
        input: an image or folder of images to explain instead of the run's data (labels
            unknown; at most ``2 * n`` of them, drawn from ``seed``).
        n: images per class from the run's ``split``.
        split: ``test``, ``train`` or ``all`` images of the run's dataset.
        seed: which images are drawn.
        threshold: decision threshold: a run's operating point name or a number; ``None`` is the
            run's operating point.
        out: output folder; ``None`` is ``RUN_DIR/explain``.
        occlusion: also score every image of the test split with its corners, then its centre, hidden
            (:func:`melanoma.occlusion.occlusion_test`) and write ``occlusion.json``; only for the
            run's own held-out test split (``split=test``, not ``input=``).

    Returns:
        The ``explain.csv`` table: ``path, label`` (empty when unknown), ``prob``, ``pred``, and where
        each map lies (:func:`attention_shares`).

    Raises:
        ConfigError: ``n`` below 1, an unknown split or threshold, or a non-convolutional model.
        DataError: the input is missing or unreadable, or a class has no image.
        WeightsError: the checkpoint cannot be loaded.
    """
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n={n!r} must be an integer >= 1 (images per class)")
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    paths = readable_images(input)[0] if input is not None else None
    out = Path(out).expanduser() if out is not None else default_out(ckpt)
    ensemble = load_ensemble(ckpt, runtime)
    names = tuple(ensemble.config["data"]["classes"])
    threshold_name, cutoff = resolve_threshold(threshold, ensemble)

    if paths is None:
        data = ensemble.config["data"]
        if data["layout"] == "folder":
            log.warning("data.layout=folder has no test split: images are drawn from all of %s", data["root"])
        records, _ = load_eval_set(data, split, split_key="split", columns=ensemble.metadata_columns)
        chosen = select_images(records, n, seed, names, f"the {split} split of {data['root'] or data.get('manifest')}")
        source = " and ".join(f"{(chosen['label'] == k).sum()} {c}" for k, c in enumerate(names))
        source = f"{source} images of the {split} split"
    else:
        if ensemble.encoders:
            raise ConfigError(f"input={input}: the fused models of {ckpt} also read metadata "
                              f"({', '.join(ensemble.metadata_columns)}); explain the run's own images (leave "
                              "input= out, split=test|train|all), whose manifest holds it")
        if len(paths) > 2 * n:
            log.info("input holds %d images: explaining %d of them (n=%d, seed=%d)", len(paths), 2 * n, n, seed)
            paths = [paths[i] for i in np.sort(np.random.default_rng(seed).choice(len(paths), 2 * n, replace=False))]
        chosen = pd.DataFrame({"path": paths, "label": pd.array([None] * len(paths), dtype="Int64")})
        source = f"{len(paths)} images from input {Path(input).name}"

    pre = ensemble.preprocess
    transform = eval_transform(pre)
    images = torch.stack([transform(load_image(p)) for p in chosen["path"]])
    encoded = ensemble.encode(chosen, str(ensemble.config["data"].get("manifest")))
    meta = [torch.as_tensor(encoded)] if encoded is not None else []
    loader = DataLoader(TensorDataset(images, *meta, torch.zeros(len(images))), batch_size=32)
    chosen["prob"] = predict_probs(ensemble.models, loader, runtime, temperatures=ensemble.temperatures,
                                   widths=[e.width for e in ensemble.encoders]).mean(0)
    chosen["pred"] = (chosen["prob"] >= cutoff).astype(int)

    batch = images.to(runtime.device, memory_format=runtime.memory_format)
    decisions = torch.tensor(chosen["pred"].tolist())
    per_model = ensemble.split_encoding(encoded)
    maps = np.mean([grad_cam(model, batch, decisions, metadata=None if part is None else
                             torch.as_tensor(part, device=runtime.device))
                    for model, part in zip(ensemble.models, per_model, strict=True)], axis=0)

    mean, std = np.asarray(pre["mean"]), np.asarray(pre["std"])
    rgb = np.clip(images.permute(0, 2, 3, 1).numpy() * std + mean, 0, 1)  # the image the model saw
    titles = [f"{Path(row.path).stem}\nlabel {'unknown' if pd.isna(row.label) else names[int(row.label)]}\n"
              f"pred {names[row.pred]} (p={row.prob:.2f})" for row in chosen.itertuples()]
    empty = int((maps.max(axis=(1, 2)) == 0).sum())
    if empty:
        log.info("%d of %d maps are empty: no region raises the logit of the predicted class", empty, len(maps))
    models = f"mean of {len(ensemble.models)} fold models" if len(ensemble.models) > 1 else "one model"
    suptitle = (f"Grad-CAM of {ensemble.config['model']['name']} at {target_layer_name(ensemble.models[0])} "
                f"({models}), {source}; pred at {threshold_name} threshold {cutoff:.3g}")
    plot_activation_maps(rgb, maps, titles, out / "activation_maps.png", ncols=n, suptitle=suptitle)
    table = pd.concat([chosen[["path", "label", "prob", "pred"]].reset_index(drop=True), attention_shares(rgb, maps)],
                      axis=1)
    write_csv(table, out / "explain.csv")
    print(f"Grad-CAM of {len(table)} images ({source}); wrote {out / 'activation_maps.png'} and "
          f"{out / 'explain.csv'}")
    print(attention_summary(table))
    if table["cam_corners"].mean() > table["corner_area"].mean():
        log.warning("the maps put more of their mass in the image corners than a uniform map would (%.2f > %.2f): "
                    "the model may read the dermoscope's vignette or the borders instead of the lesion; look at "
                    "%s", table["cam_corners"].mean(), table["corner_area"].mean(), out / "activation_maps.png")
    # Only held-out images say what the model needs: the folds trained on the others (and a folder has no split).
    held_out = paths is None and split == "test" and data["layout"] != "folder"
    if occlusion and held_out:
        result = occlusion_test(ensemble, records, runtime, ensemble.encode(records, str(data.get("manifest"))),
                                seed=seed)
        write_json({"ckpt": str(ckpt), "split": split, **result}, out / "occlusion.json")
        print(occlusion_summary(result))
        if (warning := shortcut_warning(result)) is not None:
            log.warning(warning)
    else:
        if occlusion:
            log.info("no occlusion test: it needs the run's held-out test split (split=test, a layout with one)")
        (out / "occlusion.json").unlink(missing_ok=True)  # an older one would describe other maps
    return table
