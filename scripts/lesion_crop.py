"""One-off tool: crop each image of a manifest to its lesion, found without masks, for an experiment.

Writes a copy of a ``data=csv`` set (the same relative paths, the same manifest) in which each
image is cropped to a square box around its lesion, so that a training run on the copy can be
compared with one on the original (docs/results.md, "cropping to the lesion"). UDA-1 ships no
lesion masks, so the lesion is found unsupervised, on a 128-px-wide grey thumbnail:

1. blur (Gaussian, sigma 2 px) and mark the dark (< 0.15) regions that touch the border as the
   dermoscope's vignette, outside the field of view;
2. split the field of view by Otsu's threshold (scikit-image would do it; numpy's histogram is
   enough here) and keep the darker side, opened twice to drop hairs and specks;
3. take the connected component with the largest area weighted by closeness to the centre;
4. crop a square around it, 20% margin on each side, at least 0.35 of the short side.

An image is left whole when no component is found, when the component covers under 1% of the
field, or when the box would cover 90% of the short side or more (a lesion that fills the frame).

    .venv/bin/python scripts/lesion_crop.py SRC_ROOT DST_ROOT [--manifest manifest.csv]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

THUMB_WIDTH = 128
VIGNETTE_LEVEL = 0.15
MARGIN = 0.20
MIN_SIDE = 0.35
MAX_SIDE = 0.90
MIN_AREA = 0.01


def otsu(values: np.ndarray) -> float:
    """Otsu's threshold of values in [0, 1]: the split that maximises the between-class variance."""
    hist, edges = np.histogram(values, bins=256, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist)
    mean = np.cumsum(hist * centres)
    total, total_mean = weight[-1], mean[-1]
    below, above = weight[:-1], total - weight[:-1]
    valid = (below > 0) & (above > 0)
    between = np.zeros_like(below, dtype=float)
    mu_below = mean[:-1][valid] / below[valid]
    mu_above = (total_mean - mean[:-1][valid]) / above[valid]
    between[valid] = below[valid] * above[valid] * (mu_below - mu_above) ** 2
    return float(edges[1:][np.argmax(between)])


def lesion_box(image: Image.Image) -> tuple[int, int, int, int] | None:
    """The square crop box (left, top, right, bottom) around the lesion, or None to keep the image whole."""
    width, height = image.size
    scale = THUMB_WIDTH / width
    thumb = image.convert("L").resize((THUMB_WIDTH, max(1, round(height * scale))), Image.BILINEAR)
    grey = ndimage.gaussian_filter(np.asarray(thumb, dtype=float) / 255.0, sigma=2)
    dark, _ = ndimage.label(grey < VIGNETTE_LEVEL)
    border = np.unique(np.concatenate([dark[0], dark[-1], dark[:, 0], dark[:, -1]]))
    vignette = np.isin(dark, border[border > 0])
    field = ~vignette
    if field.sum() == 0:
        return None
    lesion = (grey < otsu(grey[field])) & field
    lesion = ndimage.binary_opening(lesion, iterations=2)
    components, count = ndimage.label(lesion)
    if count == 0:
        return None
    rows, cols = np.indices(grey.shape)
    centre_distance = np.hypot((rows - grey.shape[0] / 2) / grey.shape[0], (cols - grey.shape[1] / 2) / grey.shape[1])
    centrality = 1.0 - np.clip(centre_distance / 0.71, 0.0, 1.0)
    scores = ndimage.sum(centrality, components, index=np.arange(1, count + 1))
    best = int(np.argmax(scores)) + 1
    mask = components == best
    if mask.sum() < MIN_AREA * field.sum():
        return None
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min() / scale, (ys.max() + 1) / scale, xs.min() / scale, (xs.max() + 1) / scale
    short = min(width, height)
    side = max(max(y1 - y0, x1 - x0) * (1 + 2 * MARGIN), MIN_SIDE * short)
    if side >= MAX_SIDE * short:
        return None
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(round(np.clip(cx - side / 2, 0, width - side)))
    top = int(round(np.clip(cy - side / 2, 0, height - side)))
    return left, top, left + int(round(side)), top + int(round(side))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="the data.root of the original set")
    parser.add_argument("dst", type=Path, help="where the cropped copy goes (must not exist)")
    parser.add_argument("--manifest", default="manifest.csv", help="the manifest's name under src")
    args = parser.parse_args(argv)
    manifest = args.src / args.manifest
    if not manifest.is_file():
        print(f"error: {manifest} not found; pass the set's data.root (and --manifest if it is named otherwise)",
              file=sys.stderr)
        return 2
    if args.dst.exists():
        print(f"error: {args.dst} exists; give a new folder so nothing is overwritten", file=sys.stderr)
        return 2
    frame = pd.read_csv(manifest)
    cropped = 0
    for relative in frame["path"]:
        source, target = args.src / relative, args.dst / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(source) as image:
            box = lesion_box(image)
            if box is None:
                shutil.copyfile(source, target)
                continue
            image.convert("RGB").crop(box).save(target, quality=95)
            cropped += 1
    shutil.copyfile(manifest, args.dst / args.manifest)
    print(f"cropped {cropped} of {len(frame)} images to their lesion; {args.dst / args.manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
