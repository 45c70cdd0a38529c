"""The dataset catalog: every entry loads offline from a tiny fake written in its real on-disk format (the files
torchvision's class reads, where it reads them), with the right splits, classes, sizes and dtype; a missing
dataset is a UserError that says which file goes where."""
from __future__ import annotations

import dataclasses
import inspect
import json
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli, write_cifar
from transferbench import UserError, catalog
from transferbench.catalog import CATALOG, DerivedSplit, derived_split, describe, load_catalog, present
from transferbench.data import check_dataset, load_dataset, make_splits
from transferbench.images import DiskImages, ImageSet, as_tensor

STORAGE = 8  # mixed-size datasets come out at this size; tiny keeps the tests fast
SIZES = [(12, 10), (9, 14), (16, 16), (10, 8)]  # (w, h) cycled through for the mixed-size fakes


@dataclass
class Fake:
    sizes: dict[str, int]  # images per split, as load_catalog must return them
    classes: list[str]  # the class list, in label order
    side: int  # the stored image side
    gray: bool = False  # some files are grayscale (must come out as RGB with equal channels)
    coloured: bool = True  # every colour image's dominant channel is its label % 3


def picture(label: int, rng: np.random.Generator, w: int = 12, h: int = 10, gray: bool = False) -> Image.Image:
    """A small image whose dominant colour channel marks its class, so labels can be checked against pixels."""
    arr = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
    arr[..., label % 3] += 180
    im = Image.fromarray(arr)
    return im.convert("L") if gray else im


def save(path: Path, label: int, rng, i: int = 0, gray: bool = False, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = SIZES[i % len(SIZES)]
    picture(label, rng, w, h, gray).save(path, format=fmt, quality=95)


def md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------ fakes, one per entry
# Each writes the files that torchvision's class reads, at the paths it reads them from, and patches the md5s
# that torchvision checks on every load to match them.

def fake_cifar10(root, monkeypatch):
    write_cifar(root, "cifar10", monkeypatch)  # 5 train batches x 1 image per class, 3 test images per class
    return Fake({"train": 50, "test": 30}, [f"class{i}" for i in range(10)], 32)


def fake_cifar100(root, monkeypatch):
    write_cifar(root, "cifar100", monkeypatch, per_class_train=2, per_class_test=1)  # one train file
    return Fake({"train": 200, "test": 100}, [f"class{i}" for i in range(100)], 32)


def _idx(path: Path, array: np.ndarray) -> None:
    """The idx format: big-endian magic (0x08 = uint8, then the number of dimensions), the sizes, the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_mnist(root, folder: str, classes: list[str]):
    for prefix, n in (("train", 9), ("t10k", 6)):
        labels = np.arange(n) % 3
        # Grayscale, each image one flat level that encodes its label: checks label order and gray -> RGB.
        images = np.broadcast_to((20 + 50 * labels)[:, None, None], (n, 28, 28))
        _idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", images)
        _idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", labels)
    return Fake({"train": 9, "test": 6}, classes, 28, gray=True, coloured=False)


def fake_mnist(root, monkeypatch):
    from torchvision.datasets import MNIST

    return _fake_mnist(root, "MNIST", list(MNIST.classes))


def fake_fashion_mnist(root, monkeypatch):
    from torchvision.datasets import FashionMNIST

    return _fake_mnist(root, "FashionMNIST", list(FashionMNIST.classes))


def fake_svhn(root, monkeypatch):
    from scipy.io import savemat
    from torchvision.datasets import SVHN

    rng = np.random.default_rng(0)
    split_list = {k: list(v) for k, v in SVHN.split_list.items()}
    for split, n in (("train", 6), ("test", 4)):
        digits = np.arange(n) % 3
        x = np.stack([np.asarray(picture(int(d), rng, 32, 32)) for d in digits], axis=3)  # (32, 32, 3, N)
        y = np.where(digits == 0, 10, digits)[:, None]  # the release labels digit 0 as 10
        fname = SVHN.split_list[split][1]
        savemat(root / fname, {"X": x, "y": y})
        split_list[split][2] = md5(root / fname)
    monkeypatch.setattr(SVHN, "split_list", split_list)
    return Fake({"train": 6, "test": 4}, catalog.SVHN_CLASSES, 32)


def fake_stl10(root, monkeypatch):
    from torchvision.datasets import STL10

    rng = np.random.default_rng(0)
    folder = root / STL10.base_folder
    folder.mkdir(parents=True)

    def images(labels):
        out = np.stack([np.asarray(picture(int(c), rng, 96, 96)) for c in labels]).transpose(0, 3, 1, 2)
        out[:, :, :10, :] = 255  # a white band at the top: checks the release's column-major order is undone
        return out.transpose(0, 1, 3, 2)  # stored column-major, as in the release

    for split, n in (("train", 6), ("test", 3)):
        labels = np.arange(n) % 3
        (folder / f"{split}_X.bin").write_bytes(images(labels).tobytes())
        (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())  # 1-based
    (folder / "unlabeled_X.bin").write_bytes(images([0]).tobytes())
    (folder / "class_names.txt").write_text("\n".join(catalog.STL10_CLASSES) + "\n")
    monkeypatch.setattr(STL10, "train_list", [[f, md5(folder / f)] for f, _ in STL10.train_list])
    monkeypatch.setattr(STL10, "test_list", [[f, md5(folder / f)] for f, _ in STL10.test_list])
    return Fake({"train": 6, "test": 3}, catalog.STL10_CLASSES, 96)


def fake_flowers102(root, monkeypatch):
    from scipy.io import savemat
    from torchvision.datasets import Flowers102

    rng = np.random.default_rng(0)
    base = root / "flowers-102"
    ids = {"trnid": [1, 2, 3, 4, 5, 6], "valid": [7, 8, 9], "tstid": [10, 11, 12, 13]}
    labels = {i: (i - 1) % 3 for i in range(1, 14)}
    for i, label in labels.items():
        save(base / "jpg" / f"image_{i:05d}.jpg", label, rng, i)
    savemat(base / "imagelabels.mat", {"labels": np.array([[labels[i] + 1 for i in range(1, 14)]])})  # 1-based
    savemat(base / "setid.mat", {k: np.array([v]) for k, v in ids.items()})
    files = dict(Flowers102._file_dict)
    for key in ("label", "setid"):
        files[key] = (files[key][0], md5(base / files[key][0]))
    monkeypatch.setattr(Flowers102, "_file_dict", files)
    return Fake({"train": 6, "val": 3, "test": 4}, list(Flowers102.classes), STORAGE)


def fake_oxford_pets(root, monkeypatch):
    rng = np.random.default_rng(0)
    base = root / "oxford-iiit-pet"
    breeds = [("Abyssinian", 1), ("american_bulldog", 2), ("Bengal", 1)]  # (file prefix, species: 1 cat, 2 dog)
    for split, per_class, start in (("trainval", 2, 1), ("test", 1, 10)):
        lines = []
        for label, (breed, species) in enumerate(breeds):
            for k in range(start, start + per_class):
                save(base / "images" / f"{breed}_{k}.jpg", label, rng, k, gray=(label, k) == (1, 2))
                lines.append(f"{breed}_{k} {label + 1} {species} {k}\n")
        (base / "annotations").mkdir(parents=True, exist_ok=True)
        (base / "annotations" / f"{split}.txt").write_text("".join(lines))
    return Fake({"train": 6, "test": 3}, ["Abyssinian", "American Bulldog", "Bengal"], STORAGE, gray=True)


def fake_dtd(root, monkeypatch):
    rng = np.random.default_rng(0)
    data = root / "dtd" / "dtd"
    classes = ["banded", "blotchy", "braided"]
    k = 0
    for split, per_class in (("train", 2), ("val", 1), ("test", 3)):
        lines = []
        for label, cls in enumerate(classes):
            for _ in range(per_class):
                k += 1
                save(data / "images" / cls / f"{cls}_{k:04d}.jpg", label, rng, k)
                lines.append(f"{cls}/{cls}_{k:04d}.jpg\n")
        (data / "labels").mkdir(parents=True, exist_ok=True)
        (data / "labels" / f"{split}1.txt").write_text("".join(lines))
    return Fake({"train": 6, "val": 3, "test": 9}, classes, STORAGE)


def fake_fgvc_aircraft(root, monkeypatch):
    rng = np.random.default_rng(0)
    data = root / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "A300B4", "Boeing 717"]  # names with spaces: the label is all after the first space
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    k = 1000000
    for split, per_class in (("train", 2), ("val", 1), ("test", 3)):
        lines = []
        for label, variant in enumerate(variants):
            for _ in range(per_class):
                k += 1
                save(data / "images" / f"{k}.jpg", label, rng, k)
                lines.append(f"{k} {variant}\n")
        (data / f"images_variant_{split}.txt").write_text("".join(lines))
    return Fake({"train": 6, "val": 3, "test": 9}, variants, STORAGE)


def fake_food101(root, monkeypatch):
    rng = np.random.default_rng(0)
    base = root / "food-101"
    classes = ["apple_pie", "baby_back_ribs", "baklava"]
    (base / "meta").mkdir(parents=True)
    k = 100
    for split, per_class in (("train", 3), ("test", 1)):
        meta = {}
        for label, cls in enumerate(classes):
            meta[cls] = []
            for _ in range(per_class):
                k += 1
                save(base / "images" / cls / f"{k}.jpg", label, rng, k)
                meta[cls].append(f"{cls}/{k}")
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
    return Fake({"train": 9, "test": 3}, classes, STORAGE)


def fake_caltech101(root, monkeypatch):
    rng = np.random.default_rng(0)
    folder = root / "caltech101" / "101_ObjectCategories"
    # Sorted as torchvision lists them: the background folder comes first.
    counts = {"BACKGROUND_Google": 5, "Faces_easy": 4, "accordion": 4}
    for label, (cls, n) in enumerate(counts.items()):
        for i in range(1, n + 1):
            save(folder / cls / f"image_{i:04d}.jpg", label, rng, i, gray=(cls, i) == ("accordion", 3))
    monkeypatch.setitem(CATALOG, "caltech101", dataclasses.replace(
        CATALOG["caltech101"], derived=DerivedSplit(train_per_class=2)))
    return Fake({"train": 6, "test": 7}, list(counts), STORAGE, gray=True)


def fake_eurosat(root, monkeypatch):
    rng = np.random.default_rng(0)
    classes = ["AnnualCrop", "Forest", "HerbaceousVegetation"]
    for label, cls in enumerate(classes):
        for i in range(1, 6):
            path = root / "eurosat" / "2750" / cls / f"{cls}_{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            picture(label, rng, 64, 64).save(path, quality=95)
    return Fake({"train": 12, "test": 3}, classes, 64)  # 20% of 5 per class for test


def fake_gtsrb(root, monkeypatch):
    rng = np.random.default_rng(0)
    base = root / "gtsrb"
    for label in range(3):
        folder = base / "GTSRB" / "Training" / f"{label:05d}"
        for i in range(3):
            save(folder / f"{i:05d}_{i:05d}.ppm", label, rng, i + label)
        (folder / f"GT-{label:05d}.csv").write_text("Filename;Width;Height;ClassId\n")  # as in the release
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, label in enumerate([2, 0, 1, 2]):
        save(base / "GTSRB" / "Final_Test" / "Images" / f"{i:05d}.ppm", label, rng, i)
        rows.append(f"{i:05d}.ppm;{SIZES[i][0]};{SIZES[i][1]};1;1;5;5;{label}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return Fake({"train": 9, "test": 4}, catalog.GTSRB_CLASSES, STORAGE)


def fake_sun397(root, monkeypatch):
    rng = np.random.default_rng(0)
    data = root / "SUN397"
    names = ["/a/abbey", "/b/bakery/shop", "/c/campus"]  # nested categories hold a '/' in their name
    data.mkdir(parents=True)
    (data / "ClassName.txt").write_text("\n".join(names) + "\n")
    for label, name in enumerate(names):
        for i in range(5):
            save(data / name.lstrip("/") / f"sun_{label}{i}abcdef.jpg", label, rng, i)
    monkeypatch.setitem(CATALOG, "sun397", dataclasses.replace(
        CATALOG["sun397"], derived=DerivedSplit(train_per_class=2, test_per_class=2)))
    return Fake({"train": 6, "test": 6}, ["abbey", "bakery/shop", "campus"], STORAGE)


def fake_stanford_cars(root, monkeypatch):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    base = root / "stanford_cars"
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"]
    (base / "devkit").mkdir(parents=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array([names], dtype=object)})
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    for split, annos, n in (("train", base / "devkit" / "cars_train_annos.mat", 6),
                            ("test", base / "cars_test_annos_withlabels.mat", 4)):
        records = np.zeros((1, n), dtype=[(f, "O") for f in fields])  # a MATLAB struct array
        for i in range(n):
            label, fname = i % 3, f"{i + 1:05d}.jpg"
            save(base / f"cars_{split}" / fname, label, rng, i, gray=(split, i) == ("train", 4))
            records[0, i] = (1, 1, 5, 5, label + 1, fname)  # class ids are 1-based
        savemat(annos, {"annotations": records})
    return Fake({"train": 6, "test": 4}, names, STORAGE, gray=True)


def fake_country211(root, monkeypatch):
    rng = np.random.default_rng(0)
    classes = ["AD", "AE", "AF"]
    for split, per_class in (("train", 2), ("valid", 1), ("test", 3)):
        for label, cc in enumerate(classes):
            for i in range(per_class):
                save(root / "country211" / split / cc / f"{i}.jpg", label, rng, i)
    return Fake({"train": 6, "val": 3, "test": 9}, classes, STORAGE)


def fake_pcam(root, monkeypatch):
    h5py = pytest.importorskip("h5py", reason="torchvision's PCAM reads HDF5 with h5py, which is not installed")
    from torchvision.datasets import PCAM

    rng = np.random.default_rng(0)
    (root / "pcam").mkdir(parents=True)
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        labels = np.arange(n) % 2
        x = np.stack([np.asarray(picture(int(c), rng, 96, 96)) for c in labels])
        with h5py.File(root / "pcam" / PCAM._FILES[split]["images"][0], "w") as f:
            f.create_dataset("x", data=x)
        with h5py.File(root / "pcam" / PCAM._FILES[split]["targets"][0], "w") as f:
            f.create_dataset("y", data=labels.astype(np.uint8).reshape(n, 1, 1, 1))
    return Fake({"train": 4, "val": 2, "test": 3}, catalog.PCAM_CLASSES, 96)


FAKES = {name[len("fake_"):]: fn for name, fn in globals().items() if name.startswith("fake_")}


# ----------------------------------------------------------------------------------------------- tests

def check_colours(s: ImageSet) -> None:
    gray = ((s.images[:, 0] == s.images[:, 1]) & (s.images[:, 1] == s.images[:, 2])).flatten(1).all(1)
    means = s.images.float().mean(dim=(2, 3))
    assert (means[~gray].argmax(1) == s.labels[~gray] % 3).all()


def test_every_catalog_entry_has_a_fake():
    assert set(FAKES) == set(CATALOG)


@pytest.mark.parametrize("name", sorted(FAKES))
def test_entry_loads_its_official_splits_from_a_fake(name, tmp_path, monkeypatch):
    root = tmp_path / "data"
    root.mkdir()
    assert not present(name, root)
    fake = FAKES[name](root, monkeypatch)
    assert present(name, root)
    entry = CATALOG[name]
    offline(monkeypatch)  # files that are there are never downloaded again
    sets = load_catalog(name, root, storage_size=STORAGE, download=True, progress=False, workers=2)
    assert list(sets) == (["train", "val", "test"] if entry.has_val else ["train", "test"])
    assert {k: len(s) for k, s in sets.items()} == fake.sizes  # distinct sizes: the right file is each split
    for s in sets.values():
        assert s.classes == list(fake.classes)
        assert s.images.dtype == torch.uint8 and s.images.shape[1:] == (3, fake.side, fake.side)
        assert s.labels.dtype == torch.int64 and s.labels.shape == (len(s),)
        if fake.coloured:
            check_colours(s)
    everything = torch.cat([s.images for s in sets.values()])
    gray = ((everything[:, 0] == everything[:, 1]) & (everything[:, 1] == everything[:, 2])).flatten(1).all(1)
    assert bool(gray.any()) == fake.gray  # grayscale files come out as RGB with three equal channels


def test_mnist_keeps_label_order_and_turns_gray_into_rgb(tmp_path, monkeypatch):
    fake_mnist(tmp_path, monkeypatch)
    sets = load_catalog("mnist", tmp_path, storage_size=STORAGE, download=False, progress=False)
    for s in sets.values():
        assert (s.images[:, :, 0, 0] == (20 + 50 * s.labels)[:, None]).all()


def test_stl10_images_come_out_upright(tmp_path, monkeypatch):
    fake_stl10(tmp_path, monkeypatch)
    train = load_catalog("stl10", tmp_path, storage_size=STORAGE, download=False, progress=False)["train"]
    assert (train.images[:, :, :10, :] == 255).all() and not (train.images[:, :, :, :10] == 255).all()


def test_svhn_digit_zero_is_label_zero(tmp_path, monkeypatch):
    fake_svhn(tmp_path, monkeypatch)
    train = load_catalog("svhn", tmp_path, storage_size=STORAGE, download=False, progress=False)["train"]
    assert sorted(set(train.labels.tolist())) == [0, 1, 2]  # the release's 10 is digit 0


def test_caltech101_keeps_background_and_its_seeded_split_is_stable(tmp_path, monkeypatch):
    fake_caltech101(tmp_path, monkeypatch)
    a = load_catalog("caltech101", tmp_path, storage_size=STORAGE, download=False, progress=False)
    b = load_catalog("caltech101", tmp_path, storage_size=STORAGE, download=False, progress=False, workers=1)
    assert a["train"].classes[0] == "BACKGROUND_Google"
    assert torch.bincount(a["train"].labels).tolist() == [2, 2, 2]  # 2 per class (30 on the real data)
    assert torch.bincount(a["test"].labels).tolist() == [3, 2, 2]
    assert torch.equal(a["train"].images, b["train"].images) and torch.equal(a["test"].labels, b["test"].labels)


def test_sun397_draws_per_class_and_leaves_the_rest_unused(tmp_path, monkeypatch):
    fake_sun397(tmp_path, monkeypatch)
    sets = load_catalog("sun397", tmp_path, storage_size=STORAGE, download=False, progress=False)
    assert torch.bincount(sets["train"].labels).tolist() == [2, 2, 2]
    assert torch.bincount(sets["test"].labels).tolist() == [2, 2, 2]
    pixels = {bytes(im.numpy()) for s in sets.values() for im in s.images}
    assert len(pixels) == 12  # train and test never share an image


def test_derived_split_sizes_match_the_published_ones():
    eurosat = np.repeat(np.arange(10), [3000, 3000, 3000, 2500, 2500, 2000, 2500, 3000, 2500, 3000])
    train, test = derived_split(eurosat, CATALOG["eurosat"].derived, [str(i) for i in range(10)], "here")
    assert (len(train), len(test)) == (CATALOG["eurosat"].train_size, CATALOG["eurosat"].test_size)
    sun = np.repeat(np.arange(397), 100 + np.arange(397) % 7)
    train, test = derived_split(sun, CATALOG["sun397"].derived, [str(i) for i in range(397)], "here")
    assert (len(train), len(test)) == (19_850, 19_850) and not set(train) & set(test)
    caltech = np.repeat(np.arange(102), 31 + np.arange(102) % 5)  # the smallest real class has 31 images
    train, test = derived_split(caltech, CATALOG["caltech101"].derived, [str(i) for i in range(102)], "here")
    assert len(train) == 3_060 and len(train) + len(test) == len(caltech)


def test_a_class_too_small_for_the_protocol_is_a_user_error():
    with pytest.raises(UserError, match="class 'b' has 3 images.*takes 30"):
        derived_split(np.repeat([0, 1], [40, 3]), DerivedSplit(train_per_class=30), ["a", "b"], "Caltech-101 in /x")


def offline(monkeypatch):
    """No network: every torchvision download fails the way it fails on an offline machine."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    import torchvision.datasets.pcam

    monkeypatch.setattr(torchvision.datasets.pcam, "download_file_from_google_drive", refuse)  # needs gdown


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_missing_dataset_offline_says_which_file_goes_where(name, tmp_path, monkeypatch):
    offline(monkeypatch)
    entry = CATALOG[name]
    if name == "pcam":
        pytest.importorskip("h5py", reason="torchvision's PCAM needs h5py before it downloads")
    with pytest.raises(UserError) as info:
        load_catalog(name, tmp_path, storage_size=STORAGE, progress=False)
    msg = str(info.value)
    layout = catalog._layout(entry)
    assert "\n" not in msg and "--data-dir" in msg and entry.title in msg
    for d in layout.downloads:
        assert d.url in msg and str(tmp_path / d.path) in msg
        assert (d.md5 or "declares no md5") in msg
    if entry.downloadable:
        assert "urlopen error offline (test)" in msg  # MNIST re-raises it as a RuntimeError per mirror
    else:  # Stanford Cars: nothing to download, every path it needs is named
        assert "cannot download" in msg and all(str(tmp_path / p) in msg for p in layout.expected)


def test_an_archive_put_where_the_message_says_is_used_offline(tmp_path, monkeypatch):
    import tarfile

    from torchvision.datasets import DTD

    fake_dtd(tmp_path / "staging", monkeypatch)
    root = tmp_path / "data"
    archive = root / catalog._layout(CATALOG["dtd"]).downloads[0].path
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:  # the release's layout: one top-level dtd/ folder
        tar.add(tmp_path / "staging" / "dtd" / "dtd", arcname="dtd")
    monkeypatch.setattr(DTD, "_MD5", md5(archive))
    offline(monkeypatch)
    sets = load_catalog("dtd", root, storage_size=STORAGE, progress=False)
    assert {k: len(s) for k, s in sets.items()} == {"train": 6, "val": 3, "test": 9}


def test_no_download_asked_names_the_files_without_trying(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("no network access when download=False")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    food = r"downloading is off.*food-101.tar.gz \(md5 85eeb15f3717b99a5da872d97d918f87\)"
    with pytest.raises(UserError, match=food):
        load_catalog("food101", tmp_path, storage_size=STORAGE, download=False)
    assert not any(tmp_path.iterdir())  # nothing created either


def test_pcam_without_h5py_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog, "_module_available", lambda module: module != "h5py")
    (tmp_path / "pcam").mkdir()
    monkeypatch.setattr(catalog, "present", lambda name, root: True)
    with pytest.raises(UserError, match="needs the 'h5py' package.*pip install h5py"):
        load_catalog("pcam", tmp_path, storage_size=STORAGE)


def test_corrupt_file_is_named_with_its_md5(tmp_path, monkeypatch):
    fake_svhn(tmp_path, monkeypatch)
    from torchvision.datasets import SVHN

    with open(tmp_path / "test_32x32.mat", "ab") as f:
        f.write(b"junk")
    with pytest.raises(UserError, match=r"test_32x32.mat has md5 [0-9a-f]{32}, expected "
                                        + SVHN.split_list["test"][2]):
        load_catalog("svhn", tmp_path, storage_size=STORAGE, download=True, progress=False)


def test_unreadable_image_is_named(tmp_path, monkeypatch):
    fake_food101(tmp_path, monkeypatch)
    (tmp_path / "food-101" / "images" / "baklava" / "109.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match=r"cannot read image .*baklava/109.jpg"):
        load_catalog("food101", tmp_path, storage_size=STORAGE, progress=False, workers=2)


def test_progress_bar_goes_to_stderr_only_when_asked(tmp_path, monkeypatch, capsys):
    fake_dtd(tmp_path, monkeypatch)
    load_catalog("dtd", tmp_path, storage_size=STORAGE, progress=False)
    assert capsys.readouterr().err == ""
    load_catalog("dtd", tmp_path, storage_size=STORAGE, progress=True)
    assert "decoding dtd train" in capsys.readouterr().err


def test_unknown_name_suggests_a_close_one(tmp_path):
    with pytest.raises(UserError, match="unknown dataset 'oxford_pet'.*Did you mean: oxford_pets"):
        load_catalog("oxford_pet", tmp_path, storage_size=STORAGE)


def test_describe_rows_follow_the_literature():
    rows = {r["name"]: r for r in describe()}
    assert len(rows) >= 18 and all(r["url"].startswith("http") for r in rows.values())
    assert {n for n, r in rows.items() if r["metric"] == "mean_per_class_acc"} == {
        "oxford_pets", "flowers102", "fgvc_aircraft", "caltech101"}  # Kornblith et al. 2019
    assert {n for n, r in rows.items() if r["val"] is not None} == {
        "flowers102", "dtd", "fgvc_aircraft", "country211", "pcam"}
    assert rows["oxford_pets"]["title"] == "Oxford-IIIT Pets" and rows["oxford_pets"]["classes"] == 37
    assert (rows["flowers102"]["train"], rows["flowers102"]["val"], rows["flowers102"]["test"]) == (1020, 1020, 6149)
    assert rows["cifar10"]["url"] == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def test_download_constants_kept_here_are_still_torchvisions():
    """Caltech-101, EuroSAT and GTSRB keep their URL and md5 inside a method; the copies here must match."""
    from torchvision import datasets

    for cls, constants in ((datasets.Caltech101, catalog.CALTECH101_DOWNLOAD),
                           (datasets.EuroSAT, catalog.EUROSAT_DOWNLOAD),
                           (datasets.GTSRB, (catalog.GTSRB_BASE_URL,) + sum(catalog.GTSRB_DOWNLOADS, ()))):
        source = inspect.getsource(cls)
        assert all(c in source for c in constants), cls.__name__


# ------------------------------------------------------------------------ wired into --dataset NAME

def test_load_dataset_uses_the_official_validation_split_the_metric_and_a_cached_store(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    fake_dtd(data_dir, monkeypatch)
    offline(monkeypatch)
    data = load_dataset("dtd", str(data_dir), storage_size=STORAGE, workers=2)
    assert (len(data.train), len(data.val), len(data.test)) == (6, 3, 9) and data.metric == "top1"
    assert data.test_files is None and isinstance(data.train.images, DiskImages)
    assert Path(data.store).parent == tmp_path / "cache" / "decoded" and Path(data.store).is_file()
    splits = make_splits(data, val_fraction=0.5, train_subset=None, seed=0)
    assert torch.equal(as_tensor(splits.val.images), as_tensor(data.val.images)) and len(splits.train) == 6
    check_colours(ImageSet(as_tensor(data.test.images), data.test.labels, data.test.classes))
    in_memory = load_catalog("dtd", data_dir, storage_size=STORAGE, progress=False)
    assert all(torch.equal(as_tensor(getattr(data, k).images), in_memory[k].images) for k in in_memory)

    real_make = catalog._make
    monkeypatch.setattr(catalog, "_make", lambda *a, **k: pytest.fail("decoded again although the files are the same"))
    again = load_dataset("dtd", str(data_dir), storage_size=STORAGE, workers=2)
    assert again.store == data.store and torch.equal(as_tensor(again.val.images), as_tensor(data.val.images))
    monkeypatch.setattr(catalog, "_make", real_make)
    image = next((data_dir / "dtd" / "dtd" / "images" / "banded").iterdir())
    Image.new("RGB", (9, 9), (0, 0, 255)).save(image)  # one file changed: a new store
    changed = load_dataset("dtd", str(data_dir), storage_size=STORAGE, workers=2)
    assert changed.store != data.store and len(list((tmp_path / "cache" / "decoded").glob("*.store"))) == 2


def test_load_dataset_sets_the_literatures_metric(tmp_path, monkeypatch):
    fake_oxford_pets(tmp_path / "data", monkeypatch)
    data = load_dataset("oxford_pets", str(tmp_path / "data"), storage_size=STORAGE)
    assert data.metric == "mean_per_class_acc" and data.val is None and len(data.test) == 3


def test_derived_splits_come_out_of_the_store_the_same_and_unused_images_are_never_decoded(tmp_path, monkeypatch):
    fake_caltech101(tmp_path / "data", monkeypatch)
    a = load_dataset("caltech101", str(tmp_path / "data"), storage_size=STORAGE)
    b = load_dataset("caltech101", str(tmp_path / "data"), storage_size=STORAGE)  # from the store
    assert torch.bincount(a.train.labels).tolist() == [2, 2, 2] and torch.equal(a.test.labels, b.test.labels)
    assert torch.equal(as_tensor(a.train.images), as_tensor(b.train.images))
    fake_sun397(tmp_path / "sun", monkeypatch)
    sun = load_dataset("sun397", str(tmp_path / "sun"), storage_size=STORAGE)
    assert (len(sun.train), len(sun.test)) == (6, 6) and sun.train.images.store.shape[0] == 12  # of 15 files


def test_unknown_catalog_name_is_refused_before_anything_runs():
    with pytest.raises(UserError, match="unknown dataset 'oxford_pet'.*transferbench datasets.*Did you mean: "
                                        "oxford_pets"):
        check_dataset("oxford_pet")


def test_a_corrupt_archive_is_named_and_never_extracted(tmp_path, monkeypatch):
    archive = tmp_path / catalog._layout(CATALOG["dtd"]).downloads[0].path
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"half a download")
    offline(monkeypatch)
    from torchvision.datasets import DTD

    with pytest.raises(UserError, match=rf"{archive} is corrupt \(md5 {md5(archive)}, expected {DTD._MD5}\)"):
        load_dataset("dtd", str(tmp_path), storage_size=STORAGE)
    assert sorted(p.name for p in archive.parent.iterdir()) == [archive.name]


def test_progress_bars_cover_decoding_checksums_and_extraction(tmp_path, monkeypatch, capsys):
    import tarfile

    from torchvision.datasets import DTD

    fake_dtd(tmp_path / "staging", monkeypatch)
    archive = tmp_path / "data" / catalog._layout(CATALOG["dtd"]).downloads[0].path
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "staging" / "dtd" / "dtd", arcname="dtd")
    monkeypatch.setattr(DTD, "_MD5", md5(archive))
    offline(monkeypatch)
    load_dataset("dtd", str(tmp_path / "data"), storage_size=STORAGE, progress=True)
    err = capsys.readouterr().err
    assert "checksum dtd-r1.0.1.tar.gz" in err and "extracting dtd-r1.0.1.tar.gz" in err and "decoding dtd" in err
    load_dataset("dtd", str(tmp_path / "data"), storage_size=STORAGE + 1)  # another size: decoded again
    assert capsys.readouterr().err == ""  # progress off (the default of load_dataset)


def test_datasets_command_lists_the_catalog_and_what_is_present(tmp_path, monkeypatch, capsys):
    fake_dtd(tmp_path, monkeypatch)
    code, out, _ = run_cli(["datasets", "--data-dir", str(tmp_path)], capsys)
    assert code == 0
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line and line.split()[0] in CATALOG}
    assert set(lines) == set(CATALOG)
    assert lines["dtd"][1:8] == ["47", "1,880", "1,880", "1,880", "top1", "yes", CATALOG["dtd"].url]
    assert lines["oxford_pets"][3] == "-" and lines["oxford_pets"][5:7] == ["mean_per_class_acc", "no"]
    assert f"1 of {len(CATALOG)} present in {tmp_path}" in out
    code, out, _ = run_cli(["datasets", "--data-dir", str(tmp_path), "--json"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert {r["name"] for r in rows if r["present"]} == {"dtd"} and all(r["url"].startswith("http") for r in rows)
