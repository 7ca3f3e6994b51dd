"""Finding images on disk, reading them safely, and feeding them to a model.

Every layout is turned into one table of records (``path, label, split``) so that folds,
training and evaluation never care where the images came from.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import multiprocessing
import multiprocessing.util
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from melanoma.errors import ConfigError, DataError, quiet_worker_deaths
from melanoma.synthetic import generate_dataset

log = logging.getLogger(__name__)

Layout = Literal["kaggle", "folder", "csv"]
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
SPLITS = ("train", "test")
# Columns of the records and run files: a manifest's metadata or group column may not take these names.
RESERVED_COLUMNS = ("path", "label", "split", "fold", "group", "sha256", "error", "size", "mode", "prob")
# Real demo sets shipped inside the package (data=demo reads isic-uda1), wherever melanoma is installed.
DEMO_DATA = Path(__file__).resolve().parent / "demo_data"


def _list_images(folder: Path) -> list[Path]:
    """Image files in ``folder``, sorted; stray files (.DS_Store, Thumbs.db, ...) are left out."""
    files, stray = [], []
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
            files.append(path)
        elif path.is_file():
            stray.append(path.name)
    if stray:
        log.info("ignored %d non-image file(s) in %s: %s", len(stray), folder, ", ".join(stray[:5]))
    return files


def _class_folders(root: Path, classes: tuple[str, str], split: str, strict: bool = True) -> list[dict]:
    """Records of ``root/<class>/*`` for both classes; the last class is the positive one.

    With ``strict=False`` (the audit) a missing or empty class folder yields no rows instead of
    an error, so that it can be reported.
    """
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    missing = [c for c in classes if c not in found]
    if missing and not strict:
        log.warning("%s has no folder %s", root, ", ".join(missing))
    elif missing:
        raise DataError(
            f"{root} has no folder {missing[0]!r} (found: {', '.join(found) or 'none'}); "
            f"set data.classes=[NEGATIVE,POSITIVE] to the class folder names"
        )
    rows = []
    for label, cls in enumerate(classes):
        images = _list_images(root / cls) if (root / cls).is_dir() else []
        if not images and strict:
            raise DataError(f"{root / cls} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                            "add images or point data.root elsewhere")
        rows += [{"path": str(p), "label": label, "split": split} for p in images]
    return rows


def check_location(layout: str | None, root: str | Path | None, manifest: str | Path | None,
                   complete: bool = True) -> None:
    """What :func:`load_records` checks before it reads anything: a ``csv`` manifest is a file, and a root is a
    folder (required for ``kaggle`` and ``folder``). The CLIs call it before Hydra creates their output folder.

    Args:
        layout: ``kaggle``, ``folder`` or ``csv``; ``None`` checks a manifest if one is given.
        root: the dataset folder.
        manifest: the CSV file (``csv`` only).
        complete: the keys must name the data on their own, so a missing manifest or root is an error
            (``False``: another config fills the keys left out, as the run's own data does for ``melanoma-eval``).

    Raises:
        ConfigError: ``csv`` without a manifest (with ``complete``).
        DataError: the manifest or the folder does not exist.
    """
    if layout == "csv" and manifest is None and complete:
        raise ConfigError("data=csv needs data.manifest=PATH to a CSV with path,label[,split] columns")
    if manifest is not None and layout in ("csv", None) and not Path(manifest).expanduser().is_file():
        raise DataError(f"data.manifest={manifest} does not exist; point it at a CSV with path,label columns")
    if (root is not None and not Path(root).expanduser().is_dir()) or (
            root is None and complete and layout in ("kaggle", "folder")):
        raise DataError(f"data.root={root} is not a folder; set data.root=PATH to the dataset, "
                        "or try the real demo set shipped with melanoma: data=demo")


def _read_manifest(manifest: Path, root: Path | None, classes: tuple[str, str],
                   columns: Sequence[str] = ()) -> list[dict]:
    """Records of a CSV manifest with ``path,label``, an optional ``split`` column and the extra ``columns``
    (:func:`check_location` has found the file)."""
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    for column in ("path", "label"):
        if column not in table.columns:
            raise DataError(f"{manifest} has no {column!r} column (columns: {', '.join(table.columns)}); "
                            "the manifest needs path,label and optionally split")
    for column in columns:
        if column in RESERVED_COLUMNS:
            raise ConfigError(f"{manifest}: the column {column!r} (data.metadata or data.group_column) has a name "
                              f"melanoma uses itself ({', '.join(RESERVED_COLUMNS)}); rename it in the manifest")
        if column not in table.columns:
            close = difflib.get_close_matches(column, list(table.columns), n=3) or [
                c for c in table.columns if column.lower() in c.lower() or c.lower() in column.lower()][:3]
            raise DataError(f"{manifest} has no column {column!r} (close: {', '.join(close) or 'none'}; "
                            f"columns: {', '.join(table.columns)}); fix data.metadata or data.group_column, or add "
                            "the column")
    base = root if root is not None else manifest.parent
    names = {c.lower(): i for i, c in enumerate(classes)} | {"0": 0, "1": 1}
    rows, first_line, repeated = [], {}, 0
    for line, rec in enumerate(table.to_dict("records"), start=2):
        label = names.get(rec["label"].strip().lower())
        if label is None:
            raise DataError(f"{manifest}:{line}: label {rec['label']!r} is not one of "
                            f"0, 1, {classes[0]}, {classes[1]}; fix the row or set data.classes")
        split = rec.get("split", "train").strip().lower() or "train"
        if split not in SPLITS:
            raise DataError(f"{manifest}:{line}: split {split!r} is not one of {', '.join(SPLITS)}")
        path = Path(rec["path"])
        row = {"path": str(path if path.is_absolute() else base / path), "label": label, "split": split,
               **{column: rec[column] for column in columns}}
        if row["path"] in first_line:  # one image, one row: a repeat would be trained (or tested) twice
            before = rows[first_line[row["path"]][1]]
            if before != row:
                raise DataError(f"{manifest}:{line}: {rec['path']} is also on line {first_line[row['path']][0]} "
                                f"with label {before['label']}, split {before['split']} (here label {label}, split "
                                f"{split}); keep one row per image")
            repeated += 1
            continue
        first_line[row["path"]] = (line, len(rows))
        rows.append(row)
    if repeated:
        log.warning("%s: %d repeated row(s) of the same image, label and split were read once", manifest, repeated)
    return rows


def load_records(
    layout: Layout,
    root: str | Path | None,
    classes: tuple[str, str] = ("benign", "malignant"),
    manifest: str | Path | None = None,
    strict: bool = True,
    columns: Sequence[str] = (),
) -> pd.DataFrame:
    """Find every image of a dataset.

    Args:
        layout: ``kaggle`` (``root/{train,test}/<class>/``), ``folder`` (``root/<class>/``, all
            training data) or ``csv`` (a manifest of ``path,label[,split]``).
        root: the dataset folder; for ``csv`` the base of relative paths (default: the
            manifest's folder).
        classes: negative and positive class names, as folder names or manifest labels.
        manifest: the CSV file, for the ``csv`` layout.
        strict: raise on a missing or empty class folder (``False`` lets the audit report it).
        columns: further manifest columns to keep, as text (``csv`` only): ``data.metadata``
            (:mod:`melanoma.metadata`) and ``data.group_column``.

    Returns:
        One row per image: ``path`` (str), ``label`` (0 or 1), ``split`` (``train``/``test``), then
        the extra ``columns``.

    Raises:
        DataError: a folder or file is missing, empty, or does not match the layout.
    """
    classes = tuple(classes)
    if len(classes) != 2:
        raise ConfigError(f"data.classes={list(classes)} must name exactly two classes, negative first")
    if layout == "csv":
        check_location("csv", root, manifest)
        rows = _read_manifest(Path(manifest).expanduser(), Path(root).expanduser() if root else None, classes,
                              columns)
        return pd.DataFrame(rows, columns=["path", "label", "split", *columns])
    if columns:
        raise ConfigError(f"data.metadata and data.group_column ({', '.join(columns)}) need data=csv with a manifest "
                          f"that holds those columns (data.layout={layout} has none)")
    if layout not in ("kaggle", "folder"):
        raise ConfigError(f"data.layout={layout!r} is not one of kaggle, folder, csv")
    check_location(layout, root, None)
    root = Path(root).expanduser()
    if layout == "folder":
        rows = _class_folders(root, classes, "train", strict)
    else:
        if not (root / "train").is_dir():
            raise DataError(f"{root} has no train/ folder; the kaggle layout is ROOT/train/<class>/ and "
                            "ROOT/test/<class>/ (use data=folder for ROOT/<class>/)")
        rows = _class_folders(root / "train", classes, "train", strict)
        if (root / "test").is_dir():
            rows += _class_folders(root / "test", classes, "test", strict)
        else:
            log.warning("%s has no test/ folder: only the training split is available", root)
    return pd.DataFrame(rows, columns=["path", "label", "split"])


def split_records(records: pd.DataFrame, split: str, classes: tuple[str, str]) -> pd.DataFrame:
    """The rows of one split, checked to hold both classes.

    Raises:
        DataError: the split is empty or holds only one class.
    """
    part = records[records["split"] == split].reset_index(drop=True)
    if part.empty:
        raise DataError(f"the dataset has no {split} images; check data.root and the layout")
    present = sorted(set(part["label"]))
    if len(present) < 2:
        raise DataError(f"the {split} split holds only {classes[present[0]]!r} images ({len(part)}); "
                        f"both {classes[0]!r} and {classes[1]!r} are needed")
    return part


def file_digest(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes: what identifies an image, whatever its name or date.

    The audit and the disk cache both name images by it, so a run reads each file's bytes once for both.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def find_images(input_path: str | Path) -> list[str]:
    """One image file, or every image below a folder (recursively, sorted, stray files left out).

    Raises:
        DataError: the path does not exist or holds no images.
    """
    path = Path(input_path).expanduser()
    if path.is_file():
        return [str(path)]
    if not path.is_dir():
        raise DataError(f"input={path} does not exist; point it at an image or a folder of images")
    found = sorted(str(p) for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not found:
        raise DataError(f"input={path} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return found


def load_eval_set(data: Mapping, split: str, split_key: str = "eval.split",
                  columns: Sequence[str] = ()) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """The labelled images to score, with unreadable files handled by ``data["on_bad_file"]``.

    A split with a single class is returned as is: metrics that need both classes are then
    reported as unavailable rather than failing the evaluation.

    Args:
        data: a run's data settings (``layout``, ``root``, ``classes``, ``manifest``, ``on_bad_file``,
            ``synthetic``), as its config records them.
        split: ``test``, ``train`` or ``all``.
        split_key: the config key that error messages name (``eval.split`` for melanoma-eval,
            ``split`` for melanoma-explain).
        columns: manifest columns to read too (the metadata fused models need).

    Returns:
        ``(images to score: path, label and the extra columns, skipped (path, reason))``.

    Raises:
        ConfigError: an unknown split.
        DataError: the split is empty or none of its images can be read.
    """
    if split not in ("test", "train", "all"):
        raise ConfigError(f"{split_key}={split!r} is not one of test, train, all")
    if data.get("synthetic"):
        generate_dataset(data["root"], **data["synthetic"])
    # strict=False: an empty class folder is a one-class split, scored with the metrics that need
    # both classes reported as unavailable, not refused
    records = load_records(data["layout"], data["root"], tuple(data["classes"]), data.get("manifest"), strict=False,
                           columns=columns)
    if data["layout"] != "folder" and split != "all":
        records = records[records["split"] == split]
    if records.empty:
        raise DataError(f"the dataset at {data['root'] or data.get('manifest')} has no {split} images; "
                        f"pass {split_key}=all to use every image")
    bad = scan_images(records["path"].tolist(), data.get("on_bad_file") or "error")
    records = records[~records["path"].isin({p for p, _ in bad})]
    if records.empty:
        raise DataError(f"none of the {split} images could be read")
    return records[["path", "label", *columns]].reset_index(drop=True), bad


def training_images(data: Mapping, columns: Sequence[str] = ()) -> pd.DataFrame:
    """The training split a run learned from, read again from its recorded data settings.

    Args:
        data: the run's ``data`` config.
        columns: manifest columns to keep (e.g. ``data.group_column``).

    Raises:
        DataError: it is no longer where the run found it (or its manifest lacks one of ``columns``).
    """
    records = load_records(data["layout"], data["root"], tuple(data["classes"]), data.get("manifest"), strict=False,
                           columns=columns)
    return records[records["split"] == "train"]


def load_image(path: str | Path) -> Image.Image:
    """Read an image as 8-bit RGB, upright as its EXIF orientation says.

    Grayscale, palette, RGBA, CMYK and 16-bit images are converted; transparency is dropped.
    """
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: keep the top 8 bits
            arr = np.asarray(img, dtype=np.uint32)
            img = Image.fromarray((arr >> 8 if arr.max() > 255 else arr).astype(np.uint8))
        elif img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        return img.convert("RGB")


def _check_image(path: str) -> str | None:
    """None if the image decodes fully, else the reason it does not."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, still reading every byte
            img.load()
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def scan_images(paths: list[str], on_bad_file: Literal["error", "skip"] = "error",
                workers: int | None = None) -> list[tuple[str, str]]:
    """Decode every image once before training, so a bad file fails in seconds, not hours.

    Args:
        paths: image files to check.
        on_bad_file: ``error`` raises on the first bad file; ``skip`` logs each and returns them.
        workers: threads to decode with (PIL releases the GIL while decoding).

    Returns:
        ``(path, reason)`` for each file that could not be read.

    Raises:
        DataError: with ``on_bad_file=error``, naming the first bad file.
    """
    if on_bad_file not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_file={on_bad_file!r} is not one of error, skip")
    with ThreadPoolExecutor(workers or min(8, usable_cores())) as pool:
        reasons = list(pool.map(_check_image, paths))
    return handle_bad_files([(p, r) for p, r in zip(paths, reasons, strict=True) if r is not None], on_bad_file)


def readable_images(input_path: str | Path, key: str = "input") -> tuple[list[str], list[tuple[str, str]]]:
    """The images of a file or folder (:func:`find_images`) that decode; each one that does not is logged.

    Args:
        input_path: an image or a folder of them.
        key: the config key that named ``input_path``, for the error.

    Returns:
        The readable paths, in :func:`find_images`'s order, and ``(path, reason)`` of the skipped ones.

    Raises:
        DataError: the path holds no image, or none of its images can be read.
    """
    paths = find_images(input_path)
    bad = scan_images(paths, "skip")
    skipped = {path for path, _ in bad}
    readable = [path for path in paths if path not in skipped]
    if not readable:
        raise DataError(f"none of the images in {key}={input_path} could be read")
    return readable, bad


def handle_bad_files(bad: list[tuple[str, str]], on_bad_file: Literal["error", "skip"]) -> list[tuple[str, str]]:
    """Apply the ``data.on_bad_file`` policy to ``(path, reason)`` pairs found unreadable.

    Raises:
        DataError: with ``on_bad_file=error``, naming the first bad file.
    """
    if on_bad_file not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_file={on_bad_file!r} is not one of error, skip")
    if bad and on_bad_file == "error":
        path, reason = bad[0]
        raise DataError(f"{path} is not a readable image ({reason}); remove or replace it, or set "
                        f"data.on_bad_file=skip ({len(bad)} bad file(s) in all)")
    for path, reason in bad:
        log.warning("skipping %s: %s", path, reason)
    return bad


class ImageDataset(Dataset):
    """Images and 0/1 labels from a list of paths, transformed on the fly.

    With ``decoded`` (a :class:`melanoma.cache.DecodedImages`, or any mapping of path to uint8
    CHW tensor) the pixels come from there instead of the file: the transform then starts from
    the cached, already resized tensor. With ``metadata`` (one encoded row per image, see
    :mod:`melanoma.metadata`) an item is ``(image, metadata, label)`` instead of ``(image, label)``.
    """

    def __init__(self, paths: list[str], labels: list[int], transform: Callable | None = None,
                 decoded: Mapping[str, torch.Tensor] | None = None, metadata: np.ndarray | None = None) -> None:
        self.paths = list(paths)
        self.labels = list(labels)
        self.transform = transform
        self.decoded = decoded
        self.metadata = torch.as_tensor(metadata, dtype=torch.float32) if metadata is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        path = self.paths[index]
        image = self.decoded[path] if self.decoded is not None else load_image(path)
        if self.transform is not None:
            image = self.transform(image)
        label = torch.tensor(self.labels[index], dtype=torch.float32)
        return (image, label) if self.metadata is None else (image, self.metadata[index], label)


def usable_cores() -> int:
    """Cores this process may run on (a SLURM or taskset allocation, not the whole machine)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_num_workers(num_workers: int | str) -> int:
    """``auto`` leaves one usable core to the training loop (at most 16 workers); an integer is used as is."""
    if num_workers == "auto":
        return max(1, min(16, usable_cores() - 1))
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"data.num_workers={num_workers!r} must be auto or an integer >= 0")
    return num_workers


def _quiet_lost_connection(args: threading.ExceptHookArgs) -> None:
    if not issubclass(args.exc_type, (ConnectionError, EOFError)):
        threading.__excepthook__(args)


def _quiet_lost_connection_report(exc_type: type[BaseException], value: BaseException, tb: object) -> None:
    # The resource sharer's thread catches its own errors and reports them through sys.excepthook, not
    # threading.excepthook (multiprocessing/resource_sharer.py, _serve).
    if not issubclass(exc_type, (ConnectionError, EOFError)):
        sys.__excepthook__(exc_type, value, tb)


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers ignore SIGINT and SIGTERM: a terminal's Ctrl-C, ``timeout`` and SLURM preemption signal
    the whole process group, and stopping is the main process's job (it shuts its workers down).

    A worker's only thread is multiprocessing's resource sharer, which hands batch memory to the main
    process; when the main process stops mid-handshake, its lost connection is expected, not an error.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.excepthook = _quiet_lost_connection
    sys.excepthook = _quiet_lost_connection_report


def _kill_loader_workers() -> None:
    """At exit, stop any daemonic child process, the loader workers, with SIGKILL.

    An exception or a signal can end the main process while a loader's iterator still runs
    (its traceback holds it). torch then leaves the workers to multiprocessing's exit handler,
    which sends them SIGTERM and waits: forever, as they ignore SIGTERM
    (:func:`_ignore_stop_signals`). This runs inside that handler, before its wait (a finalizer
    of priority 100; so also in a Hydra joblib worker process that imported this module), and
    kills them outright: they hold nothing that needs saving. torch's SIGCHLD handler, which would
    report each killed worker as a failure, is replaced by a no-op first
    (:func:`melanoma.errors.quiet_worker_deaths`). No other daemonic
    child exists in this package; a ``multiprocessing.Pool`` alive at exit would lose its workers
    the same way.
    """
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if not workers:
        return
    quiet_worker_deaths()
    for child in workers:
        child.kill()
        child.join(timeout=5)


multiprocessing.util.Finalize(None, _kill_loader_workers, exitpriority=100)


class BalancedSampler(Sampler[int]):
    """Draw images with replacement so that each class is drawn equally often on average.

    An epoch keeps its length (``len(labels) / world_size`` draws per rank), so the schedule's
    steps do not change; a rare image is seen several times an epoch, a common one not every
    epoch. Like torch's ``DistributedSampler``, the draws of an epoch depend only on ``seed``, the
    rank and the epoch (:meth:`set_epoch`, which the training loop calls), so a resumed run draws
    what an uninterrupted one would and each torchrun rank draws its own share.

    Raises:
        ConfigError: a class has no image to draw.
    """

    def __init__(self, labels: Sequence[int], seed: int, rank: int = 0, world_size: int = 1) -> None:
        labels = np.asarray(labels, dtype=int)
        counts = np.bincount(labels, minlength=2)
        if (counts == 0).any():
            raise ConfigError(f"data.sampler=balanced needs images of both classes in every training fold "
                              f"(counts {counts.tolist()}); use data.sampler=shuffle")
        self.weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
        self.num_samples = -(-len(labels) // world_size)
        self.seed, self.rank, self.epoch = seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the images of ``epoch`` next."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        mixed = int(np.random.SeedSequence([self.seed, self.rank, self.epoch]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(mixed)
        yield from torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator).tolist()


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, num_workers: int, seed: int,
                pin_memory: bool = False, persistent_workers: bool = True, rank: int = 0,
                world_size: int = 1, prefetch_factor: int | None = None, balanced: bool = False) -> DataLoader:
    """A DataLoader that shuffles reproducibly from ``seed`` when training.

    Worker processes are seeded by torch from the loader's generator, so augmentations
    repeat exactly across runs with the same seed. Persistent workers carry their random state
    from epoch to epoch; turn them off to make a resumed run repeat an uninterrupted one.
    Under torchrun (``world_size > 1``) a training loader shards with a ``DistributedSampler``.
    With ``balanced`` a training loader draws each class equally often instead
    (:class:`BalancedSampler`); it needs the dataset's ``labels``.
    """
    generator = torch.Generator().manual_seed(seed)
    sampler: Sampler | None = None
    if train and balanced:
        sampler = BalancedSampler(dataset.labels, seed, rank, world_size)
    elif train and world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=train and len(dataset) > batch_size,  # a batch of one breaks BatchNorm
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        generator=generator,
        worker_init_fn=_ignore_stop_signals if num_workers > 0 else None,
    )
