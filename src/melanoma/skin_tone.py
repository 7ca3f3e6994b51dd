"""An estimated skin tone per image: the Individual Typology Angle (ITA) of the skin around the lesion.

ITA = arctan((L* - 50) / b*) in degrees, over CIELAB (D65; kornia's ``rgb_to_lab``), binned into
the six categories of Chardon et al. (1991) that dermatology-AI audits use: very light > 55 >
light > 41 > intermediate > 28 > tan > 10 > brown > -30 > dark. It is taken from the median L* and
b* of the skin pixels: the lesion (darker than the skin around it, split off by Otsu's threshold
on L*), the dermoscope's dark vignette and specular highlights are left out. It is an estimate
from a photograph under a dermoscope's light, not a Fitzpatrick type; it is meant for finding
subgroups a model fails on, not for describing a patient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from kornia.color import rgb_to_lab

from melanoma.data import load_image

CATEGORIES = (("very light", 55.0), ("light", 41.0), ("intermediate", 28.0), ("tan", 10.0), ("brown", -30.0),
              ("dark", -math.inf))  # (name, lower bound in degrees), lightest first
_DARK, _BRIGHT = 10.0, 98.0  # L* of the vignette and of specular highlights, left out


def _otsu(values: np.ndarray, bins: int = 128) -> float:
    """Otsu's threshold: the cut that maximises the between-class variance of ``values`` (-inf when flat)."""
    if len(values) == 0 or np.ptp(values) < 1.0:  # one tone: nothing to split off
        return -math.inf
    counts, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(counts)
    mass = np.cumsum(counts * centers)
    total, total_mass = weight[-1], mass[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mass * weight / total - mass) ** 2 / (weight * (total - weight))
    return float(centers[np.nanargmax(between[:-1])])


def split_lesion(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The skin and the lesion pixels of a CIELAB image (3, H, W), as two boolean (H, W) masks.

    Pixels that are neither vignette nor highlight are split by Otsu's threshold on L*: the darker
    part is the lesion. Where that leaves under 5% of them as skin there is no clear lesion: every
    such pixel is skin and the lesion mask is empty.
    """
    lightness = lab[0]
    valid = (lightness > _DARK) & (lightness < _BRIGHT)
    if not valid.any():
        return valid, valid
    cut = _otsu(lightness[valid].numpy())
    skin = valid & (lightness > cut)
    if skin.sum() < 0.05 * valid.sum():
        return valid, torch.zeros_like(valid)
    return skin, valid & ~skin


def skin_mask(lab: torch.Tensor) -> torch.Tensor:
    """The pixels of a CIELAB image (3, H, W) that are skin: not vignette, highlight or the darker lesion."""
    return split_lesion(lab)[0]


def ita(lab: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """The ITA in degrees of the (masked) pixels of a CIELAB image (3, H, W), from their median L* and b*."""
    mask = skin_mask(lab) if mask is None else mask
    if not mask.any():
        return math.nan
    lightness, b = lab[0][mask].median().item(), lab[2][mask].median().item()
    if b == 0:
        return math.copysign(90.0, lightness - 50.0)
    return math.degrees(math.atan((lightness - 50.0) / b))


def category(angle: float) -> str:
    """The ITA category of an angle (``unknown`` for NaN)."""
    if math.isnan(angle):
        return "unknown"
    return next(name for name, lower in CATEGORIES if angle > lower)


def estimate(paths: Sequence[str | Path], edge: int = 128) -> np.ndarray:
    """The ITA of each image, decoded with its short side resized to ``edge`` (enough for a median)."""
    angles = []
    for path in paths:
        image = F.resize(F.to_image(load_image(path)), [edge], antialias=True)
        angles.append(ita(rgb_to_lab(image.float()[None] / 255)[0]))
    return np.asarray(angles)
