"""Datasets: loading each kind (CIFAR, image folders, ...) into uint8 tensors, the splits a run trains,
selects and tests on, and the batches that feed the training device.

Images are decoded once into an (N, 3, H, W) uint8 tensor (see `images`); resizing to the model's
resolution, normalisation and augmentation happen per batch on the device (see `preprocess`).
"""
from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import distributed
from .config import DatasetSpec, cache_dir, default_data_dir
from .errors import UserError, did_you_mean
from .images import IMAGE_EXTENSIONS, ImageSet, decode_file, image_size, load_cached
from .preprocess import Preprocess
from .rundir import atomic_torch_save, file_digest, writable_dir

log = logging.getLogger(__name__)
BUILTIN = ("cifar10", "cifar100")


@dataclass
class Dataset:
    """A dataset as loaded: its official splits (`val` only where the dataset defines one) and the figure
    the literature reports for it."""

    train: ImageSet
    test: ImageSet
    val: ImageSet | None = None
    metric: str = "top1"  # or "mean_per_class_acc" (Pets, Flowers-102, FGVC Aircraft, Caltech-101)
    test_files: list[str] | None = None  # a test split carved here (not the data's own): its files, for the record

    @property
    def classes(self) -> list[str]:
        return self.train.classes


@dataclass
class Splits:
    train: ImageSet
    val: ImageSet
    test: ImageSet

    @property
    def classes(self) -> list[str]:
        return self.test.classes


# ---------------------------------------------------------------------------------------------- CIFAR

def _cifar_class(name: str):
    from torchvision.datasets import CIFAR10, CIFAR100

    return {"cifar10": CIFAR10, "cifar100": CIFAR100}[name]


def _cifar_files(cls) -> list[tuple[str, str]]:
    return [(n, m) for n, m in cls.train_list + cls.test_list] + [(cls.meta["filename"], cls.meta["md5"])]


def ensure_cifar(name: str, root: Path) -> None:
    """Make sure the official python-pickle release is in root, verified by its published md5s.

    Uses torchvision's own constants (URL, archive name, md5s) and downloader.
    """
    cls = _cifar_class(name)
    folder = root / cls.base_folder
    files = _cifar_files(cls)
    present = [(n, m) for n, m in files if (folder / n).is_file()]
    for fname, md5 in present:
        actual = file_digest(folder / fname, "md5")
        if actual != md5:
            raise UserError(
                f"{folder / fname} is corrupt (md5 {actual}, expected {md5}): delete it and run again to "
                f"re-download, or replace it with the file from {cls.url}"
            )
    if len(present) == len(files):
        return
    archive = root / cls.filename
    from torchvision.datasets.utils import download_and_extract_archive, extract_archive

    if archive.is_file():
        actual = file_digest(archive, "md5")
        if actual != cls.tgz_md5:
            raise UserError(f"{archive} is corrupt (md5 {actual}, expected {cls.tgz_md5}): delete it and download it "
                            f"again from {cls.url}")
        extract_archive(str(archive), str(root))
    else:
        try:
            download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
        except Exception as err:  # offline: URLError, socket errors, ...
            missing = [n for n, _ in files if not (folder / n).is_file()]
            raise UserError(
                f"{name} is not in {folder} (missing: {', '.join(missing)}) and could not be downloaded "
                f"({type(err).__name__}: {err}). Offline, download {cls.url} (md5 {cls.tgz_md5}) elsewhere and "
                f"place it at {archive}, or extract it so that {folder / files[0][0]} exists; "
                f"--data-dir or TRANSFERBENCH_DATA choose that directory."
            ) from None
    ensure_cifar(name, root)  # verify what was extracted


def load_cifar(name: str, root: Path) -> tuple[ImageSet, ImageSet]:
    ensure_cifar(name, root)
    cls = _cifar_class(name)
    sets = []
    for train in (True, False):
        ds = cls(str(root), train=train, download=False)
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        sets.append(ImageSet(images, torch.tensor(ds.targets, dtype=torch.long), list(ds.classes)))
    return sets[0], sets[1]


# --------------------------------------------------------------------------------------------- folder

def _list_folder(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class folders and their images, at any depth below each class folder (sub-folders of a class are
    part of it). Files that are not images are named in a warning, never dropped silently."""
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"{split_dir} has no class folders: expected {split_dir}/<class>/<image files>")
    items, skipped = [], []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (split_dir / cls).rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        skipped += [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
        if not images:
            raise UserError(
                f"class folder {split_dir / cls} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                f"add images or remove the folder"
            )
        items.extend((f, label) for f in images)
    if skipped:
        shown = ", ".join(str(p.relative_to(split_dir)) for p in skipped[:5])
        log.warning(f"{split_dir}: skipped {len(skipped)} file(s) that are not images ({', '.join(IMAGE_EXTENSIONS)}):"
                    f" {shown}" + (", ..." if len(skipped) > 5 else ""))
    return classes, items


def _listing(items: list[tuple[Path, int]]) -> bytes:
    """What fixes a folder's content without opening an image: names, labels, byte sizes, mtimes."""
    lines = []
    for path, label in items:
        st = path.stat()
        lines.append(f"{path.as_posix()}|{label}|{st.st_size}|{st.st_mtime_ns}\n")
    return "".join(lines).encode()


def _decoded_cache_file(root: Path, listing: bytes, size: int | None) -> Path:
    key = hashlib.sha256(f"v2|{root.resolve()}|{size}".encode() + listing).hexdigest()[:24]
    return cache_dir() / "decoded" / f"{key}.pt"


def load_folder(root: Path, storage_size: int, workers: int) -> tuple[ImageSet, ImageSet]:
    """PATH/train/<class>/* and PATH/test/<class>/*; decoded tensors are cached on disk.

    Images that all share one size are kept at that size; mixed sizes are brought to
    storage_size x storage_size (shorter side + centre crop) so they stack into one tensor.
    """
    root = root.expanduser()
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist")
    listings = {}
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise UserError(f"dataset folder {root} has no '{split}/' directory: expected {root}/train/<class>/ and "
                            f"{root}/test/<class>/")
        listings[split] = _list_folder(root / split)
    (train_classes, train_items), (test_classes, test_items) = listings["train"], listings["test"]
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise UserError(
            f"class folders of {root}/train and {root}/test differ: only in train: {only_train or 'none'}; "
            f"only in test: {only_test or 'none'}"
        )
    all_items = train_items + test_items
    # A cached decode is found from the listing alone: first as "all one size, kept as is", then as
    # "brought to storage_size".
    listing = _listing(all_items)
    cached = [f for f in (_decoded_cache_file(root, listing, s) for s in (None, storage_size)) if f.is_file()]
    images = load_cached(cached[0], "images", len(all_items)) if cached else None
    if images is None:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            sizes = set(pool.map(lambda it: image_size(it[0]), all_items))
            size = None if len(sizes) == 1 else storage_size
            decoded = list(pool.map(lambda it: decode_file(it[0], size), all_items))
        images = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).contiguous()
        path = _decoded_cache_file(root, listing, size)
        writable_dir(path.parent, "the cache directory (TRANSFERBENCH_CACHE)")
        atomic_torch_save({"images": images}, path)
    labels = torch.tensor([lbl for _, lbl in all_items], dtype=torch.long)
    n = len(train_items)
    return (ImageSet(images[:n], labels[:n], train_classes), ImageSet(images[n:], labels[n:], test_classes))


def check_dataset(text: str) -> DatasetSpec:
    """A dataset that can be loaded: a known name, or user data that exists. Checked before a run or a
    study starts, without reading any image."""
    spec = DatasetSpec.parse(text)
    if spec.kind == "catalog" and spec.name not in BUILTIN:
        raise UserError(f"unknown dataset '{spec.name}'; choose {', '.join(BUILTIN)} or folder:PATH."
                        f"{did_you_mean(spec.name, BUILTIN)}")
    if spec.kind == "folder" and not spec.path.is_dir():
        raise UserError(f"dataset folder {spec.path} does not exist (relative paths are from the current "
                        f"directory, {Path.cwd()})")
    return spec


def load_dataset(text: str, data_dir: str | None, *, storage_size: int, workers: int) -> Dataset:
    spec = check_dataset(text)
    if spec.kind == "folder":
        return Dataset(*load_folder(spec.path, storage_size, workers))
    return Dataset(*load_cifar(spec.name, Path(data_dir).expanduser() if data_dir else default_data_dir()))


# --------------------------------------------------------------------------------------------- splits

def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(keep, held_out) indices; held_out takes round(fraction * n_c) of every class, at least one."""
    rng = np.random.default_rng(seed)
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
    return ImageSet(torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]), a.classes)


def fingerprint(splits: Splits) -> str:
    """What the data of a run is, cheaply: classes, every label of every split, shapes, and a strided
    sample of every image's pixels. A resumed run refuses to continue on other data."""
    h = hashlib.sha256()
    h.update("|".join(splits.classes).encode())
    for part in (splits.train, splits.val, splits.test):
        h.update(f"{tuple(part.images.shape)}".encode())
        h.update(part.labels.numpy().tobytes())
        step = max(1, part.images.shape[-1] // 16)
        h.update(part.images[..., ::step, ::step].contiguous().numpy().tobytes())
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
        # Small enough datasets live on the accelerator for the whole run: no per-batch copies.
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
