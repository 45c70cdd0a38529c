"""The transfer suite of the literature as one-word dataset names, with their official splits.

This module owns the catalog: which datasets there are (CATALOG), how many classes and images each split has
as published, which split serves as validation, which metric the literature reports (Kornblith et al. 2019:
mean per-class accuracy for Pets, Flowers-102, FGVC Aircraft and Caltech-101, top-1 elsewhere), where
torchvision expects each dataset's files under a data directory, and turning a dataset into uint8 ImageSets:
in memory, or streamed into a decoded store on disk (`cache`) that later loads open without decoding.

torchvision's own dataset classes do the downloading, the checksums and the parsing of every format; this
module asks them for (image, label) pairs, with a `loader` that returns the path where the class takes one,
so that decoding happens here, once, on a thread pool (image_array: grayscale/16-bit/EXIF to upright RGB),
image by image into the store. Two exceptions, both documented where they happen: PCam's HDF5 arrays are read
in blocks (torchvision opens the files once per image), and Caltech-101's BACKGROUND_Google folder, which
torchvision drops, is listed here. Three datasets come without a split and get a documented, seeded one: see
the *_PROTOCOL texts (SUN397's is drawn before decoding, so the images it leaves out are never decoded).
Downloads, md5 checks and archive extraction (torchvision's) show progress bars (see torchvision_progress).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tarfile
import threading
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import UserError, did_you_mean
from .images import ImageSet, StoreWriter, image_array, open_store, ordered_map, progress_bar, store_path
from .rundir import writable_dir

TOP1 = "top1"
MEAN_PER_CLASS = "mean_per_class_acc"

# What torchvision raises when files are missing, truncated or not the expected ones: URLError and socket
# errors are OSErrors; RuntimeError is "Dataset not found or corrupted" and failed md5s; the others come
# from parsing a damaged annotation file or archive (MNIST's idx reader checks its header with assert).
READ_ERRORS = (OSError, RuntimeError, ValueError, KeyError, IndexError, EOFError, AssertionError,
               tarfile.TarError, zipfile.BadZipFile)


@dataclass(frozen=True)
class DerivedSplit:
    """A seeded train/test split for a dataset published without one, drawn class by class in label order
    from the images sorted by path, so the same files always give the same split."""

    train_per_class: int | None = None  # this many images of every class for training ...
    test_per_class: int | None = None  # ... and this many for test (None: all the others)
    test_fraction: float | None = None  # or: this fraction of every class for test, the others for training
    seed: int = 0


@dataclass(frozen=True)
class Entry:
    """One catalog dataset. Split sizes are the published ones (for a DerivedSplit: what it yields on the
    full release); `splits` says how torchvision builds each split: (our key, the class's keyword args)."""

    name: str
    title: str
    torchvision_class: str  # torchvision.datasets.<this>
    num_classes: int
    train_size: int
    val_size: int | None
    test_size: int
    has_val: bool  # an official validation split exists and load_catalog returns it as "val"
    metric: str  # TOP1 or MEAN_PER_CLASS
    homepage: str
    splits: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]
    protocol: str  # the split protocol, in words
    native_size: int | None = None  # every image has this size and keeps it; None: mixed sizes -> storage_size
    derived: DerivedSplit | None = None
    requires: tuple[str, ...] = ()  # modules torchvision needs for this dataset's files
    fmt: str = "files"  # how images come out of the torchvision object (see _LOADERS)
    downloadable: bool = True

    def __post_init__(self):
        if self.has_val != (self.val_size is not None) or self.has_val != any(k == "val" for k, _ in self.splits):
            raise ValueError(f"catalog entry {self.name}: has_val, val_size and splits disagree")
        if self.metric not in (TOP1, MEAN_PER_CLASS):
            raise ValueError(f"catalog entry {self.name}: unknown metric {self.metric}")

    @property
    def split_sizes(self) -> dict[str, int | None]:
        return {"train": self.train_size, "val": self.val_size, "test": self.test_size}

    def split_args(self, key: str) -> dict[str, Any]:
        return dict(dict(self.splits)[key])

    @property
    def url(self) -> str:
        """The (first) download URL from torchvision's constants; the homepage where torchvision has none."""
        downloads = _layout(self).downloads
        return downloads[0].url if downloads else self.homepage


def _kw(**kwargs: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(kwargs.items())


def _tv(train: dict, test: dict, val: dict | None = None) -> tuple:
    splits = [("train", _kw(**train))] + ([("val", _kw(**val))] if val is not None else []) + [("test", _kw(**test))]
    return tuple(splits)


_BOOL_SPLITS = _tv({"train": True}, {"train": False})
_STR_SPLITS = _tv({"split": "train"}, {"split": "test"})
_TVT_SPLITS = _tv({"split": "train"}, {"split": "test"}, {"split": "val"})
_ONE_SET = (("all", ()),)  # torchvision has no split: one object, split here by Entry.derived

# The split protocols chosen where a dataset has no official split; their sizes are those of the full release.
CALTECH101_PROTOCOL = (
    "30 training images per class drawn with seed 0, all the others for test (the classic Fei-Fei protocol, "
    "as in Kornblith et al. 2019 and TFDS/VTAB: 3,060 / 6,084). BACKGROUND_Google is kept as a 102nd class "
    "like theirs, although torchvision's Caltech101 drops it, so that numbers compare with the literature."
)
SUN397_PROTOCOL = (
    "50 training and 50 test images per class drawn with seed 0 (19,850 / 19,850): the size of the official "
    "partitions that Kornblith et al. 2019 use (their first of ten), not their exact images, which torchvision "
    "does not ship (Partitions.zip on the SUN site); the other images are not used."
)
EUROSAT_PROTOCOL = (
    "20% of every class for test, the rest for training, drawn with seed 0 (21,600 / 5,400: VTAB's "
    "test size; its train+val). torchvision's EuroSAT is one unsplit folder."
)

CATALOG: dict[str, Entry] = {e.name: e for e in (
    Entry("cifar10", "CIFAR-10", "CIFAR10", 10, 50_000, None, 10_000, False, TOP1,
          "https://www.cs.toronto.edu/~kriz/cifar.html", _BOOL_SPLITS, "official train/test",
          native_size=32, fmt="cifar"),
    Entry("cifar100", "CIFAR-100", "CIFAR100", 100, 50_000, None, 10_000, False, TOP1,
          "https://www.cs.toronto.edu/~kriz/cifar.html", _BOOL_SPLITS, "official train/test (fine labels)",
          native_size=32, fmt="cifar"),
    Entry("svhn", "SVHN", "SVHN", 10, 73_257, None, 26_032, False, TOP1,
          "http://ufldl.stanford.edu/housenumbers/", _STR_SPLITS,
          "official train/test (cropped digits); the 531,131 'extra' images are not used",
          native_size=32, requires=("scipy",), fmt="svhn"),
    Entry("stl10", "STL-10", "STL10", 10, 5_000, None, 8_000, False, TOP1,
          "https://cs.stanford.edu/~acoates/stl10/", _STR_SPLITS,
          "official train (all 5,000, not the 10 folds)/test; the unlabeled images are not used",
          native_size=96, fmt="stl10"),
    Entry("flowers102", "Oxford Flowers-102", "Flowers102", 102, 1_020, 1_020, 6_149, True, MEAN_PER_CLASS,
          "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
          _tv({"split": "train"}, {"split": "test"}, {"split": "val"}), "official train/val/test (setid.mat)",
          requires=("scipy",)),
    Entry("oxford_pets", "Oxford-IIIT Pets", "OxfordIIITPet", 37, 3_680, None, 3_669, False, MEAN_PER_CLASS,
          "https://www.robots.ox.ac.uk/~vgg/data/pets/", _tv({"split": "trainval"}, {"split": "test"}),
          "official trainval/test", fmt="items"),
    Entry("dtd", "DTD", "DTD", 47, 1_880, 1_880, 1_880, True, TOP1,
          "https://www.robots.ox.ac.uk/~vgg/data/dtd/",
          _tv({"split": "train", "partition": 1}, {"split": "test", "partition": 1},
              {"split": "val", "partition": 1}), "official train/val/test, partition 1 of 10"),
    Entry("fgvc_aircraft", "FGVC Aircraft", "FGVCAircraft", 100, 3_334, 3_333, 3_333, True, MEAN_PER_CLASS,
          "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/",
          _tv({"split": "train", "annotation_level": "variant"}, {"split": "test", "annotation_level": "variant"},
              {"split": "val", "annotation_level": "variant"}), "official train/val/test, 100 variants"),
    Entry("food101", "Food-101", "Food101", 101, 75_750, None, 25_250, False, TOP1,
          "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/", _STR_SPLITS, "official train/test"),
    Entry("caltech101", "Caltech-101", "Caltech101", 102, 3_060, None, 6_084, False, MEAN_PER_CLASS,
          "https://data.caltech.edu/records/20086", _ONE_SET, CALTECH101_PROTOCOL,
          derived=DerivedSplit(train_per_class=30), fmt="caltech101"),
    Entry("eurosat", "EuroSAT", "EuroSAT", 10, 21_600, None, 5_400, False, TOP1,
          "https://github.com/phelber/eurosat", _ONE_SET, EUROSAT_PROTOCOL,
          native_size=64, derived=DerivedSplit(test_fraction=0.2)),
    Entry("gtsrb", "GTSRB", "GTSRB", 43, 26_640, None, 12_630, False, TOP1,
          "https://benchmark.ini.rub.de/", _STR_SPLITS, "official train/test (images of mixed sizes)",
          fmt="items"),
    Entry("sun397", "SUN397", "SUN397", 397, 19_850, None, 19_850, False, TOP1,
          "https://vision.princeton.edu/projects/2010/SUN/", _ONE_SET, SUN397_PROTOCOL,
          derived=DerivedSplit(train_per_class=50, test_per_class=50)),
    Entry("stanford_cars", "Stanford Cars", "StanfordCars", 196, 8_144, None, 8_041, False, TOP1,
          "https://ai.stanford.edu/~jkrause/cars/car_dataset.html", _STR_SPLITS, "official train/test",
          requires=("scipy",), downloadable=False),
    Entry("country211", "Country211", "Country211", 211, 31_650, 10_550, 21_100, True, TOP1,
          "https://github.com/openai/CLIP/blob/main/data/country211.md",
          _tv({"split": "train"}, {"split": "test"}, {"split": "valid"}), "official train/valid/test"),
    Entry("pcam", "PatchCamelyon", "PCAM", 2, 262_144, 32_768, 32_768, True, TOP1,
          "https://github.com/basveeling/pcam", _TVT_SPLITS, "official train/valid/test",
          native_size=96, requires=("h5py",), fmt="pcam"),
    Entry("fashion_mnist", "Fashion-MNIST", "FashionMNIST", 10, 60_000, None, 10_000, False, TOP1,
          "https://github.com/zalandoresearch/fashion-mnist", _BOOL_SPLITS, "official train/test",
          native_size=28, fmt="mnist"),
    Entry("mnist", "MNIST", "MNIST", 10, 60_000, None, 10_000, False, TOP1,
          "http://yann.lecun.com/exdb/mnist/", _BOOL_SPLITS, "official train/test", native_size=28, fmt="mnist"),
)}

# Class names torchvision does not provide. GTSRB: the official sign names, by ClassId.
GTSRB_CLASSES = [
    "Speed limit (20km/h)", "Speed limit (30km/h)", "Speed limit (50km/h)", "Speed limit (60km/h)",
    "Speed limit (70km/h)", "Speed limit (80km/h)", "End of speed limit (80km/h)", "Speed limit (100km/h)",
    "Speed limit (120km/h)", "No passing", "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection", "Priority road", "Yield", "Stop", "No vehicles",
    "Vehicles over 3.5 metric tons prohibited", "No entry", "General caution", "Dangerous curve to the left",
    "Dangerous curve to the right", "Double curve", "Bumpy road", "Slippery road", "Road narrows on the right",
    "Road work", "Traffic signals", "Pedestrians", "Children crossing", "Bicycles crossing",
    "Beware of ice/snow", "Wild animals crossing", "End of all speed and passing limits", "Turn right ahead",
    "Turn left ahead", "Ahead only", "Go straight or right", "Go straight or left", "Keep right", "Keep left",
    "Roundabout mandatory", "End of no passing", "End of no passing by vehicles over 3.5 metric tons",
]
SVHN_CLASSES = [str(d) for d in range(10)]  # torchvision maps the release's label 10 to digit 0
PCAM_CLASSES = ["no metastatic tissue", "metastatic tissue"]  # label 1: tumour in the patch's centre 32x32
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
CALTECH101_BACKGROUND = "BACKGROUND_Google"

# Download constants torchvision keeps inside a method instead of on the class; tests check that torchvision's
# source still holds them.
CALTECH101_DOWNLOAD = ("https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",
                       "3138e1922a9193bfa496528edbbc45d0")
EUROSAT_DOWNLOAD = ("https://huggingface.co/datasets/torchgeo/eurosat/resolve/"
                    "c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip", "c8fa014336c82ac7804f0398fcb19387")
GTSRB_BASE_URL = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"
GTSRB_DOWNLOADS = (("GTSRB-Training_fixed.zip", "513f3c79a4c5141765e10e952eaa2478"),
                   ("GTSRB_Final_Test_Images.zip", "c7e4e6327067d32654124b0fe9e82185"),
                   ("GTSRB_Final_Test_GT.zip", "fe31e9c9270bbcd7b84b7f21a9d9d9e5"))


def get_entry(name: str) -> Entry:
    if name not in CATALOG:
        raise UserError(f"unknown dataset '{name}'; the catalog has {', '.join(CATALOG)}.{did_you_mean(name, CATALOG)}")
    return CATALOG[name]


def describe() -> list[dict]:
    """One row per catalog dataset, for `transferbench datasets`."""
    return [{"name": e.name, "title": e.title, "classes": e.num_classes, "train": e.train_size, "val": e.val_size,
             "test": e.test_size, "metric": e.metric, "url": e.url, "protocol": e.protocol} for e in CATALOG.values()]


# ------------------------------------------------------------------------------------ where files go

@dataclass(frozen=True)
class Download:
    path: str  # where torchvision looks for the downloaded file, relative to the data directory
    url: str
    md5: str | None


@dataclass(frozen=True)
class Layout:
    """What torchvision checks for under the data directory, and what it downloads to get there."""

    expected: tuple[str, ...]  # relative paths that must exist (files or folders)
    downloads: tuple[Download, ...]
    verified: tuple[tuple[str, str], ...] = ()  # (path, md5) that torchvision checks each time it loads
    note: str = ""
    as_downloaded: bool = True  # a download put at its path is used as is (torchvision finds it and extracts it)


def _tv_class(entry: Entry):
    import torchvision.datasets

    return getattr(torchvision.datasets, entry.torchvision_class)


def _basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _layout(entry: Entry) -> Layout:
    cls = _tv_class(entry)
    name = entry.name
    if entry.fmt == "cifar":
        files = [(f, m) for f, m in cls.train_list + cls.test_list] + [(cls.meta["filename"], cls.meta["md5"])]
        return Layout(tuple(f"{cls.base_folder}/{f}" for f, _ in files),
                      (Download(cls.filename, cls.url, cls.tgz_md5),),
                      tuple((f"{cls.base_folder}/{f}", m) for f, m in files))
    if entry.fmt == "mnist":
        raw = f"{cls.__name__}/raw"
        return Layout(tuple(f"{raw}/{Path(f).stem}" for f, _ in cls.resources),
                      tuple(Download(f"{raw}/{f}", cls.mirrors[0] + f, m) for f, m in cls.resources))
    if name == "svhn":
        parts = [cls.split_list[s] for s in ("train", "test")]
        return Layout(tuple(f for _, f, _ in parts), tuple(Download(f, u, m) for u, f, m in parts),
                      tuple((f, m) for _, f, m in parts))
    if name == "stl10":
        files = cls.train_list + cls.test_list
        return Layout(tuple(f"{cls.base_folder}/{f}" for f, _ in files),
                      (Download(cls.filename, cls.url, cls.tgz_md5),),
                      tuple((f"{cls.base_folder}/{f}", m) for f, m in files))
    if name == "flowers102":
        files = [cls._file_dict[k] for k in ("image", "label", "setid")]
        return Layout(("flowers-102/jpg",) + tuple(f"flowers-102/{f}" for f, _ in files[1:]),
                      tuple(Download(f"flowers-102/{f}", cls._download_url_prefix + f, m) for f, m in files),
                      tuple((f"flowers-102/{f}", m) for f, m in files[1:]))
    if name == "oxford_pets":
        return Layout(("oxford-iiit-pet/images", "oxford-iiit-pet/annotations"),
                      tuple(Download(f"oxford-iiit-pet/{_basename(u)}", u, m) for u, m in cls._RESOURCES))
    if name == "dtd":
        return Layout(("dtd/dtd/images", "dtd/dtd/labels"),
                      (Download(f"dtd/{_basename(cls._URL)}", cls._URL, cls._MD5),))
    if name == "fgvc_aircraft":
        return Layout(("fgvc-aircraft-2013b/data",), (Download(_basename(cls._URL), cls._URL, None),))
    if name == "food101":
        return Layout(("food-101/meta", "food-101/images"), (Download(_basename(cls._URL), cls._URL, cls._MD5),))
    if name == "caltech101":
        url, md5 = CALTECH101_DOWNLOAD
        return Layout((f"caltech101/101_ObjectCategories/{CALTECH101_BACKGROUND}",),
                      (Download(f"caltech101/{_basename(url)}", url, md5),))
    if name == "eurosat":
        url, md5 = EUROSAT_DOWNLOAD
        return Layout(("eurosat/2750",), (Download(f"eurosat/{_basename(url)}", url, md5),))
    if name == "gtsrb":
        return Layout(("gtsrb/GTSRB/Training", "gtsrb/GTSRB/Final_Test/Images", "gtsrb/GT-final_test.csv"),
                      tuple(Download(f"gtsrb/{f}", GTSRB_BASE_URL + f, m) for f, m in GTSRB_DOWNLOADS))
    if name == "sun397":
        return Layout(("SUN397/ClassName.txt",),
                      (Download(_basename(cls._DATASET_URL), cls._DATASET_URL, cls._DATASET_MD5),))
    if name == "stanford_cars":
        return Layout(("stanford_cars/devkit/cars_meta.mat", "stanford_cars/devkit/cars_train_annos.mat",
                       "stanford_cars/cars_train", "stanford_cars/cars_test_annos_withlabels.mat",
                       "stanford_cars/cars_test"), (),
                      note=f"Its original URL ({entry.homepage}) is gone (pytorch/vision#7545): get cars_train/, "
                           f"cars_test/, the devkit (car_devkit.tgz) and cars_test_annos_withlabels.mat from a "
                           f"mirror and arrange them as listed")
    if name == "country211":
        return Layout(tuple(f"country211/{s}" for s in ("train", "valid", "test")),
                      (Download(_basename(cls._URL), cls._URL, cls._MD5),))
    if name == "pcam":
        files = [f for split in ("train", "val", "test") for f in cls._FILES[split].values()]
        return Layout(tuple(f"pcam/{f}" for f, _, _ in files),
                      tuple(Download(f"pcam/{f}", f"https://drive.google.com/file/d/{gid}", m) for f, gid, m in files),
                      note="The PCam files are gzipped on Google Drive (torchvision needs gdown to fetch them; "
                           "the md5s are of the .gz files): gunzip each one to the .h5 path shown",
                      as_downloaded=False)
    raise AssertionError(f"no layout for {name}")


def _missing(entry: Entry, root: Path) -> list[str]:
    return [p for p in _layout(entry).expected if not (root / p).exists()]


def present(name: str, root: Path) -> bool:
    """Whether the dataset's files are where torchvision looks for them under root (nothing is downloaded)."""
    return not _missing(get_entry(name), Path(root).expanduser())


def _missing_message(entry: Entry, root: Path, error: BaseException | None) -> str:
    layout = _layout(entry)
    missing = _missing(entry, root)
    # Without downloads to list (Stanford Cars) the missing paths are the instructions: show them all.
    limit = 3 if layout.downloads else len(missing)
    shown = ", ".join(str(root / p) for p in missing[:limit])
    shown += f" and {len(missing) - limit} more" if len(missing) > limit else ""
    if error is not None:
        why = f"could not be downloaded ({type(error).__name__}: {_short(error)})"
    elif not entry.downloadable:
        why = "torchvision cannot download it"  # the layout's note says why and what to do
    else:
        why = "downloading is off"
    parts = [f"{entry.title} ({entry.name}) is not in {root} (missing {shown}) and {why}."]
    if layout.downloads:
        files = []
        for d in layout.downloads:
            there = " (already there: if it is incomplete or corrupt, delete it)" if (root / d.path).is_file() else ""
            checksum = f"md5 {d.md5}" if d.md5 else "torchvision declares no md5"
            files.append(f"{d.url} ({checksum}) at {root / d.path}{there}")
        parts.append("Offline, download elsewhere and put " + "; ".join(files) +
                     (" - the next run takes them from there without network access." if layout.as_downloaded else "."))
    if layout.note:
        parts.append(layout.note + ".")
    parts.append(f"--data-dir (or TRANSFERBENCH_DATA) chooses the data directory: point it at the directory that "
                 f"holds {layout.expected[0]} if the data is elsewhere.")
    return " ".join(parts)


def _corrupt_message(entry: Entry, root: Path, error: BaseException) -> str:
    from torchvision.datasets.utils import calculate_md5

    layout = _layout(entry)
    # torchvision's "Dataset not found or corrupted" does not say which file: name the ones whose md5 is off.
    wrong = []
    for path, md5 in layout.verified:
        if (root / path).is_file() and (actual := calculate_md5(root / path)) != md5:
            wrong.append(f"{root / path} has md5 {actual}, expected {md5}")
    tops = ", ".join(sorted({str(root / Path(p).parts[0]) for p in layout.expected}))
    fix = (f"Delete {tops} and run again to download it afresh, or replace the files from {entry.url}"
           if entry.downloadable else f"Replace the files in {tops} ({layout.note})")
    return (f"{entry.title} ({entry.name}) in {root} could not be read ({type(error).__name__}: {_short(error)}): "
            f"its files are there but incomplete, corrupt or not the release torchvision expects"
            f"{' (' + '; '.join(wrong) + ')' if wrong else ''}. {fix}.")


def _short(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())  # torchvision's messages span lines; a UserError is one line
    return text if len(text) <= limit else text[:limit] + "..."


# ----------------------------------------------------------------------------------------- loading

def _module_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def ensure(name: str, root: Path, *, download: bool = True, progress: bool = True) -> None:
    """Make the dataset's files present under root, as torchvision expects them: downloaded, md5-checked and
    extracted by torchvision's own code (with progress bars) when missing and download is on. A download
    already at its path with the wrong md5 is named and never extracted. Files that are there are left alone."""
    entry = get_entry(name)
    root = Path(root).expanduser()
    there = present(name, root)
    if not there and not (download and entry.downloadable):
        raise UserError(_missing_message(entry, root, None))
    for module in entry.requires:  # before a download: torchvision would fetch the files, then fail to read them
        if not _module_available(module):
            raise UserError(f"{entry.title} needs the '{module}' package to read its files: pip install {module}")
    if there:
        return
    _check_downloads(entry, root, progress)
    size = entry.native_size or 8
    try:
        with torchvision_progress(progress, entry.name):
            for key, _ in entry.splits:
                _make(entry, root, key, download=True, size=size)
    except READ_ERRORS as err:
        if not present(name, root):
            raise UserError(_missing_message(entry, root, err)) from None
        raise UserError(_corrupt_message(entry, root, err)) from None


def _check_downloads(entry: Entry, root: Path, progress: bool) -> None:
    """An archive put where torchvision looks for it is used offline; one with the wrong md5 would be downloaded
    again (offline: an unhelpful failure) or, by some classes, extracted as is. Name it instead."""
    layout = _layout(entry)
    if not layout.as_downloaded:
        return
    for d in layout.downloads:
        path = root / d.path
        if d.md5 and path.is_file():
            actual = file_md5(path, progress)
            if actual != d.md5:
                raise UserError(f"{path} is corrupt (md5 {actual}, expected {d.md5}): delete it and run again to "
                                f"download it afresh, or replace it with the file from {d.url}")


def file_md5(path: Path, progress: bool = False) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f, progress_bar(os.fstat(f.fileno()).st_size, f"checksum {Path(path).name}", progress,
                                             unit="B", unit_scale=True) as bar:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


_PATCH_LOCK = threading.Lock()


@contextmanager
def torchvision_progress(progress: bool, name: str):
    """Progress bars for what torchvision does on its own: its download bar (which it always shows, on stderr)
    follows `progress`, and its md5 checks and archive extractions, which have none, get one. Done by swapping
    torchvision.datasets.utils' module-level helpers for the duration of the call, then restoring them."""
    import torchvision.datasets.utils as tvu
    from tqdm import tqdm

    def download_bar(*args, **kwargs):
        kwargs.setdefault("desc", f"downloading {name}")
        return tqdm(*args, disable=not progress, file=sys.stderr, leave=False, dynamic_ncols=True, **kwargs)

    def md5(fpath, chunk_size: int = 1 << 20) -> str:
        return file_md5(Path(fpath), progress)

    def extract_tar(from_path, to_path, compression) -> None:
        with open(from_path, "rb") as raw, progress_bar(os.fstat(raw.fileno()).st_size,
                                                        f"extracting {Path(from_path).name}", progress, unit="B",
                                                        unit_scale=True) as bar:
            with tarfile.open(fileobj=raw, mode=f"r|{compression[1:]}" if compression else "r|") as tar:
                for member in tar:
                    if hasattr(tarfile, "data_filter"):
                        tar.extract(member, to_path, filter="data")
                    else:  # Python < 3.11.4: what torchvision itself does
                        tar.extract(member, to_path)
                    bar.update(raw.tell() - bar.n)

    def extract_zip(from_path, to_path, compression) -> None:
        with zipfile.ZipFile(from_path) as archive:
            members = archive.infolist()
            with progress_bar(sum(m.compress_size for m in members), f"extracting {Path(from_path).name}", progress,
                              unit="B", unit_scale=True) as bar:
                for member in members:
                    archive.extract(member, to_path)
                    bar.update(member.compress_size)

    with _PATCH_LOCK:
        saved = tvu.tqdm, tvu.calculate_md5, dict(tvu._ARCHIVE_EXTRACTORS)
        tvu.tqdm, tvu.calculate_md5 = download_bar, md5
        tvu._ARCHIVE_EXTRACTORS.update({".tar": extract_tar, ".zip": extract_zip})
        try:
            yield
        finally:
            tvu.tqdm, tvu.calculate_md5 = saved[0], saved[1]
            tvu._ARCHIVE_EXTRACTORS.clear()
            tvu._ARCHIVE_EXTRACTORS.update(saved[2])


def listing(name: str, root: Path) -> bytes:
    """What fixes the dataset's files without reading them: every file under the folders (or the files)
    torchvision reads, with its size and modification time."""
    entry = get_entry(name)
    root = Path(root).expanduser()
    lines = []
    for top in sorted({Path(p).parts[0] for p in _layout(entry).expected}):
        path = root / top
        files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
        for f in files:
            st = f.stat()
            lines.append(f"{f.relative_to(root).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n")
    return "".join(lines).encode()


def load_catalog(name: str, root: Path, *, storage_size: int, download: bool = True, progress: bool = True,
                 workers: int = 4, cache: Path | None = None) -> dict[str, ImageSet]:
    """The dataset's official splits as uint8 ImageSets: "train", "test", and "val" when the entry has_val.

    Images that all share one size (entry.native_size) keep it; mixed sizes are brought to storage_size
    (shorter side, then centre crop). Files are downloaded by torchvision when missing and download is on;
    when they are there nothing touches the network.

    Without `cache` the images are decoded into memory. With it (a directory), they are streamed into a store
    file there, keyed by the dataset, its entry, the storage size and the listing of its files, and read back
    batch by batch (images.DiskImages); a later call with the same files opens that store without decoding.
    """
    entry = get_entry(name)
    root = Path(root).expanduser()
    if not isinstance(storage_size, int) or storage_size < 1:
        raise UserError(f"storage size must be a positive number of pixels, not {storage_size!r}")
    size = entry.native_size or storage_size

    def cached() -> Path:
        return store_path(Path(cache), ("catalog-v1", entry, root.resolve(), size), listing(name, root))

    if cache is not None and present(name, root) and (path := cached()).is_file():
        store = open_store(path)
        if store is not None:  # decoded before from the same files: torchvision is not even asked
            return _finished(entry, root, store.split_sets())
    ensure(name, root, download=download, progress=progress)
    path = None
    if cache is not None:
        path = cached()  # the files as they are now (perhaps just downloaded)
        writable_dir(path.parent, "the cache directory (TRANSFERBENCH_CACHE)")
    try:
        with torchvision_progress(progress, entry.name):
            objects = {key: _make(entry, root, key, download=False, size=size) for key, _ in entry.splits}
            parts = _LOADERS[entry.fmt](entry, root, objects, size, progress, workers)
            with StoreWriter(path, sum(p.n for p in parts.values()), (3, size, size), {"dataset": name}) as writer:
                for key, part in parts.items():
                    writer.begin(key, part.classes)
                    part.fill(writer)
                sets = writer.finish()
    except READ_ERRORS as err:
        if not present(name, root):
            raise UserError(_missing_message(entry, root, err)) from None
        raise UserError(_corrupt_message(entry, root, err)) from None
    return _finished(entry, root, sets)


def _finished(entry: Entry, root: Path, sets: dict[str, ImageSet]) -> dict[str, ImageSet]:
    if "all" in sets:  # a dataset without an official split, stored whole: split here, rows only
        sets = _apply_derived(entry, sets.pop("all"), root)
    return _checked(entry, root, sets)


def _make(entry: Entry, root: Path, key: str, *, download: bool, size: int):
    """torchvision's object for one split. Classes that take a `loader` get one returning the path, so
    nothing is decoded here; the others get a transform that decodes to storage size."""
    kwargs = entry.split_args(key)
    if entry.fmt == "files":
        kwargs["loader"] = Path
    elif entry.fmt in ("items", "caltech101"):
        kwargs["transform"] = partial(image_array, size=size)
    return _tv_class(entry)(str(root), download=download, **kwargs)


def _checked(entry: Entry, root: Path, sets: dict[str, ImageSet]) -> dict[str, ImageSet]:
    order = ["train", "val", "test"] if entry.has_val else ["train", "test"]
    sets = {k: sets[k] for k in order}
    classes = sets["train"].classes
    for key, s in sets.items():
        # DTD, Pets and Food-101 derive the class list from each split's own annotation file.
        if s.classes != classes:
            raise UserError(f"{entry.title} in {root}: the {key} split's classes differ from the train split's "
                            f"({len(s.classes)} vs {len(classes)}); the annotation files are incomplete: delete the "
                            f"dataset's folder and download it again")
        if len(s) == 0:
            raise UserError(f"{entry.title} in {root}: the {key} split has no images; the annotation files are "
                            f"incomplete: delete the dataset's folder and download it again")
        if int(s.labels.min()) < 0 or int(s.labels.max()) >= len(classes):
            raise UserError(f"{entry.title} in {root}: the {key} split has labels outside 0..{len(classes) - 1}; "
                            f"its label file is corrupt: delete the dataset's folder and download it again")
    return sets


@dataclass
class _Part:
    """One split before it is read: how many images, its classes, and how to stream them into a StoreWriter."""

    n: int
    classes: list[str]
    fill: Callable[[StoreWriter], None]


# Array formats: torchvision has read the whole split into memory already.

def _arrays(entry: Entry, root: Path, objects: dict, size: int, progress: bool, workers: int) -> dict[str, _Part]:
    out = {}
    for key, ds in objects.items():
        if entry.fmt == "cifar":  # (N, H, W, 3)
            images, labels, classes = torch.from_numpy(ds.data).permute(0, 3, 1, 2), ds.targets, ds.classes
        elif entry.fmt == "mnist":  # (N, H, W) grayscale tensor: the same plane three times
            images, labels, classes = ds.data.unsqueeze(1).expand(-1, 3, -1, -1), ds.targets, ds.classes
        elif entry.fmt == "svhn":  # (N, 3, H, W)
            images, labels, classes = torch.from_numpy(ds.data), ds.labels, SVHN_CLASSES
        else:  # stl10: (N, 3, H, W); class_names.txt is in the release, read only if present
            images, labels, classes = torch.from_numpy(ds.data), ds.labels, getattr(ds, "classes", STL10_CLASSES)
        labels = np.asarray(labels, dtype=np.int64)

        def fill(writer: StoreWriter, images=images, labels=labels) -> None:
            for start in range(0, len(images), 4096):
                writer.add(images[start:start + 4096].contiguous(), labels[start:start + 4096])

        out[key] = _Part(len(images), list(classes), fill)
    return out


def _pcam(entry: Entry, root: Path, objects: dict, size: int, progress: bool, workers: int) -> dict[str, _Part]:
    """torchvision's PCAM opens both HDF5 files for every single image (262,144 in train); read them in
    blocks instead, from the files and keys its class names, straight into the store."""
    import h5py

    cls = _tv_class(entry)
    out = {}
    for key in objects:
        files = cls._FILES[entry.split_args(key)["split"]]
        x_path, y_path = root / "pcam" / files["images"][0], root / "pcam" / files["targets"][0]
        with h5py.File(x_path, "r") as fx, h5py.File(y_path, "r") as fy:
            x, y = fx["x"], fy["y"]
            if x.ndim != 4 or x.shape[3] != 3 or x.dtype != np.uint8 or y.shape[0] != x.shape[0]:
                raise ValueError(f"unexpected HDF5 contents: x {x.shape} {x.dtype}, y {y.shape}")
            n = x.shape[0]

        def fill(writer: StoreWriter, key=key, x_path=x_path, y_path=y_path, n=n) -> None:
            with h5py.File(x_path, "r") as fx, h5py.File(y_path, "r") as fy:
                x, labels = fx["x"], np.asarray(fy["y"][:]).reshape(n).astype(np.int64)
                with progress_bar(n, f"reading {entry.name} {key}", progress) as bar:
                    for start in range(0, n, 4096):
                        block = np.ascontiguousarray(np.asarray(x[start:start + 4096]).transpose(0, 3, 1, 2))
                        writer.add(block, labels[start:start + 4096])
                        bar.update(len(block))

        out[key] = _Part(n, list(PCAM_CLASSES), fill)
    return out


# File formats: (path or torchvision item, label) jobs decoded on a thread pool.

def _decode_path(path: Path, label: int, size: int) -> tuple[np.ndarray, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return image_array(im, size), label
    except Exception as err:
        raise UserError(f"cannot read image {path} ({type(err).__name__}: {err}); replace it from the dataset's "
                        f"archive or delete the dataset's folder to download it again") from None


def _item_name(ds, index: int) -> str:
    """The file behind torchvision item `index`, for an error message. Pets, GTSRB and Caltech-101 open their
    files themselves; their (partly private) sample lists serve only to name it."""
    if hasattr(ds, "_images"):  # OxfordIIITPet
        return str(ds._images[index])
    if hasattr(ds, "_samples"):  # GTSRB: (path, label)
        return str(ds._samples[index][0])
    if hasattr(ds, "categories"):  # Caltech101
        name = f"{ds.categories[ds.y[index]]}/image_{ds.index[index]:04d}.jpg"
        return str(Path(ds.root) / "101_ObjectCategories" / name)
    return f"#{index} of {type(ds).__name__}"


def _decode_item(ds, index: int, remap: list[int] | None) -> tuple[np.ndarray, int]:
    try:
        array, label = ds[index]
    except Exception as err:
        raise UserError(f"cannot read image {_item_name(ds, index)} ({type(err).__name__}: {err}); replace it from "
                        f"the dataset's archive or delete the dataset's folder to download it again") from None
    return array, (remap[label] if remap is not None else int(label))


def _decoded(jobs: list[Callable[[], tuple[np.ndarray, int]]], classes: list[str], desc: str, progress: bool,
             workers: int) -> _Part:
    """A split whose images are decoded on a thread pool as they are written: never all in memory."""
    def fill(writer: StoreWriter) -> None:
        with progress_bar(len(jobs), desc, progress) as bar:
            for array, label in ordered_map(lambda job: job(), jobs, workers):
                writer.add_hwc(array, label)
                bar.update()

    return _Part(len(jobs), list(classes), fill)


def _files(entry: Entry, root: Path, objects: dict, size: int, progress: bool, workers: int) -> dict[str, _Part]:
    out = {}
    for key, ds in objects.items():
        items = [ds[i] for i in range(len(ds))]  # (path, label): the loader returns the path
        if entry.derived is not None:
            # SUN397 lists files in rglob order, which is the filesystem's: sort them. Then draw the split on the
            # labels, before decoding, so that images the protocol leaves out are never decoded.
            items.sort(key=lambda item: str(item[0]))
            if not items:
                raise UserError(f"{entry.title} in {root} has no images; delete the dataset's folder and download "
                                f"it again")
            labels = np.asarray([int(label) for _, label in items])
            picked = derived_split(labels, entry.derived, list(ds.classes), f"{entry.title} in {root}")
            for split, index in zip(("train", "test"), picked):
                jobs = [partial(_decode_path, Path(items[i][0]), int(items[i][1]), size) for i in index]
                out[split] = _decoded(jobs, list(ds.classes), f"decoding {entry.name} {split}", progress, workers)
            continue
        jobs = [partial(_decode_path, Path(p), int(label), size) for p, label in items]
        out[key] = _decoded(jobs, list(ds.classes), f"decoding {entry.name} {key}", progress, workers)
    return out


def _items(entry: Entry, root: Path, objects: dict, size: int, progress: bool, workers: int) -> dict[str, _Part]:
    out = {}
    for key, ds in objects.items():
        jobs = [partial(_decode_item, ds, i, None) for i in range(len(ds))]
        classes = GTSRB_CLASSES if entry.name == "gtsrb" else ds.classes  # GTSRB has only numbered folders
        out[key] = _decoded(jobs, list(classes), f"decoding {entry.name} {key}", progress, workers)
    return out


def _caltech101(entry: Entry, root: Path, objects: dict, size: int, progress: bool,
                workers: int) -> dict[str, _Part]:
    """torchvision's 101 categories, plus BACKGROUND_Google (which it drops) as a class in sorted order."""
    ds = objects["all"]
    background = Path(ds.root) / "101_ObjectCategories" / CALTECH101_BACKGROUND
    classes = sorted([*ds.categories, CALTECH101_BACKGROUND])
    remap = [classes.index(c) for c in ds.categories]
    jobs: list[Callable] = [partial(_decode_item, ds, i, remap) for i in range(len(ds))]
    label = classes.index(CALTECH101_BACKGROUND)
    jobs += [partial(_decode_path, p, label, size) for p in sorted(background.glob("*.jpg"))]
    return {"all": _decoded(jobs, classes, f"decoding {entry.name}", progress, workers)}


def _apply_derived(entry: Entry, full: ImageSet, root: Path) -> dict[str, ImageSet]:
    if len(full) == 0:
        raise UserError(f"{entry.title} in {root} has no images; delete the dataset's folder and download it again")
    train, test = derived_split(full.labels.numpy(), entry.derived, full.classes, f"{entry.title} in {root}")
    return {"train": full.subset(train), "test": full.subset(test)}


def derived_split(labels: np.ndarray, spec: DerivedSplit, classes: list[str],
                  where: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices of a DerivedSplit; each class draws from its own images in listing order."""
    rng = np.random.default_rng(spec.seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if spec.test_fraction is not None:
            k = min(len(idx) - 1, max(1, round(spec.test_fraction * len(idx)))) if len(idx) > 1 else 0
            test.append(idx[:k])
            train.append(idx[k:])
            continue
        k, t = spec.train_per_class, spec.test_per_class
        need = k + (t or 1)
        if len(idx) < need:
            raise UserError(f"{where}: class '{classes[c]}' has {len(idx)} images, but the split protocol takes {k} "
                            f"for training and {t or 'at least 1'} for test; the copy is incomplete: delete the "
                            f"dataset's folder and download it again")
        train.append(idx[:k])
        test.append(idx[k:k + t] if t else idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


_LOADERS: dict[str, Callable[..., dict[str, _Part]]] = {
    "cifar": _arrays, "mnist": _arrays, "svhn": _arrays, "stl10": _arrays, "pcam": _pcam,
    "files": _files, "items": _items, "caltech101": _caltech101,
}
