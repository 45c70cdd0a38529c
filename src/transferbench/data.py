"""Datasets: loading each kind (the catalog, image folders, CSV files, Hugging Face datasets) into uint8
images, the splits a run trains, selects and tests on, and the batches that feed the training device.

Every dataset is decoded once into a store on disk (see `images`), keyed by its content, and read back a batch
at a time: a dataset bigger than RAM trains from the OS page cache, and a second run on the same data decodes
nothing. Resizing to the model's resolution, normalisation and augmentation happen per batch on the
device (see `preprocess`).

`--dataset` values (config.DatasetSpec parses them):
- NAME: a catalog dataset (`transferbench datasets` lists them) with its official splits, its validation
  split where it has one, and the metric the literature reports for it.
- folder:PATH: `PATH/train/<class>/` and `PATH/test/<class>/`, or only class folders `PATH/<class>/`, from which a
  stratified, seeded test split is carved (its files are recorded in Dataset.test_files). `PATH/val/<class>/`,
  where it exists, is the validation split.
- csv:FILE: columns `path,label` (paths relative to the file) and optionally `split` (train / val / test).
  Without a split column (or without test rows) a test split is carved as for class folders.
- hf:NAME[:CONFIG]: a Hugging Face dataset by name, a directory written by `save_to_disk`, or data files
  (parquet, arrow, csv, json); the image and label columns are the Image and ClassLabel features unless named.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from . import distributed
from .catalog import CATALOG, get_entry, load_catalog
from .config import DatasetSpec, cache_dir, default_data_dir
from .errors import UserError, did_you_mean
from .images import (
    IMAGE_EXTENSIONS,
    DiskImages,
    ImageSet,
    Store,
    StoreWriter,
    as_tensor,
    decode_bytes,
    human_bytes,
    image_size,
    open_store,
    ordered_map,
    probe_bytes,
    progress_bar,
    store_path,
)
from .preprocess import Preprocess
from .rundir import writable_dir

log = logging.getLogger(__name__)
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass
class Dataset:
    """A dataset as loaded: its splits (`val` only where the data defines one) and the figure the literature
    reports for it."""

    train: ImageSet
    test: ImageSet
    val: ImageSet | None = None
    metric: str = "top1"  # or "mean_per_class_acc" (Pets, Flowers-102, FGVC Aircraft, Caltech-101)
    test_files: list[str] | None = None  # a test split carved here (not the data's own): its files, for the record
    store: str | None = None  # the decoded store file the images are read from (None: in memory)

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    def describe_store(self) -> str:
        """One line for the log: where the decoded images live and how big they are."""
        if self.store is None:
            return "decoded images: in memory"
        n = len(self.train) + len(self.test) + (len(self.val) if self.val is not None else 0)
        c, h, w = self.train.images.shape[1:]
        size = os.path.getsize(self.store) if os.path.exists(self.store) else 0
        return (f"decoded images: {self.store} ({human_bytes(size)} on disk, read through the page cache; {n:,} "
                f"images used, {c}x{h}x{w} uint8)")


@dataclass
class Splits:
    train: ImageSet
    val: ImageSet
    test: ImageSet

    @property
    def classes(self) -> list[str]:
        return self.test.classes


def decoded_dir() -> Path:
    return cache_dir() / "decoded"


# ----------------------------------------------------------------------------------------- the catalog

def ensure_cifar(name: str, root: Path) -> None:
    """CIFAR-10/100's python release present and md5-checked in root (downloaded if missing): the catalog's."""
    from .catalog import ensure

    ensure(name, Path(root))


def _load_catalog(name: str, data_dir: str | None, storage_size: int, workers: int, progress: bool) -> Dataset:
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    sets = load_catalog(name, root, storage_size=storage_size, progress=progress, workers=workers,
                        cache=decoded_dir())
    train = sets["train"]
    store = str(train.images.store.path) if isinstance(train.images, DiskImages) else None
    return Dataset(train, sets["test"], sets.get("val"), metric=get_entry(name).metric, store=store)


# ------------------------------------------------------------------------------- files: folders, CSV

@dataclass
class _Item:
    path: Path  # the file
    label: int  # index into the training classes
    split: str  # train, val, test, or all (a test split is carved from it)
    name: str  # how the user refers to it: relative to the folder, or as written in the CSV


def _list_folder(split_dir: Path, skip: Iterable[str] = ()) -> tuple[list[str], list[tuple[Path, str]]]:
    """Class folders and their images (class name per image), at any depth below each class folder (sub-folders
    of a class are part of it). Files that are not images are named in a warning, never dropped silently."""
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
                     and d.name not in skip)
    if not classes:
        raise UserError(f"{split_dir} has no class folders: expected {split_dir}/<class>/<image files>")
    items, skipped = [], []
    for cls in classes:
        files = sorted(p for p in (split_dir / cls).rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        skipped += [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
        if not images:
            raise UserError(
                f"class folder {split_dir / cls} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                f"add images or remove the folder"
            )
        items.extend((f, cls) for f in images)
    if skipped:
        shown = ", ".join(str(p.relative_to(split_dir)) for p in skipped[:5])
        log.warning(f"{split_dir}: skipped {len(skipped)} file(s) that are not images ({', '.join(IMAGE_EXTENSIONS)}):"
                    f" {shown}" + (", ..." if len(skipped) > 5 else ""))
    return classes, items


def _has_class_folders(path: Path) -> bool:
    return path.is_dir() and any(d.is_dir() and not d.name.startswith(".") for d in path.iterdir())


def _unseen_label_error(where: str, split: str, name: str, label: str, classes: list[str]) -> UserError:
    return UserError(f"{name}: its label '{label}' in the {split} split is not a class of the training split "
                     f"({len(classes)} classes: {', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}). "
                     f"A model cannot be tested on a class it never trained on: fix or remove the {split} images "
                     f"of that class ({where})")


def _folder_items(root: Path) -> tuple[list[str], list[_Item], bool]:
    """(training classes, every image with its split, whether a test split must be carved)."""
    train_dir, test_dir, val_dir = root / "train", root / "test", root / "val"
    split_layout = train_dir.is_dir() or test_dir.is_dir()
    if split_layout:
        for split, d in (("train", train_dir), ("test", test_dir)):
            if not d.is_dir():
                raise UserError(f"dataset folder {root} has no '{split}/' directory: expected {root}/train/<class>/ "
                                f"and {root}/test/<class>/, or only class folders {root}/<class>/ (a test split is "
                                f"then carved from them, --test-fraction)")
        classes, train = _list_folder(train_dir)
        parts = [("train", train_dir, train), ("test", test_dir, _list_folder(test_dir)[1])]
    else:
        classes, everything = _list_folder(root, skip=("val",) if _has_class_folders(val_dir) else ())
        parts = [("all", root, everything)]
    if _has_class_folders(val_dir):
        parts.insert(1, ("val", val_dir, _list_folder(val_dir)[1]))
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for split, base, files in parts:
        unseen = sorted({cls for _, cls in files} - set(classes))
        if unseen:
            first = next(p for p, cls in files if cls == unseen[0])
            present = sorted({cls for _, cls in files})
            only_train = sorted(set(classes) - set(present))
            raise _unseen_label_error(f"class folders of {train_dir} and {base} differ: only in train: "
                                      f"{only_train or 'none'}; only in {split}: {unseen}", split, str(first),
                                      unseen[0], classes)
        items += [_Item(p, index[cls], split, p.relative_to(root).as_posix()) for p, cls in files]
    return classes, items, not split_layout


def _class_order(labels: Iterable[str]) -> list[str]:
    """Class names in label order: numerically when every label is an integer (so "10" comes after "9")."""
    names = set(labels)
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _csv_items(path: Path) -> tuple[list[str], list[_Item], bool]:
    """(training classes, every listed image with its split, whether a test split must be carved)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"cannot read {path} ({type(err).__name__}: {err})") from None
    if not rows:
        raise UserError(f"{path} is empty: expected a header line 'path,label' (and optionally ',split'), then one "
                        f"line per image")
    header = [h.strip().lower() for h in rows[0]]
    missing = [c for c in ("path", "label") if c not in header]
    if missing:
        raise UserError(f"{path}: the header line has no {' and no '.join(repr(c) for c in missing)} column (it has "
                        f"{', '.join(repr(h) for h in rows[0])}); expected path,label and optionally split")
    col = {name: header.index(name) for name in ("path", "label", "split") if name in header}
    base = path.parent
    listed: dict[str, tuple[int, str]] = {}  # file -> (line, split)
    entries = []  # (line, file path, name as written, label text, split)
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise UserError(f"{path} line {line}: {len(row)} fields, the header has {len(header)}")
        name, label = row[col["path"]].strip(), row[col["label"]].strip()
        split = "all"
        if "split" in col:
            given = row[col["split"]].strip().lower()
            if given not in SPLIT_NAMES:
                raise UserError(f"{path} line {line}: split '{row[col['split']]}' is not one of train, val, test")
            split = SPLIT_NAMES[given]
        if not name:
            raise UserError(f"{path} line {line}: the path is empty")
        if not label:
            raise UserError(f"{path} line {line}: {name} has an empty label")
        file = Path(os.path.normpath(base / Path(name).expanduser()))
        if not file.is_file():
            raise UserError(f"{path} line {line}: {file} does not exist (paths are relative to the CSV file's "
                            f"directory, {base})")
        key = str(file)
        if key in listed:
            first_line, first_split = listed[key]
            where = f"in the {first_split} and the {split} split" if first_split != split else f"twice in {split}"
            raise UserError(f"{path}: {file} is listed {where} (lines {first_line} and {line}); every image may appear "
                            f"once: remove one of the lines")
        listed[key] = (line, split)
        entries.append((line, file, name, label, split))
    if not entries:
        raise UserError(f"{path} lists no images")
    train_splits = ("train", "all")
    classes = _class_order(label for _, _, _, label, split in entries if split in train_splits)
    if not classes:
        raise UserError(f"{path} has no training images (split 'train'): only "
                        f"{', '.join(sorted({e[4] for e in entries}))}")
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for line, file, name, label, split in entries:
        if label not in index:
            raise _unseen_label_error(f"{path} line {line}", split, str(file), label, classes)
        items.append(_Item(file, index[label], split, name))
    order = {"train": 0, "all": 0, "val": 1, "test": 2}
    items.sort(key=lambda it: (order[it.split], it.label, it.path))  # the order of the same files as a folder
    has_test = any(it.split == "test" for it in items)
    if "split" in col and not has_test:
        items = [_Item(it.path, it.label, "all" if it.split == "train" else it.split, it.name) for it in items]
    return classes, items, not has_test


def _listing(items: list[_Item]) -> bytes:
    """What fixes a list of files' content without opening an image: names, labels, splits, sizes, mtimes."""
    lines = []
    for it in items:
        st = it.path.stat()
        lines.append(f"{it.path.as_posix()}|{it.label}|{it.split}|{st.st_size}|{st.st_mtime_ns}\n")
    return "".join(lines).encode()


def _carve(sets: dict[str, ImageSet], fraction: float, seed: int, names: list[str]) -> tuple[dict, list[str]]:
    """A stratified test split carved from "all" (seeded by the run's seed, on a stream of its own so that it
    is independent of the validation split drawn later with the same seed)."""
    everything = sets.pop("all")
    keep, held = stratified_split(everything.labels, fraction, seed, stream=1)
    sets["train"], sets["test"] = everything.subset(keep), everything.subset(held)
    return sets, [names[i] for i in held]


def _split_order(items: list[_Item]) -> list[str]:
    return [s for s in ("train", "all", "val", "test") if any(it.split == s for it in items)]


def _load_files(what: str, key: tuple, classes: list[str], items: list[_Item], storage_size: int, workers: int,
                progress: bool) -> Store:
    """Image files decoded into a store (or the store they were decoded into before). Images that all share one
    size keep it; mixed sizes are brought to storage_size x storage_size (shorter side + centre crop)."""
    order = _split_order(items)
    items = [it for s in order for it in items if it.split == s]  # rows in split order
    listing = _listing(items)
    # A store is found from the listing alone: first as "all one size, kept as is", then as "brought to
    # storage_size".
    for size in (None, storage_size):
        path = store_path(decoded_dir(), (*key, size), listing)
        store = open_store(path) if path.is_file() else None
        if store is not None:
            return store
    with progress_bar(len(items), f"reading image sizes ({what})", progress) as bar:
        sizes = set()
        for s in ordered_map(lambda it: image_size(it.path), items, workers, window=64 * max(1, workers)):
            sizes.add(s)
            bar.update()
    size = None if len(sizes) == 1 else storage_size
    w, h = next(iter(sizes)) if size is None else (size, size)
    path = store_path(decoded_dir(), (*key, size), listing)
    seen: dict[str, _Item] = {}

    def decode(it: _Item) -> tuple[np.ndarray, str]:
        try:
            data = it.path.read_bytes()
        except OSError as err:
            raise UserError(f"cannot read image {it.path} ({err.strerror or err}); fix or remove the file") from None
        return decode_bytes(data, size, str(it.path)), hashlib.blake2b(data, digest_size=16).hexdigest()

    with _store_writer(path, len(items), (3, h, w), what) as writer:
        with progress_bar(len(items), f"decoding {what}", progress) as bar:
            decoded = ordered_map(decode, items, workers)
            for s in order:
                writer.begin(s, classes)
                for it in (it for it in items if it.split == s):
                    array, digest = next(decoded)
                    other = seen.setdefault(digest, it)
                    if other.split != it.split:
                        raise UserError(f"{other.path} ({other.split}) and {it.path} ({it.split}) are the same image "
                                        f"(identical bytes): an image in two splits inflates test accuracy; remove "
                                        f"one of them")
                    writer.add_hwc(array, it.label)
                    bar.update()
        writer.finish()
    return Store(path)


def _store_writer(path: Path, n: int, chw: tuple[int, int, int], what: str) -> StoreWriter:
    """A StoreWriter for a new store in the cache (which must be writable and have room for it)."""
    writable_dir(path.parent, "the cache directory (TRANSFERBENCH_CACHE)")
    return StoreWriter(path, n, chw, {"source": what})


def _files_dataset(what: str, key: tuple, loaded: tuple[list[str], list[_Item], bool], storage_size: int,
                   workers: int, progress: bool, test_fraction: float, seed: int) -> Dataset:
    classes, items, carve = loaded
    store = _load_files(what, key, classes, items, storage_size, workers, progress)
    sets = store.split_sets()
    test_files = None
    if carve:
        names = [it.name for s in _split_order(items) for it in items if it.split == s and s == "all"]
        sets, test_files = _carve(sets, test_fraction, seed, names)
    return Dataset(sets["train"], sets["test"], sets.get("val"), test_files=test_files, store=str(store.path))


def load_folder(root: Path, storage_size: int, workers: int, *, progress: bool = True, test_fraction: float = 0.2,
                seed: int = 0) -> Dataset:
    root = root.expanduser()
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist")
    return _files_dataset(str(root), ("folder-v3", root.resolve()), _folder_items(root), storage_size, workers,
                          progress, test_fraction, seed)


def load_csv(path: Path, storage_size: int, workers: int, *, progress: bool = True, test_fraction: float = 0.2,
             seed: int = 0) -> Dataset:
    path = path.expanduser()
    if not path.is_file():
        raise UserError(f"CSV file {path} does not exist")
    return _files_dataset(str(path), ("csv-v1", path.resolve()), _csv_items(path), storage_size, workers, progress,
                          test_fraction, seed)


# ------------------------------------------------------------------------------------ Hugging Face

HF_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise UserError("hf: datasets need the 'datasets' package: pip install 'transferbench[hf]' (or pip install "
                        "datasets)") from None
    return datasets


def _hf_source(text: str) -> tuple[str, str | None, Path | None]:
    """(name, config, local path or None) of an hf: value: NAME[:CONFIG], a directory or a data file."""
    whole = Path(text).expanduser()
    if whole.exists():
        return text, None, whole
    name, sep, config = text.rpartition(":")
    if sep and name and config and "/" not in config:
        local = Path(name).expanduser()
        return name, config, local if local.exists() else None
    return text, None, None


def _looks_local(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or text in (".", "..") or Path(text).suffix.lower() in HF_BUILDERS


@contextmanager
def _hf_progress(datasets, progress: bool):
    was = datasets.is_progress_bar_enabled()
    if was and not progress:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was and not progress:
            datasets.enable_progress_bars()


def _hf_open(text: str, progress: bool) -> dict[str, Any]:
    datasets = _import_datasets()
    name, config, local = _hf_source(text)
    try:
        with _hf_progress(datasets, progress):
            if local is not None and local.is_dir() and ((local / "dataset_dict.json").is_file()
                                                          or (local / "state.json").is_file()):
                loaded = datasets.load_from_disk(str(local))
            elif local is not None and local.is_file():
                builder = HF_BUILDERS.get(local.suffix.lower())
                if builder is None:
                    raise UserError(f"hf:{text}: a data file must be one of {', '.join(HF_BUILDERS)}, or give a "
                                    f"directory (save_to_disk) or a dataset name")
                loaded = datasets.load_dataset(builder, data_files={"train": str(local)})
            else:
                loaded = datasets.load_dataset(str(local) if local is not None else name, config)
    except UserError:
        raise
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0][:300]
        hint = ("" if local is not None else f" Without network access only datasets already in the Hugging Face "
                f"cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}) load; or give a local directory written "
                f"by save_to_disk, or data files.")
        raise UserError(f"hf:{text}: cannot load it ({type(err).__name__}: {first}).{hint}") from None
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    return dict(loaded)


def _hf_splits(text: str, available: dict[str, Any]) -> dict[str, Any]:
    """Our splits from the dataset's: train, validation (validation, valid, val or dev), test."""
    names = list(available)
    out = {}
    if "train" in available:
        out["train"] = available["train"]
    elif len(available) == 1:
        out["train"] = next(iter(available.values()))
    else:
        raise UserError(f"hf:{text} has no 'train' split (it has {', '.join(names)}); train, validation and test "
                        f"splits are taken by those names")
    for candidate in ("validation", "valid", "val", "dev"):
        if candidate in available:
            out["val"] = available[candidate]
            break
    if "test" in available:
        out["test"] = available["test"]
    ignored = [n for n in names if available[n] is not None and not any(available[n] is v for v in out.values())]
    if ignored:
        log.warning(f"hf:{text}: split(s) {', '.join(ignored)} not used (train, validation and test are)")
    return out


def _hf_columns(text: str, features, image_column: str | None, label_column: str | None) -> tuple[str, str]:
    datasets = _import_datasets()
    described = ", ".join(f"{k} ({type(v).__name__})" for k, v in features.items())

    def pick(given: str | None, kind, what: str, option: str) -> str:
        if given is not None:
            if given not in features:
                raise UserError(f"hf:{text}: no column '{given}' ({option}); the columns are {described}."
                                f"{did_you_mean(given, features)}")
            return given
        found = [k for k, v in features.items() if isinstance(v, kind)]
        if len(found) != 1:
            raise UserError(f"hf:{text}: {'no' if not found else 'more than one'} {kind.__name__} column to take as "
                            f"the {what} ({described}); name it with {option}")
        return found[0]

    image = pick(image_column, datasets.Image, "images", "--image-column")
    label = pick(label_column, datasets.ClassLabel, "labels", "--label-column")
    if image == label:
        raise UserError(f"hf:{text}: the image and label columns are both '{image}'")
    return image, label


def _hf_labels(text: str, splits: dict[str, Any], label: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """Class names and each split's labels as indices into them (ClassLabel names, else the sorted values)."""
    datasets = _import_datasets()
    feature = splits["train"].features[label]
    raw = {k: list(ds[label]) for k, ds in splits.items()}
    for key, values in raw.items():
        for row, v in enumerate(values):
            if v is None or (isinstance(feature, datasets.ClassLabel) and v < 0):
                raise UserError(f"hf:{text}: row {row} of the {key} split has no label ({v!r}; unlabelled splits, "
                                f"as some test splits are, cannot be scored): use a split with labels")
    if isinstance(feature, datasets.ClassLabel):
        classes = list(feature.names)
        out = {k: np.asarray(v, dtype=np.int64) for k, v in raw.items()}
        seen = set(out["train"].tolist())
        for key, labels in out.items():
            bad = [i for i, v in enumerate(labels.tolist()) if v not in seen]
            if bad and key != "train":
                raise _unseen_label_error(f"hf:{text}", key, f"hf:{text} {key}[{bad[0]}]", classes[labels[bad[0]]],
                                          [classes[c] for c in sorted(seen)])
        return classes, out
    classes = _class_order(str(v) for v in raw["train"])
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for key, values in raw.items():
        for row, v in enumerate(values):
            if str(v) not in index:
                raise _unseen_label_error(f"hf:{text}", key, f"hf:{text} {key}[{row}]", str(v), classes)
        out[key] = np.asarray([index[str(v)] for v in values], dtype=np.int64)
    return classes, out


def _hf_images(ds, column: str) -> Iterator[tuple[bytes, str]]:
    """(encoded bytes, where) per row, in order, a batch at a time: never the whole column in memory."""
    datasets = _import_datasets()
    raw = ds.select_columns([column]).cast_column(column, datasets.Image(decode=False))
    row = 0
    for batch in raw.iter(batch_size=256):
        for value in batch[column]:
            where = f"row {row}"
            if value is None:
                raise UserError(f"{where} has no image")
            data, path = value.get("bytes"), value.get("path")
            if data is None:
                if not path:
                    raise UserError(f"{where} has no image")
                try:
                    data = Path(path).read_bytes()
                except OSError as err:
                    raise UserError(f"cannot read image {path} ({err.strerror or err})") from None
            yield data, (path or where)
            row += 1


def load_hf(text: str, storage_size: int, workers: int, *, progress: bool = True, test_fraction: float = 0.2,
            seed: int = 0, image_column: str | None = None, label_column: str | None = None) -> Dataset:
    splits = _hf_splits(text, _hf_open(text, progress))
    image, label = _hf_columns(text, splits["train"].features, image_column, label_column)
    classes, labels = _hf_labels(text, splits, label)
    carve = "test" not in splits
    order = [k for k in ("train", "val", "test") if k in splits]
    ident = [(k, getattr(splits[k], "_fingerprint", None), len(splits[k])) for k in order]
    key = ("hf-v1", text, image, label, ident)
    what = f"hf:{text}"

    def rows(k: str) -> Iterator[tuple[bytes, str]]:
        return ((data, f"{what} {k}[{i}] ({where})") for i, (data, where) in enumerate(_hf_images(splits[k], image)))

    store = None
    for size in (None, storage_size):
        path = store_path(decoded_dir(), (*key, size))
        store = open_store(path) if path.is_file() else None
        if store is not None:
            break
    if store is None:
        total = sum(len(splits[k]) for k in order)
        sizes = set()
        with progress_bar(total, f"reading image sizes ({what})", progress) as bar:
            for k in order:
                for s in ordered_map(lambda r: probe_bytes(*r)[0], rows(k), workers, window=64 * max(1, workers)):
                    sizes.add(s)
                    bar.update()
        size = None if len(sizes) == 1 else storage_size
        w, h = next(iter(sizes)) if size is None else (size, size)
        path = store_path(decoded_dir(), (*key, size))
        with _store_writer(path, total, (3, h, w), what) as writer:
            with progress_bar(total, f"decoding {what}", progress) as bar:
                for k in order:
                    writer.begin(k, classes)
                    decoded = ordered_map(lambda r: decode_bytes(r[0], size, r[1]), rows(k), workers)
                    for array, lbl in zip(decoded, labels[k]):
                        writer.add_hwc(array, int(lbl))
                        bar.update()
            writer.finish()
        store = Store(path)
    sets = store.split_sets()
    test_files = None
    if carve:
        sets["all"] = sets.pop("train")
        sets, test_files = _carve(sets, test_fraction, seed, [f"train[{i}]" for i in range(len(sets["all"]))])
    return Dataset(sets["train"], sets["test"], sets.get("val"), test_files=test_files, store=str(store.path))


# ------------------------------------------------------------------------------------------ any kind

def check_dataset(text: str) -> DatasetSpec:
    """A dataset that can be loaded: a known name, or user data that exists. Checked before a run or a
    study starts, without reading any image."""
    spec = DatasetSpec.parse(text)
    if spec.kind == "catalog" and spec.name not in CATALOG:
        raise UserError(f"unknown dataset '{spec.name}'; choose a catalog dataset (`transferbench datasets` lists "
                        f"them: {', '.join(CATALOG)}), or folder:PATH, csv:FILE or hf:NAME."
                        f"{did_you_mean(spec.name, CATALOG)}")
    if spec.kind == "folder" and not spec.path.is_dir():
        raise UserError(f"dataset folder {spec.path} does not exist (relative paths are from the current "
                        f"directory, {Path.cwd()})")
    if spec.kind == "csv" and not spec.path.is_file():
        what = "is a directory, not a CSV file" if spec.path.is_dir() else "does not exist"
        raise UserError(f"CSV file {spec.path} {what} (relative paths are from the current directory, {Path.cwd()})")
    if spec.kind == "hf":
        _import_datasets()
        name, _, local = _hf_source(spec.name)
        if local is None and _looks_local(name):
            raise UserError(f"hf:{spec.name}: {Path(name).expanduser()} does not exist (a local dataset is a directory "
                            f"written by save_to_disk, or data files; relative paths are from {Path.cwd()})")
    return spec


def load_dataset(text: str, data_dir: str | None, *, storage_size: int, workers: int = 4, progress: bool = False,
                 test_fraction: float = 0.2, seed: int = 0, image_column: str | None = None,
                 label_column: str | None = None) -> Dataset:
    """The dataset `text` names (see the module docstring), decoded into (or read back from) its store.

    storage_size: the side images of mixed sizes are stored at. progress: bars on stderr for every download,
    checksum, extraction and decoding pass. test_fraction and seed: the test split carved from data without one
    (pass the run's own, so that evaluate/export carve the same). image_column / label_column: hf: datasets'
    columns, when not found from the features.
    """
    spec = check_dataset(text)
    if spec.kind == "catalog":
        return _load_catalog(spec.name, data_dir, storage_size, workers, progress)
    if spec.kind == "folder":
        return load_folder(spec.path, storage_size, workers, progress=progress, test_fraction=test_fraction,
                           seed=seed)
    if spec.kind == "csv":
        return load_csv(spec.path, storage_size, workers, progress=progress, test_fraction=test_fraction, seed=seed)
    return load_hf(spec.name, storage_size, workers, progress=progress, test_fraction=test_fraction, seed=seed,
                   image_column=image_column, label_column=label_column)


# --------------------------------------------------------------------------------------------- splits

def stratified_split(labels: torch.Tensor, fraction: float, seed: int,
                     stream: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(keep, held_out) indices; held_out takes round(fraction * n_c) of every class, at least one (and never a
    class's last image). stream > 0 draws from a random stream of its own for the same seed."""
    rng = np.random.default_rng([seed, stream] if stream else seed)
    labels = labels.numpy()
    keep, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        held.append(idx[:k])
        keep.append(idx[k:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def per_class(labels: torch.Tensor, k: int, seed: int) -> np.ndarray:
    """Exactly k indices of every class (few-shot), seeded; UserError naming the classes that have fewer."""
    labels_np = labels.numpy()
    rng = np.random.default_rng(seed + 2)
    classes, counts = np.unique(labels_np, return_counts=True)
    short = [int(c) for c, n in zip(classes, counts) if n < k]
    if short:
        raise UserError(f"--shots {k}: classes {short[:10]} have fewer than {k} training images (after the validation "
                        f"split); use fewer shots")
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels_np == c))[:k] for c in classes]))


def stratified_subset(labels: torch.Tensor, n: int, seed: int) -> np.ndarray:
    """n indices with class proportions kept (largest remainder)."""
    labels_np = labels.numpy()
    classes, counts = np.unique(labels_np, return_counts=True)
    if n >= len(labels_np):
        return np.arange(len(labels_np))
    quota = counts * n / counts.sum()
    take = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - take), kind="stable")[: n - take.sum()]:
        take[i] += 1
    rng = np.random.default_rng(seed + 1)
    chosen = [rng.permutation(np.flatnonzero(labels_np == c))[:t] for c, t in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def _check_classes(train: ImageSet, test: ImageSet) -> None:
    """Every class can be learned, validated and tested: a class short of images would make validation
    empty for it (every epoch "selected" on nothing) or score a class the model never saw."""
    classes = train.classes
    if len(classes) < 2:
        raise UserError(f"the dataset has {len(classes)} class ({', '.join(classes)}): classification needs at least "
                        f"2 classes (a one-class test split scores 100% whatever the model does)")
    counts = np.bincount(train.labels.numpy(), minlength=len(classes))
    short = [f"{classes[c]} ({counts[c]})" for c in range(len(classes)) if counts[c] < 2]
    if short:
        raise UserError(f"every class needs at least 2 training images (one for validation, one to train on); "
                        f"too few: {', '.join(short[:10])}" + (" ..." if len(short) > 10 else "")
                        + ". Add images, or remove those classes")
    unseen = sorted({classes[c] for c in test.labels.unique().tolist()} - {classes[c] for c in np.flatnonzero(counts)})
    if unseen:
        raise UserError(f"test images of classes the training split never has: {', '.join(unseen[:10])}")


def make_splits(data: Dataset, *, val_fraction: float, train_subset: int | None, seed: int,
                shots: int | None = None) -> Splits:
    """Train / validation / test. Validation is the dataset's own where it has one, else a stratified
    `val_fraction` of train (seeded); it never depends on --train-subset or --shots, so runs that differ
    only in those select on the same images."""
    train, test = data.train, data.test
    _check_classes(train, test)
    if data.val is not None:
        train_part, val_part = train, data.val
    else:
        keep, held = stratified_split(train.labels, val_fraction, seed)
        train_part, val_part = train.subset(keep), train.subset(held)
    if shots is not None:
        return Splits(train_part.subset(per_class(train_part.labels, shots, seed)), val_part, test)
    if train_subset is not None:
        n_classes = len(train.classes)
        if train_subset > len(train_part):
            raise UserError(f"--train-subset {train_subset} is larger than the training split ({len(train_part)} "
                            f"images after validation)")
        if train_subset < n_classes:
            raise UserError(f"--train-subset {train_subset} is smaller than the number of classes ({n_classes}): "
                            f"some classes would have no training image; use at least {n_classes}")
        train_part = train_part.subset(stratified_subset(train_part.labels, train_subset, seed))
        missing = sorted(set(range(n_classes)) - set(train_part.labels.unique().tolist()))
        if missing:
            raise UserError(f"--train-subset {train_subset} leaves classes {[train.classes[c] for c in missing][:10]} "
                            f"without a training image (they are rare in this dataset); use a larger subset")
    return Splits(train_part, val_part, test)


def concat(a: ImageSet, b: ImageSet) -> ImageSet:
    labels = torch.cat([a.labels, b.labels])
    if isinstance(a.images, DiskImages) and isinstance(b.images, DiskImages) and a.images.store is b.images.store:
        return ImageSet(DiskImages(a.images.store, np.concatenate([a.images.rows, b.images.rows])), labels, a.classes)
    return ImageSet(torch.cat([as_tensor(a.images), as_tensor(b.images)]), labels, a.classes)


def fingerprint(splits: Splits) -> str:
    """What the data of a run is, cheaply: classes, every label of every split, shapes, and a strided
    sample of every image's pixels. A resumed run refuses to continue on other data."""
    h = hashlib.sha256()
    h.update("|".join(splits.classes).encode())
    for part in (splits.train, splits.val, splits.test):
        h.update(f"{tuple(part.images.shape)}".encode())
        h.update(part.labels.numpy().tobytes())
        step = max(1, part.images.shape[-1] // 16)
        for start in range(0, len(part), 256):  # a chunk of rows at a time: a store is never read whole
            h.update(part.images[start:start + 256][..., ::step, ::step].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def batch_indices(n: int, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
                  drop_last: bool = False, rank: int = 0, world_size: int = 1) -> list[torch.Tensor]:
    """Index batches of one epoch. Under DDP every rank gets its own slice of each global batch."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    step = batch_size * world_size
    stop = (n // step) * step if drop_last and n >= step else n
    out = []
    for i in range(0, stop, step):
        global_batch = order[i:i + step]
        local = global_batch[rank::world_size]
        if len(local):
            out.append(local)
    return out


@dataclass
class Batches:
    """A split on the training device: uint8 images (or cached features) plus how to prepare them."""

    data: ImageSet
    prep: Preprocess | None  # None: inputs are already model-ready (cached features)
    device: torch.device

    def __post_init__(self):
        # Small enough datasets live on the accelerator for the whole run: no per-batch copies. Others stay where
        # they are (a store on disk is read batch by batch from the page cache).
        if self.device.type == "cuda" and self.data.images.numel() < 4 << 30:
            self.data = ImageSet(self.data.images.to(self.device), self.data.labels.to(self.device), self.data.classes)

    def __len__(self) -> int:
        return len(self.data)

    def iterate(self, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                generator: torch.Generator | None = None, aug_generator: torch.Generator | None = None,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _, x, y in self.indexed(batch_size, shuffle=shuffle, augment=augment, generator=generator,
                                    aug_generator=aug_generator, drop_last=drop_last):
            yield x, y

    def indexed(self, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                generator: torch.Generator | None = None, aug_generator: torch.Generator | None = None,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(indices into the split, inputs, labels) per batch: this rank's share of every global batch."""
        for idx in batch_indices(len(self.data), batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
                                 rank=distributed.rank(), world_size=distributed.world_size()):
            idx = idx.to(self.data.images.device)
            x = self.data.images[idx].to(self.device, non_blocking=True)
            y = self.data.labels[idx].to(self.device, non_blocking=True)
            yield idx, (self.prep(x, augment, aug_generator) if self.prep else x), y
