"""Does a model read the lesion or its surroundings? The AUC with parts of every image hidden.

Grad-CAM shows where a map's mass lies, not what the model needs. This test asks the model
itself: each image of a labelled split is scored by the fold ensemble as it is, with its
**corners** hidden (the pixels outside the ellipse inscribed in the image, where a dermoscope's
vignette, rulers and the photograph's borders lie: :func:`corner_mask`), with
its **centre** hidden (inside that ellipse, where the lesion is), and with a **vignette** added (the
corners set to black, as a dermoscope's vignette darkens them). A hidden region is set to the
mean colour of the model's normalisation (0 after it; ImageNet's mean for ImageNet weights). The
AUC lost to each, paired image by image
(:func:`melanoma.compare.paired_auc_difference`), says how much the model relied on it: a model
of lesions loses much to the centre and little to the corners; a model that learnt a shortcut
loses to the corners too. Hiding a region also shows the model an image unlike its training
images, so a small loss to the corners is expected even without a shortcut. The vignette asks the
shortcut's question directly: a model that learnt dark corners as evidence of melanoma raises its
probabilities for benign lesions when they get a vignette (``mean_prob``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from melanoma.compare import paired_auc_difference
from melanoma.data import ImageDataset, make_loader, resolve_num_workers
from melanoma.inference import Ensemble, predict_probs
from melanoma.runtime import Runtime
from melanoma.transforms import eval_transform

log = logging.getLogger("melanoma.occlusion")
REGIONS = ("corners", "centre", "vignette")  # the conditions compared with the images as they are


def corner_mask(height: int, width: int) -> np.ndarray:
    """The image's corners: the pixels outside the ellipse inscribed in it (21.5% of the image).

    That is where a dermoscope's dark vignette, rulers and the photograph's borders lie, and
    where a model that learnt a shortcut instead of the lesion looks.
    """
    y, x = np.ogrid[:height, :width]
    return ((y - (height - 1) / 2) / (height / 2)) ** 2 + ((x - (width - 1) / 2) / (width / 2)) ** 2 > 1


class _Hide:
    """The eval transform, then a region of the normalised image set to 0 (the normalisation's mean colour),
    or, for ``vignette``, the corners set to black (``-mean / std`` after normalisation)."""

    def __init__(self, transform: Callable, region: str | None, black: torch.Tensor) -> None:
        self.transform, self.region, self.black = transform, region, black

    def __call__(self, image: object) -> torch.Tensor:
        x = self.transform(image)
        if self.region is None:
            return x
        corners = torch.from_numpy(corner_mask(*x.shape[-2:]))
        if self.region == "vignette":
            return torch.where(corners, self.black.view(-1, 1, 1), x)
        return x.masked_fill(corners if self.region == "corners" else ~corners, 0.0)


def occlusion_test(ensemble: Ensemble, records: pd.DataFrame, runtime: Runtime, encoded: np.ndarray | None = None,
                   n_resamples: int = 2000, seed: int = 0, batch_size: int = 64,
                   num_workers: int | str = "auto") -> dict:
    """Score ``records`` as they are and with each region of :data:`REGIONS` hidden.

    Args:
        ensemble: the fold models (their mean probability is scored, with their temperatures).
        records: ``path`` and 0/1 ``label`` of the images, both classes present.
        runtime: device and precision.
        encoded: a fused ensemble's encoded metadata of the records (:meth:`Ensemble.encode`).
        n_resamples, seed: the paired bootstrap of each AUC difference.

    Returns:
        ``{"n_images", "n_positive", "corner_area", "auc": {"none"|"corners"|"centre"|"vignette": value},
        "difference": {region: paired_auc_difference(as is, hidden)},
        "mean_prob": {"none"|region: {"benign": value, "malignant": value}},
        "vignette_shift": {"value", "ci"}}``: each difference is ``AUC_hidden - AUC_as_is``, negative
        when hiding the region costs AUC; ``mean_prob`` is the ensemble's mean probability of each
        class's images; ``vignette_shift`` is how much a vignette raises a benign image's probability
        on average, with a 95% bootstrap CI over the benign images.

    Raises:
        DataError: the records hold a single class.
    """
    transform = eval_transform(ensemble.preprocess)
    labels = records["label"].to_numpy(dtype=int)
    black = -torch.tensor(ensemble.preprocess["mean"]) / torch.tensor(ensemble.preprocess["std"])
    probs = {}
    for region in (None, *REGIONS):
        dataset = ImageDataset(records["path"].tolist(), labels.tolist(), _Hide(transform, region, black),
                               metadata=encoded)
        loader = make_loader(dataset, batch_size, train=False, num_workers=resolve_num_workers(num_workers), seed=0,
                             pin_memory=runtime.device.type == "cuda")
        probs[region or "none"] = predict_probs(ensemble.models, loader, runtime, temperatures=ensemble.temperatures,
                                                widths=[e.width for e in ensemble.encoders]).mean(0)
    size = int(ensemble.preprocess["image_size"])
    differences = {region: paired_auc_difference(labels, probs["none"], probs[region], n_resamples, seed=seed)
                   for region in REGIONS}
    benign = probs["vignette"][labels == 0] - probs["none"][labels == 0]
    draws = np.random.default_rng(seed).integers(0, len(benign), (n_resamples, len(benign)))
    shift = {"value": float(benign.mean()), "ci": np.quantile(benign[draws].mean(1), [0.025, 0.975]).tolist()}
    first = differences[REGIONS[0]]
    return {"n_images": first["n_images"], "n_positive": first["n_positive"],
            "corner_area": float(corner_mask(size, size).mean()),
            "auc": {"none": first["auc_a"], **{region: d["auc_b"] for region, d in differences.items()}},
            "difference": differences,
            "mean_prob": {name: {"benign": float(p[labels == 0].mean()), "malignant": float(p[labels == 1].mean())}
                          for name, p in probs.items()},
            "vignette_shift": shift}


def occlusion_summary(result: dict) -> str:
    """One line: the AUC as is and with each region hidden, with the paired difference's CI, and what a
    vignette does to the benign images' mean probability (runs from before the vignette lack it)."""
    parts = [f"AUC {result['auc']['none']:.3f} as is"]
    for region in (r for r in REGIONS if r in result["difference"]):
        d = result["difference"][region]["difference"]
        what = "with a vignette" if region == "vignette" else f"{region} hidden"
        parts.append(f"{what} {result['auc'][region]:.3f} ({d['value']:+.3f} [{d['ci'][0]:+.3f}, "
                     f"{d['ci'][1]:+.3f}])")
    benign, shift = {k: v["benign"] for k, v in (result.get("mean_prob") or {}).items()}, result.get("vignette_shift")
    if "vignette" in benign and shift:
        parts.append(f"a vignette moves benign images' mean probability {benign['none']:.3f} -> "
                     f"{benign['vignette']:.3f} ({shift['value']:+.3f} [{shift['ci'][0]:+.3f}, {shift['ci'][1]:+.3f}])")
    return f"Occlusion test on {result['n_images']} images: " + "; ".join(parts)


def shortcut_warning(result: dict) -> str | None:
    """A warning when hiding the corners costs AUC, or a vignette raises the benign images' probabilities,
    beyond the bootstrap CI; else ``None``."""
    found = []
    d = ((result.get("difference") or {}).get("corners") or {}).get("difference") or {}
    if d.get("ci") and d["ci"][1] < 0:
        area = result.get("corner_area", 0.215)
        found.append(f"hiding the image corners ({area:.0%} of the image: vignette, rulers, borders) costs "
                     f"{-d['value']:.3f} AUC (CI {d['ci'][0]:+.3f} to {d['ci'][1]:+.3f})")
    shift = result.get("vignette_shift") or {}
    if shift.get("ci") and shift["ci"][0] > 0:
        found.append(f"a black vignette raises benign images' mean probability by {shift['value']:.3f} "
                     f"(CI {shift['ci'][0]:+.3f} to {shift['ci'][1]:+.3f})")
    if not found:
        return None
    return (" and ".join(found) + ": the model reads the lesion's surroundings, a possible shortcut; "
            "augmentation.vignette=0.5 trains the vignette cue away, at a cost in AUC where the cue is predictive; "
            "see docs/reports.md#is-the-model-looking-at-the-lesion")
