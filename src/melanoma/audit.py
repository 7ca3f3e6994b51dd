"""Data audit: unreadable files, exact and near-duplicate images, and what they leak.

Public audits of the seed's Kaggle dataset found near-copies of test lesions in its training
split; random folds also put copies of one lesion on both sides. This module finds them:

- exact duplicates: the SHA-256 of the file's bytes;
- near-duplicates: a 143-bit DCT perceptual hash (pHash) of the 32x32 grayscale image,
  compared under all 8 flips/90-degree rotations, since a mirrored or rotated photo of a
  lesion is still the same lesion (for dermoscopy a flip *does* count as a duplicate), and
  with the hashes of three centre crops (1/64, 2/64 and 3/64 of each side cut off), since a
  copy cropped by a few pixels and resized back is a centre crop of its original: two images
  are as far apart as the closest of either one's full hash, or its cropped hashes plus
  CROP_PENALTY bits, to the other's full hash (the penalty: three more tries per pair bring
  distinct look-alikes closer; it keeps them at 16 bits, as without the crops).
  Measured on generated 300-px lesions: JPEG re-encodes at quality 60 and flips/rotations stay
  within 2 bits, 90% resizes and 4-pixel shifts within 12; among 10,605 distinct look-alike
  lesions (56 million pairs) the closest two are 16 bits apart. The default threshold is 14.
  Re-crops of 4-8 pixels from every side of a 224- or 256-px image stay within 12 bits (without
  the cropped hashes: up to 32); crops from one side only, of 6+ pixels, are not reliably caught
  (``audit.method=both`` finds those: docs/audit.md).

Hashes are cached by file content, so a second audit of an unchanged dataset only reads and
checksums the files. Pairs are found with vectorised numpy over packed bits (no Python loop
over pairs) and grouped with connected components, so no group straddles two folds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.fft import dctn
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from melanoma.checkpoint import atomic_path
from melanoma.data import file_digest, load_image
from melanoma.embeddings import EDGE as EMBEDDING_EDGE
from melanoma.embeddings import MODEL as EMBEDDING_MODEL
from melanoma.embeddings import VERSION as EMBEDDING_VERSION
from melanoma.embeddings import image_embeddings, similar_pairs
from melanoma.errors import ConfigError, DataError, WeightsError
from melanoma.metadata import is_missing

HASH_VERSION = 2  # 2: the centre-crop hashes (ZOOMS)
_GRID, _KEEP = 32, 12  # hash the lowest 12x12 DCT frequencies of a 32x32 image, DC left out
_BITS = _KEEP * _KEEP - 1
_WORDS = 3  # 143 bits packed into three uint64 words
_VARIANTS = 8  # the flips/90-degree rotations of the whole image: rows 0-7 of an image's hashes
ZOOMS = (1 / 64, 2 / 64, 3 / 64)  # share of each side cut off for the centre-crop hashes: rows 8-10
CROP_PENALTY = 2  # bits added to a match through a centre crop: 3 crops give distinct pairs more chances
# (ZOOMS and CROP_PENALTY are not in the cache keys: a change to either needs a new HASH_VERSION)


log = logging.getLogger("melanoma.audit")

METHODS = ("phash", "embedding", "both")
EMBEDDING_THRESHOLD = 0.92  # cosine similarity of Lite0 features; docs/audit.md says how it was chosen


def _write_cache(path: Path, write: Callable[[Path], object]) -> None:
    """Write a cache file atomically; a cache that cannot be written (read-only home, full disk) is a warning."""
    try:
        with atomic_path(path) as tmp:
            write(tmp)
    except (OSError, DataError) as exc:  # DataError: atomic_path's full disk
        log.warning("audit cache not written (%s: %s); set MELANOMA_CACHE=FOLDER to a writable folder to keep "
                    "the hashes for the next audit", path, getattr(exc, "strerror", None) or exc)


def default_cache() -> Path:
    """Where hashes are cached: ``$MELANOMA_CACHE/audit`` or ``~/.cache/melanoma/audit``."""
    return Path(os.environ.get("MELANOMA_CACHE", "~/.cache/melanoma")).expanduser() / "audit"


def _pack(bits: np.ndarray) -> np.ndarray:
    packed = np.zeros(8 * _WORDS, dtype=np.uint8)
    raw = np.packbits(bits)
    packed[: len(raw)] = raw
    return packed.view(np.uint64)


def _phash(grey: np.ndarray) -> np.ndarray:
    coeffs = dctn(grey, norm="ortho")[:_KEEP, :_KEEP].ravel()[1:]
    return _pack(coeffs > np.median(coeffs))


def perceptual_hashes(image: Image.Image) -> np.ndarray:
    """The hashes of ``image`` compared by the audit, shape (11, 3) uint64.

    Rows 0-7: the pHash under each of the 8 flips/90-degree rotations; rows 8-10: the pHash of
    the centre crops that cut :data:`ZOOMS` of each side off (unrotated: a crop commutes with
    flips, so comparing it with the other image's 8 variants covers mirrored re-crops too).
    """
    image = image.convert("L")
    grey = np.asarray(image.resize((_GRID, _GRID), Image.Resampling.BOX), dtype=np.float32)
    out = [_phash(np.rot90(arr, k)) for arr in (grey, grey[:, ::-1]) for k in range(4)]
    w, h = image.size
    for share in ZOOMS:
        box = (share * w, share * h, w - share * w, h - share * h)  # sub-pixel box: exact on small decodes
        crop = image.resize((_GRID, _GRID), Image.Resampling.BOX, box=box)
        out.append(_phash(np.asarray(crop, dtype=np.float32)))
    return np.stack(out)


def _hash_file(path: str) -> dict:
    """Size, mode and hashes of one file, or the reason it cannot be read."""
    try:
        with Image.open(path) as img:
            size, mode = img.size, img.mode
            if img.format == "JPEG":
                img.draft("RGB", (4 * _GRID, 4 * _GRID))  # decode at >= 128 px: the crops keep their detail, 3x faster
                img.load()
                image = img.convert("RGB")
            else:
                image = load_image(path)
        return {"size": list(size), "mode": mode, "hashes": perceptual_hashes(image).tolist()}
    except Exception as exc:  # any decoder failure is a finding of the audit, not a crash
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}


def hash_images(paths: list[str], workers: int | None = None, cache_dir: Path | None = None) -> pd.DataFrame:
    """Content hash, size, mode and perceptual hashes of every file, using and filling the cache.

    Returns:
        One row per path: ``path, sha256, size, mode, error`` and ``hashes`` (the (11, 3) uint64
        array of :func:`perceptual_hashes`, or None for unreadable files).
    """
    cache_file = (cache_dir or default_cache()) / f"phash-v{HASH_VERSION}.json"
    try:
        cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    except (ValueError, OSError):  # a damaged or unreadable cache is rebuilt, never trusted
        cache = {}
    shas, unreadable = [], {}
    for path in paths:  # a missing or unreadable file is a finding (data.on_bad_file decides), not a crash
        try:
            shas.append(file_digest(path))
        except OSError as exc:
            shas.append(None)
            unreadable[path] = f"{type(exc).__name__}: {exc.strerror or exc}"
    todo = sorted({s: p for s, p in zip(shas, paths, strict=True) if s is not None and s not in cache}.items())
    if todo:
        workers = workers or os.cpu_count() or 1
        if workers > 1 and len(todo) > 32:
            with ProcessPoolExecutor(workers) as pool:
                results = list(pool.map(_hash_file, [p for _, p in todo], chunksize=64))
        else:
            results = [_hash_file(p) for _, p in todo]
        cache.update({s: r for (s, _), r in zip(todo, results, strict=True)})  # errors too: same bytes, same error
        _write_cache(cache_file, lambda tmp: tmp.write_text(json.dumps(cache)))
    rows = []
    for path, sha in zip(paths, shas, strict=True):
        entry = cache[sha] if sha is not None else {"error": unreadable[path]}
        rows.append({"path": path, "sha256": sha, "size": tuple(entry.get("size", ())), "mode": entry.get("mode"),
                     "error": entry.get("error"),
                     "hashes": np.array(entry["hashes"], dtype=np.uint64) if "hashes" in entry else None})
    return pd.DataFrame(rows)


def _bits(hashes: np.ndarray) -> np.ndarray:
    """The hashes' bits, shape (n, rows, 143) uint8."""
    return np.unpackbits(np.ascontiguousarray(hashes).view(np.uint8), axis=-1)[..., :_BITS]


def _signs(hashes: np.ndarray) -> np.ndarray:
    """Hash bits as +-1 float32, shape (n, rows, 143): products of +-1 in float32 are exact."""
    return _bits(hashes).astype(np.float32) * 2 - 1


def _queries(hashes: np.ndarray) -> tuple[list[int], np.ndarray]:
    """The rows compared with another image's 8 variants (the hash as is, and the centre crops if present),
    and the bits each adds to the distance (:data:`CROP_PENALTY` for the crops)."""
    rows = [0, *range(_VARIANTS, hashes.shape[1])]
    return rows, np.array([0] + [CROP_PENALTY] * (len(rows) - 1), dtype=np.float32)


def near_duplicate_pairs(hashes: np.ndarray, threshold: int, chunk: int = 512) -> pd.DataFrame:
    """Pairs (i < j) within ``threshold`` bits under some flip/rotation, or through a centre crop of either.

    Hamming distances come from one matrix product: with bits mapped to +-1, the distance of
    two hashes is ``(n_bits - dot) / 2``, so BLAS compares every image's hash and centre crops
    with all 8 variants of every other (10,605 images on 2 cores: 15 s, 5 s without the crops;
    popcounts in numpy took ~40 s without them). A match through a crop counts :data:`CROP_PENALTY` bits
    more; a pair's distance is the smaller of the two directions (i's crops against j, j's
    against i).

    Args:
        hashes: (n, 8 + crops, 3) uint64: the 8 flip/rotation variants of each image's hash,
            then the hashes of its centre crops (:func:`perceptual_hashes`; none is fine).
        threshold: maximal Hamming distance of a near-duplicate pair.
        chunk: query hashes compared at once (memory is about chunk x n x 32 bytes).

    Returns:
        Columns ``i, j, distance``, one row per pair, sorted.
    """
    n = len(hashes)
    signs = _signs(hashes)
    query_rows, penalty = _queries(hashes)
    queries = signs[:, query_rows]  # (n, q, bits)
    q = len(query_rows)
    variants = np.ascontiguousarray(signs[:, :_VARIANTS].transpose(1, 0, 2).reshape(_VARIANTS * n, _BITS).T)
    rows = max(1, chunk // q)
    found = []
    for start in range(0, n, rows):
        block = queries[start:start + rows]
        dots = (block.reshape(-1, _BITS) @ variants).reshape(len(block), q, _VARIANTS, n).max(2)  # best variant
        dist = ((_BITS - dots) / 2 + penalty[:, None]).min(1).round().astype(np.int32)
        i, j = np.nonzero(dist <= threshold)
        keep = j != i + start
        a, b = i[keep] + start, j[keep]
        found.append(pd.DataFrame({"i": np.minimum(a, b), "j": np.maximum(a, b), "distance": dist[i[keep], j[keep]]}))
    if not found:
        return pd.DataFrame(columns=["i", "j", "distance"])
    pairs = pd.concat(found, ignore_index=True)
    return pairs.groupby(["i", "j"], as_index=False)["distance"].min()


def _cached_pairs(shas: list[str], threshold: float, cache_dir: Path | None,
                  search: Callable[[], pd.DataFrame], tag: str = "pairs", column: str = "distance") -> pd.DataFrame:
    """The pair search's result for exactly these file contents in this order, cached on disk."""
    if not shas:
        return pd.DataFrame({"i": [], "j": [], column: []}, dtype=int)
    key = hashlib.sha256(f"{HASH_VERSION}:{threshold}:{','.join(shas)}".encode()).hexdigest()[:32]
    path = (cache_dir or default_cache()) / f"{tag}-v{HASH_VERSION}-{key}.csv"
    try:
        if path.is_file():
            return pd.read_csv(path)
    except (OSError, ValueError):  # unreadable or damaged: searched again
        pass
    pairs = search()
    _write_cache(path, lambda tmp: pairs.to_csv(tmp, index=False))
    return pairs


def hash_distances(hashes: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """The distance of the pairs (i, j) as :func:`near_duplicate_pairs` measures it."""
    if len(i) == 0:
        return np.zeros(0, dtype=int)
    bits = _bits(hashes)
    rows, penalty = _queries(hashes)

    def one_way(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # a's queries against b's 8 variants
        return ((bits[a][:, rows, None, :] != bits[b][:, None, :_VARIANTS, :]).sum(-1).min(2) + penalty).min(1)

    return np.minimum(one_way(i, j), one_way(j, i)).astype(int)


def _embedding_pairs(paths: list[str], shas: list[str], hashes: np.ndarray, phash_pairs: pd.DataFrame,
                     similarity: float, cache_dir: Path | None, method: str) -> tuple[pd.DataFrame, bool]:
    """The pHash pairs joined with the pairs of similar embeddings, each with both distances."""
    try:
        vectors = image_embeddings(paths, shas, cache_dir or default_cache(), write=_write_cache)
    except WeightsError as exc:
        if method == "embedding":
            raise
        log.warning("audit.method=both: no embeddings (%s); near-duplicates by pHash only", exc)
        return phash_pairs.assign(similarity=np.nan, found_by="phash"), False
    found = _cached_pairs(shas, similarity, cache_dir, lambda: similar_pairs(vectors, similarity),
                          tag=f"embed-pairs-{EMBEDDING_MODEL}-{EMBEDDING_EDGE}-e{EMBEDDING_VERSION}",
                          column="similarity")
    keys = ["i", "j"]
    both = phash_pairs[keys].assign(by_hash=True).merge(found[keys].assign(by_embedding=True), on=keys, how="outer")
    both = both.fillna({"by_hash": False, "by_embedding": False}).astype({"by_hash": bool, "by_embedding": bool})
    if method == "embedding":
        both = both[both["by_embedding"]]
    i, j = both["i"].to_numpy(dtype=int), both["j"].to_numpy(dtype=int)
    both = both.assign(distance=hash_distances(hashes, i, j), similarity=(vectors[i] * vectors[j]).sum(1),
                       found_by=np.where(both["by_hash"] & both["by_embedding"], "both",
                                         np.where(both["by_hash"], "phash", "embedding")))
    return both.drop(columns=["by_hash", "by_embedding"]).sort_values(keys, ignore_index=True), True


def audit_records(records: pd.DataFrame, threshold: int = 14, workers: int | None = None,
                  cache_dir: Path | None = None, classes: tuple[str, str] = ("benign", "malignant"),
                  method: str = "phash", similarity: float = EMBEDDING_THRESHOLD,
                  ) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Audit a dataset's records (``path, label, split``).

    Args:
        records: every image of every split.
        threshold: Hamming distance (of 143 bits) up to which two images are near-duplicates.
        workers: processes for hashing.
        cache_dir: hash cache folder.
        classes: names of labels 0 and 1, for the report.
        method: ``phash`` (hashes only), ``embedding`` (cosine similarity of pretrained features only)
            or ``both`` (the union; without the offline Lite0 weights, pHash alone with a warning).
        similarity: cosine similarity from which two embeddings are near-duplicates.

    Returns:
        ``(images, pairs, summary)``: ``images`` adds ``sha256, error, group`` (duplicate group id,
        shared by all copies of one lesion); ``pairs`` lists each duplicate pair with its kind,
        distance and whether it crosses splits or folds or carries conflicting labels;
        ``summary`` is the content of ``audit.json``.
    """
    if method not in METHODS:
        raise ConfigError(f"audit.method={method!r} is not one of {', '.join(METHODS)}")
    records = records.reset_index(drop=True)
    table = hash_images(records["path"].tolist(), workers, cache_dir)
    images = records.assign(sha256=table["sha256"], error=table["error"], size=table["size"], mode=table["mode"])
    ok = np.flatnonzero(table["error"].isna().to_numpy())
    empty = np.zeros((0, _VARIANTS + len(ZOOMS), _WORDS), np.uint64)
    hashes = np.stack(table["hashes"].iloc[ok].to_numpy()) if len(ok) else empty
    shas = table["sha256"].iloc[ok].tolist()
    pairs = _cached_pairs(shas, threshold, cache_dir, lambda: near_duplicate_pairs(hashes, threshold))
    embedded = False
    if method != "phash" and len(ok):
        pairs, embedded = _embedding_pairs(records["path"].iloc[ok].tolist(), shas, hashes, pairs, similarity,
                                           cache_dir, method)
    if len(pairs):
        pairs[["i", "j"]] = ok[pairs[["i", "j"]].to_numpy(dtype=int)]
    n = len(images)
    graph = coo_matrix((np.ones(len(pairs)), (pairs["i"].astype(int), pairs["j"].astype(int))), shape=(n, n))
    images["group"] = connected_components(graph, directed=False)[1]

    a = images.iloc[pairs["i"].astype(int)].reset_index(drop=True)
    b = images.iloc[pairs["j"].astype(int)].reset_index(drop=True)
    out = pd.DataFrame({
        "path_a": a["path"], "path_b": b["path"], "split_a": a["split"], "split_b": b["split"],
        "label_a": a["label"], "label_b": b["label"],
        "kind": np.where(a["sha256"].to_numpy() == b["sha256"].to_numpy(), "exact", "near"),
        "distance": pairs["distance"].astype(int).to_numpy(),
        "similarity": pairs["similarity"].to_numpy(dtype=float) if "similarity" in pairs else np.nan,
        "found_by": pairs["found_by"].to_numpy() if "found_by" in pairs else "phash",
    })
    out["crosses_split"] = out["split_a"] != out["split_b"]
    out["label_conflict"] = out["label_a"] != out["label_b"]
    summary = _audit_summary(images, out, threshold, classes)
    summary["embedding"] = ({"model": EMBEDDING_MODEL, "edge": EMBEDDING_EDGE, "version": EMBEDDING_VERSION,
                             "threshold": similarity} if embedded else None)
    summary["method"] = method if embedded or method == "phash" else "phash"
    return images, out, summary


def add_fold_crossings(pairs: pd.DataFrame, summary: dict, fold_by_path: Mapping[str, int]) -> None:
    """Mark the pairs whose two images sit in different cross-validation folds (in place)."""
    fa, fb = pairs["path_a"].map(fold_by_path), pairs["path_b"].map(fold_by_path)
    pairs["crosses_folds"] = (fa.notna() & fb.notna() & (fa != fb)).astype(bool)
    summary["pairs_crossing_folds"] = int(pairs["crosses_folds"].sum())


def leaked_test_paths(pairs: pd.DataFrame) -> set[str]:
    """Test images that have an exact or near duplicate in the training split."""
    cross = pairs[pairs["crosses_split"] & pairs["split_a"].isin(["train", "test"])
                  & pairs["split_b"].isin(["train", "test"])]
    return set(cross.loc[cross["split_a"] == "test", "path_a"]) | set(cross.loc[cross["split_b"] == "test", "path_b"])


def shared_patient_paths(train: pd.DataFrame, scored: pd.DataFrame, column: str) -> set[str]:
    """Scored images whose patient also has an image among the training records.

    A patient's other lesions, and other photos of one lesion taken another day, share skin, camera
    and clinic with it without being duplicates: a test split that shares patients with the
    training split flatters the model as duplicates do.

    Args:
        train, scored: records with ``path`` and ``column``.
        column: the patient id (``data.group_column``); a missing id (empty, ``NA``, ``unknown``:
            :func:`melanoma.metadata.is_missing`) joins no patient.
    """
    known = set(_patient_ids(train, column).dropna())
    ids = _patient_ids(scored, column)
    return set(scored.loc[(ids.notna() & ids.isin(known)).to_numpy(), "path"])


def patient_leaks(records: pd.DataFrame, column: str) -> dict:
    """How far the test split shares patients with the training split (records with ``split``).

    Returns:
        ``{"column", "patients_in_both_splits", "test_with_train_patient",
        "test_with_train_patient_share"}`` (the share ``None`` without a test split).
    """
    train, test = records[records["split"] == "train"], records[records["split"] == "test"]
    shared = shared_patient_paths(train, test, column)
    both = set(_patient_ids(train, column).dropna()) & set(_patient_ids(test, column).dropna())
    return {"column": column, "patients_in_both_splits": len(both), "test_with_train_patient": len(shared),
            "test_with_train_patient_share": len(shared) / len(test) if len(test) else None}


def patient_warning(leaks: Mapping | None) -> str | None:
    """The one warning line for a test split that shares patients with train (``None`` if it does not)."""
    if not leaks or not leaks["test_with_train_patient"]:
        return None
    return (f"{leaks['test_with_train_patient']} test images ({leaks['test_with_train_patient_share']:.1%}) share one "
            f"of {leaks['patients_in_both_splits']} patients (data.group_column={leaks['column']}) with the training "
            "split, so the test metrics are optimistic (melanoma-eval also reports them without those images); "
            "assign the manifest's split column by patient to remove the leak")


def _patient_ids(frame: pd.DataFrame, column: str) -> pd.Series:
    """Each image's patient id as text, ``None`` where it is missing."""
    values = frame[column].astype(object)
    return values.astype(str).str.strip().where(~is_missing(values), None)


def _audit_summary(images: pd.DataFrame, pairs: pd.DataFrame, threshold: int, classes: tuple[str, str]) -> dict:
    counts = {split: {classes[label]: int(c) for label, c in part.groupby("label").size().items()}
              for split, part in images.groupby("split")}
    readable = images[images["error"].isna()]
    leaked = leaked_test_paths(pairs)
    n_test = int((images["split"] == "test").sum())
    return {
        "hash": {"kind": "dct-phash-143bit-d4-crops3", "version": HASH_VERSION, "threshold": threshold},
        "n_images": int(len(images)),
        "counts": counts,
        "missing_splits": [s for s in ("train", "test") if s not in counts],
        "empty_classes": [f"{split}/{name}" for split, c in counts.items() for name in classes if name not in c],
        "sizes": {f"{w}x{h}": int(c) for (w, h), c in Counter(map(tuple, readable["size"])).most_common(10)},
        "modes": dict(Counter(readable["mode"])),
        "unreadable": [{"path": p, "reason": r} for p, r in images.loc[images["error"].notna(), ["path", "error"]]
                       .itertuples(index=False)],
        "exact_duplicate_pairs": int((pairs["kind"] == "exact").sum()),
        "near_duplicate_pairs": int((pairs["kind"] == "near").sum()),
        "pairs_crossing_splits": int(pairs["crosses_split"].sum()),
        "pairs_crossing_folds": None,  # set by add_fold_crossings once folds exist
        "label_conflicts": int(pairs["label_conflict"].sum()),
        "duplicate_groups": int((images["group"].value_counts() > 1).sum()),
        "test_with_train_duplicate": len(leaked),
        "test_with_train_duplicate_share": len(leaked) / n_test if n_test else None,
    }


def summary_line(summary: dict) -> str:
    """The one-line verdict printed after an audit."""
    share = summary["test_with_train_duplicate_share"]
    leak = (f"{summary['test_with_train_duplicate']} test images ({share:.1%}) have a near-duplicate in train"
            if share is not None else "no test split")
    patients = summary.get("patients")
    if patients and patients["test_with_train_patient_share"] is not None:
        leak += (f"; {patients['test_with_train_patient']} test images share a patient "
                 f"({patients['column']}) with train")
    return (f"{leak}; {summary['label_conflicts']} label conflicts; {summary['exact_duplicate_pairs']} exact and "
            f"{summary['near_duplicate_pairs']} near-duplicate pairs; {len(summary['unreadable'])} unreadable files")


def train_duplicates(train: pd.DataFrame, scored: pd.DataFrame, threshold: int, workers: int | None,
                     method: str = "phash", similarity: float = EMBEDDING_THRESHOLD) -> set[str]:
    """Scored images that are a run's training images, or an exact or near duplicate of one.

    A scored image at a training image's path (``eval.split=train`` or ``all``, or another manifest
    that lists training files) counts as leaked without being hashed.

    Args:
        train: the run's training records (``path, label``).
        scored: the images being evaluated (``path, label``).
        threshold: pHash Hamming distance of a near duplicate (``audit.threshold``).
        workers: hashing processes.
        method, similarity: as :func:`audit_records`.
    """
    scored_paths = set(scored["path"])
    if train.empty:
        return set()
    both = pd.concat([train.assign(split="train"),
                      scored.assign(split="test")[~scored["path"].isin(set(train["path"]))]], ignore_index=True)
    _, pairs, _ = audit_records(both, threshold, workers=workers, method=method, similarity=similarity)
    return (leaked_test_paths(pairs) | set(train["path"])) & scored_paths
