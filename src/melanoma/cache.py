"""Decode-once image cache: every JPEG is decoded and resized a single time per run (or per machine).

Training decodes the same images in every epoch of every fold: 3 folds x 25 epochs of the
seed's protocol decode each JPEG 50 times. Here each image is decoded once, its short side
resized to ``edge`` (by default exactly the evaluation transform's resize, so the evaluation
tensors stay bit-identical), and kept as uint8 CHW pixels, either in memory or in a file on
disk that later runs, folds and sweep points map instead of decoding again.

A disk cache is named by a hash of every file's *content* and of the resize settings, so a
changed image, a different image list or another edge never reads stale pixels.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import PIL
import torch
import torchvision
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from tqdm.auto import tqdm

from melanoma.checkpoint import atomic_path
from melanoma.data import file_digest, load_image, usable_cores
from melanoma.errors import ConfigError
from melanoma.transforms import interpolation_mode

log = logging.getLogger(__name__)
CacheMode = Literal["none", "memory", "disk"]
FORMAT = 2  # bump when the stored layout or the decoding changes: old caches are then not read


def decode_resized(path: str | Path, edge: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Read an image as uint8 CHW with its short side resized to ``edge`` (antialiased).

    This is the first step of the evaluation transform (``v2.Resize(edge)`` after
    ``v2.ToImage``, with the same interpolation), so resizing a cached image to ``edge`` again is a no-op.
    """
    image = v2.functional.to_image(load_image(path))
    return F.resize(image, [edge], interpolation=interpolation_mode(interpolation),
                    antialias=True).as_subclass(torch.Tensor).contiguous()


def cache_key(digests: Sequence[str], edge: int, interpolation: str = "bilinear") -> str:
    """The name of a cache: a hash of the format, the resize and every image's content, in order."""
    # The decoders' versions too: a cache folder shared between machines must not mix their pixels.
    text = json.dumps({"format": FORMAT, "edge": edge, "interpolation": interpolation, "antialias": True,
                       "pillow": PIL.__version__,
                       "torchvision": torchvision.__version__, "images": list(digests)})
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class DecodedImages:
    """uint8 CHW images decoded once, looked up by path.

    In ``memory`` mode the pixels are a list of arrays in this process (DataLoader workers see
    them through fork's copy-on-write). In ``disk`` mode they live in one flat file that each
    process maps on first use, so the operating system's page cache is shared between workers,
    ranks and sweep points. ``key`` names the disk cache (empty in memory mode).
    """

    def __init__(self, paths: Sequence[str], edge: int, key: str, shapes: np.ndarray, offsets: np.ndarray,
                 arrays: list[np.ndarray] | None = None, file: Path | None = None) -> None:
        self.paths = list(paths)
        self.edge, self.key = edge, key
        self.shapes, self.offsets = shapes, offsets
        self.file = file
        self._arrays = arrays
        # Mapped now, so forked workers inherit the mapping: deleting the file later cannot break the run.
        self._map = np.memmap(file, dtype=np.uint8, mode="r") if file is not None and offsets.size else None
        self._index = {p: i for i, p in enumerate(self.paths)}

    def __len__(self) -> int:
        return len(self.paths)

    def __contains__(self, path: str) -> bool:
        return path in self._index

    def __getitem__(self, path: str) -> torch.Tensor:
        i = self._index[path]
        if self._arrays is not None:
            return torch.from_numpy(self._arrays[i].copy())  # a transform may work in place: never on the cache
        if self._map is None:  # after unpickling (spawned workers): map the file again
            self._map = np.memmap(self.file, dtype=np.uint8, mode="r")
        shape, start = self.shapes[i], int(self.offsets[i])
        flat = self._map[start:start + int(np.prod(shape))]
        return torch.from_numpy(np.array(flat).reshape(shape))  # a copy: writable, independent of the map

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_map"] = None  # a worker maps the file itself
        return state


def _digests(paths: Sequence[str], workers: int) -> list[str]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(file_digest, paths))


def _decode_all(paths: Sequence[str], edge: int, interpolation: str, workers: int):
    """Decoded images in order, decoded by ``workers`` threads (PIL and torch release the GIL)."""
    with ThreadPoolExecutor(workers) as pool:
        yield from tqdm(pool.map(lambda p: decode_resized(p, edge, interpolation).numpy(), paths), total=len(paths),
                        desc="decoding once", leave=False, disable=None, dynamic_ncols=True)


def build_cache(paths: Sequence[str], edge: int, cache: CacheMode, cache_dir: str | Path | None = None,
                interpolation: str = "bilinear", digests: Sequence[str] | None = None,
                workers: int | None = None) -> DecodedImages | None:
    """Decode every image once, or map the disk cache a previous run left.

    Args:
        paths: the images, each decoded once even if folds reuse it.
        edge: short side after resizing; use the evaluation resize (``Preprocess.resize``) for
            bit-identical evaluation tensors.
        cache: ``none`` (no cache: return ``None``), ``memory`` or ``disk``.
        cache_dir: folder of disk caches (``disk`` only); created if missing.
        interpolation: resampling of the resize, the evaluation transform's.
        digests: each path's :func:`melanoma.data.file_digest`, when the audit already read them
            (``disk`` only; computed here otherwise).
        workers: decoding threads (default: the usable cores).

    Returns:
        The decoded images, or ``None`` for ``cache="none"``.

    Raises:
        ConfigError: unknown mode, a non-positive edge, or no ``cache_dir`` for a disk cache.
    """
    if cache not in ("none", "memory", "disk"):
        raise ConfigError(f"data.cache={cache!r} is not one of none, memory, disk")
    if cache == "none":
        return None
    if not isinstance(edge, int) or edge < 1:
        raise ConfigError(f"data.cache_edge={edge!r} must be a positive integer (or null for the eval resize)")
    workers = workers or usable_cores()
    if cache == "memory":  # lives as long as this run: no name to look up, so no content hashing
        arrays = list(_decode_all(paths, edge, interpolation, workers))
        shapes = np.array([a.shape for a in arrays], dtype=np.int64).reshape(-1, 3)
        return DecodedImages(paths, edge, "", shapes, np.zeros(len(arrays), np.int64), arrays=arrays)
    if digests is None or len(digests) != len(paths):
        digests = _digests(paths, workers)
    key = cache_key(digests, edge, interpolation)
    if cache_dir is None:
        raise ConfigError("data.cache=disk needs data.cache_dir=FOLDER")
    folder = Path(cache_dir).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"data.cache_dir={folder} cannot be created ({exc.strerror}); point it at a writable "
                          "folder or use data.cache=memory") from None
    pixels, index = folder / f"{key}.u8", folder / f"{key}.npz"
    if index.is_file() and pixels.is_file():  # the index is written last: its presence means complete
        with np.load(index) as stored:
            shapes, offsets = stored["shapes"], stored["offsets"]
        log.info("decoded-image cache hit: %s (%d images)", pixels, len(paths))
        return DecodedImages(paths, edge, key, shapes, offsets, file=pixels)
    shapes, offsets, offset = [], [], 0
    with atomic_path(pixels) as tmp, open(tmp, "wb") as f:
        for array in _decode_all(paths, edge, interpolation, workers):
            f.write(array.tobytes())
            shapes.append(array.shape)
            offsets.append(offset)
            offset += array.size
    shapes, offsets = np.array(shapes, np.int64).reshape(-1, 3), np.array(offsets, np.int64)
    with atomic_path(index) as tmp, open(tmp, "wb") as f:
        np.savez(f, shapes=shapes, offsets=offsets)
    log.info("decoded %d images once into %s (%.0f MB)", len(paths), pixels, offset / 1e6)
    return DecodedImages(paths, edge, key, shapes, offsets, file=pixels)
