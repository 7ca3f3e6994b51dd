"""Synthetic dermoscopy-like images: the embedded demo data, test fixtures and benchmark sets.

Each image is a patch of textured skin under a dermoscope's vignette, with hairs and one
pigmented lesion. The lesion follows the ABCD rule: Asymmetry, Border irregularity, Colour
variegation and Diameter all grow with a hidden ``severity`` that is drawn higher for the
malignant class. The two classes' severities overlap on purpose, and every feature gets its
own noise, so a model has to combine cues and cannot reach a perfect score.

Images are written once as JPEGs in the Kaggle layout (``ROOT/{train,test}/{benign,malignant}``)
so that the real loading code is what reads them.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("benign", "malignant")
# Train/test counts of the seed's Kaggle dataset, used for the class ratio.
KAGGLE_TRAIN_BENIGN_FRACTION = 5000 / 9605
_FORMAT = 1  # bump when the renderer changes, so cached demo sets are regenerated

_PALETTE = {  # RGB colours of dermoscopic structures
    "light_brown": (176, 124, 86),
    "dark_brown": (92, 56, 36),
    "black": (38, 28, 28),
    "blue_grey": (96, 108, 132),
    "red": (168, 72, 66),
}


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise: a random grid upsampled bicubically."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC)
    return np.asarray(img)


def render_lesion(rng: np.random.Generator, size: int, severity: float) -> Image.Image:
    """Render one RGB image whose ABCD features grow with ``severity`` in [0, 1].

    Args:
        rng: random generator; the image is a pure function of its state.
        size: edge of the square image in pixels.
        severity: hidden malignancy score; each ABCD feature is this plus its own noise.

    Returns:
        The rendered image.
    """
    feat = np.clip(severity + rng.normal(0.0, 0.18, size=4), 0.0, 1.0)
    asym, border, colour, diam = feat

    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j].astype(np.float32)

    # Skin: a base tone with low-frequency texture and fine grain.
    tone = np.array([224, 178, 150], np.float32) + rng.normal(0, 10, 3)
    skin = tone * (1 + 0.05 * _smooth_noise(rng, size, 6))[..., None]
    skin += 4 * rng.standard_normal((size, size, 1))

    # Lesion outline in polar coordinates: low harmonics make it asymmetric, high ones ragged.
    cy, cx = rng.normal(0, 0.07, 2)
    r = np.hypot(yy - cy, xx - cx)
    theta = np.arctan2(yy - cy, xx - cx)
    radius = 0.22 + 0.30 * diam + rng.normal(0, 0.03)
    outline = np.ones_like(theta)
    for k, amp in ((1, 0.28 * asym), (2, 0.22 * asym)):
        outline += amp * rng.uniform(0.6, 1.0) * np.cos(k * theta - rng.uniform(0, 2 * np.pi))
    for k in range(5, 14):
        amp = 0.06 * border * rng.uniform(0.3, 1.0)
        outline += amp * np.cos(k * theta - rng.uniform(0, 2 * np.pi))
    softness = 0.015 + 0.03 * (1 - border)  # benign lesions fade out, malignant ones stop sharply
    mask = 1 / (1 + np.exp((r - radius * outline) / softness))

    # Pigment: benign lesions are mostly one brown; variegation adds dark, black, blue-grey, red.
    pigment = np.broadcast_to(np.array(_PALETTE["light_brown"], np.float32), (size, size, 3)).copy()
    pigment *= (1 + 0.06 * _smooth_noise(rng, size, 5))[..., None]
    for name, weight in (("dark_brown", 0.9), ("black", 0.7), ("blue_grey", 0.6), ("red", 0.5)):
        blob = _smooth_noise(rng, size, int(rng.integers(3, 7)))
        cover = np.clip((blob - 1.2 + 1.4 * colour) * 2.5, 0, 1) * weight * (0.2 + 0.8 * colour)
        pigment += cover[..., None] * (np.array(_PALETTE[name], np.float32) - pigment)
    image = skin + mask[..., None] * (pigment - skin)

    # Dermoscope field: darker towards the corners.
    image *= (1 - rng.uniform(0.15, 0.35) * np.clip(np.hypot(yy, xx) - 0.6, 0, None) ** 1.5)[..., None]
    out = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))

    # Hairs: dark curves, independent of the class.
    draw = ImageDraw.Draw(out)
    for _ in range(int(rng.poisson(2.5))):
        p0, p1, p2 = rng.uniform(-0.2, 1.2, (3, 2)) * size
        t = np.linspace(0, 1, 24)[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        shade = int(rng.integers(30, 80))
        draw.line([tuple(p) for p in pts], fill=(shade, shade - 10, shade - 15), width=max(1, size // 150))
    return out.filter(ImageFilter.GaussianBlur(radius=size / 300))


def _render_to_file(args: tuple[int, int, float, int, str, int]) -> None:
    seed, index, severity, size, path, quality = args
    rng = np.random.default_rng([seed, index])
    render_lesion(rng, size, severity).save(path, quality=quality)


def _plan(n: int, seed: int, salt: int, benign_fraction: float) -> list[tuple[int, float]]:
    """Labels and severities of one split, drawn from their own generator."""
    rng = np.random.default_rng([seed, salt])
    n_benign = round(n * benign_fraction)
    labels = [0] * n_benign + [1] * (n - n_benign)
    # Beta(2,4) vs Beta(4,2): means 1/3 and 2/3 with wide overlap.
    return [(y, float(rng.beta(4, 2) if y else rng.beta(2, 4))) for y in labels]


SITES = ("back", "lower extremity", "upper extremity", "torso", "head/neck")


def _metadata(labels: list[int], rng: np.random.Generator) -> list[dict]:
    """Clinical metadata that carries signal the image does not: older patients and the back for
    malignant lesions, a sex column without signal, and about 15% of each column unknown."""
    rows = []
    for y in labels:
        age = rng.normal(62, 10) if y else rng.normal(42, 12)
        site = rng.choice(SITES, p=[0.5, 0.15, 0.1, 0.15, 0.1] if y else [0.1, 0.25, 0.25, 0.25, 0.15])
        rows.append({"age_approx": str(int(np.clip(round(age / 5) * 5, 5, 90))),
                     "sex": str(rng.choice(["female", "male"])), "anatom_site": str(site)})
        for key in rows[-1]:
            if rng.random() < 0.15:
                rows[-1][key] = "" if key != "anatom_site" else "unknown"
    return rows


def generate_dataset(
    root: str | Path,
    n_train: int = 600,
    n_test: int = 200,
    size: int = 128,
    seed: int = 0,
    benign_fraction: float = KAGGLE_TRAIN_BENIGN_FRACTION,
    quality: int = 90,
    workers: int | None = None,
    metadata: bool = False,
) -> Path:
    """Write a synthetic dataset in the Kaggle layout, once.

    The set is built in a temporary sibling folder and renamed into place, so an
    interrupted run never leaves a half-written set. A set already at ``root`` with the
    same parameters is reused as is.

    Args:
        root: folder to create; ``root/train`` and ``root/test`` hold one folder per class.
        n_train: number of training images.
        n_test: number of test images (half of each class, like the seed's test split).
        size: edge of the square JPEGs in pixels (the seed's images are 300).
        seed: the whole set is a pure function of this and the other arguments.
        benign_fraction: share of benign images in the training split.
        quality: JPEG quality.
        workers: processes to render with; default all cores.
        metadata: also write ``root/manifest.csv`` (``path,label,split,age_approx,sex,anatom_site``, for
            ``data=csv``) with metadata drawn given each label, so that age and site carry signal of
            their own and an image + metadata model can beat an image-only one.

    Returns:
        ``root`` as a Path.
    """
    root = Path(root).expanduser()
    params = {"format": _FORMAT, "n_train": n_train, "n_test": n_test, "size": size,
              "seed": seed, "benign_fraction": benign_fraction, "quality": quality}
    if metadata:  # only then: sets written before the option keep their stamp
        params["metadata"] = True
    stamp = root / "synthetic.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return root
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} exists and is not a synthetic set made with these parameters; "
            "delete it or choose another root"
        )
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    jobs, manifest = [], []
    for split, n, salt, frac in (("train", n_train, 1, benign_fraction), ("test", n_test, 2, 0.5)):
        for cls in CLASSES:
            (tmp / split / cls).mkdir(parents=True)
        plan = _plan(n, seed, salt, frac)
        extra = _metadata([y for y, _ in plan], np.random.default_rng([seed, salt, 7])) if metadata else [{}] * n
        for i, ((label, severity), columns) in enumerate(zip(plan, extra, strict=True)):
            path = tmp / split / CLASSES[label] / f"{split}_{i:05d}.jpg"
            jobs.append((seed, salt * 10_000_000 + i, severity, size, str(path), quality))
            manifest.append({"path": str(path.relative_to(tmp)), "label": CLASSES[label], "split": split} | columns)
    workers = workers or os.cpu_count() or 1
    if workers > 1 and len(jobs) > 64:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_render_to_file, jobs, chunksize=32))
    else:
        for job in jobs:
            _render_to_file(job)
    if metadata:
        pd.DataFrame(manifest).to_csv(tmp / "manifest.csv", index=False)
    (tmp / "synthetic.json").write_text(json.dumps(params, indent=2))
    if root.exists():
        root.rmdir()  # empty, checked above
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(root)
    return root
