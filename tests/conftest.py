"""Tiny data in the real on-disk formats (image folders, CIFAR python pickles), made per test."""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transferbench import cli

CLASSES = ["alpha", "beta", "gamma"]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache and data dirs: nothing leaks between tests or from the user's home."""
    monkeypatch.setenv("TRANSFERBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TRANSFERBENCH_DATA", str(tmp_path / "data"))
    # Hermetic: pretrained weights are never found in (or downloaded into) the user's caches.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def class_image(label: int, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """A learnable image: each class has its own dominant colour channel, plus noise."""
    img = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
    img[..., label % 3] += 150
    return img


def make_folder(root: Path, train_per_class: int = 12, test_per_class: int = 6, size: int = 16,
                classes: list[str] = CLASSES, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for label, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = Image.fromarray(class_image(label, rng, size))
                ext = ".png" if i % 2 else ".jpg"
                img.save(root / split / cls / f"{i:04d}{ext}", quality=95)
    return root


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "imgs")


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar(root: Path, name: str, monkeypatch, per_class_train: int = 6, per_class_test: int = 3) -> Path:
    """The python-pickle release's files, with torchvision's expected md5s patched to match them."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    n_classes = 10 if name == "cifar10" else 100
    label_key = "labels" if name == "cifar10" else "fine_labels"
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)

    def batch(n_per_class: int) -> dict:
        labels = np.repeat(np.arange(n_classes), n_per_class)
        images = np.stack([class_image(int(l), rng, 32) for l in labels])  # (N, 32, 32, 3)
        data = images.transpose(0, 3, 1, 2).reshape(len(labels), -1)  # the release's row layout: R, G, B planes
        return {"data": data, label_key: labels.tolist(), "batch_label": "generated"}

    files = []
    for fname, _ in cls.train_list:
        files.append((fname, batch(max(1, per_class_train // len(cls.train_list)))))
    for fname, _ in cls.test_list:
        files.append((fname, batch(per_class_test)))
    meta_key = cls.meta["key"]
    files.append((cls.meta["filename"], {meta_key: [f"class{i}" for i in range(n_classes)]}))
    for fname, obj in files:
        with open(folder / fname, "wb") as f:
            pickle.dump(obj, f)
    monkeypatch.setattr(cls, "train_list", [[f, _md5(folder / f)] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, _md5(folder / f)] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / cls.meta["filename"])})
    return root


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def cli_run(capsys):
    def call(*argv):
        return run_cli(list(argv), capsys)
    return call


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is as fast, and does not crawl when another process holds the other core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
