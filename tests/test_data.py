import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CLASSES, make_folder, write_cifar
from transferbench import UserError
from transferbench.data import Dataset, load_dataset, make_splits, stratified_split, stratified_subset
from transferbench.images import as_tensor
from transferbench.preprocess import Preprocess


def test_cifar10_pickles_load_as_uint8_tensors(tmp_path, monkeypatch):
    root = write_cifar(tmp_path / "c10", "cifar10", monkeypatch)
    loaded = load_dataset("cifar10", str(root), storage_size=32, workers=1)
    train, test = loaded.train, loaded.test
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (3, 32, 32)
    assert len(test) == 30 and test.classes == [f"class{i}" for i in range(10)]
    # The colour that marks each class survives the pickle row layout (R, G, B planes).
    means = as_tensor(train.images).float().mean(dim=(2, 3))
    assert (means.argmax(1) == train.labels % 3).all()


def test_cifar100_uses_fine_labels(tmp_path, monkeypatch):
    root = write_cifar(tmp_path / "c100", "cifar100", monkeypatch, per_class_train=1, per_class_test=1)
    train = load_dataset("cifar100", str(root), storage_size=32, workers=1).train
    assert len(train.classes) == 100 and sorted(set(train.labels.tolist())) == list(range(100))


def test_corrupt_cifar_file_is_an_error_naming_it(tmp_path, monkeypatch):
    root = write_cifar(tmp_path / "c10", "cifar10", monkeypatch)
    path = root / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match=r"data_batch_3 has md5 [0-9a-f]{32}, expected"):
        load_dataset("cifar10", str(root), storage_size=32, workers=1)


def test_missing_cifar_offline_says_which_file_to_place_where(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError) as info:
        load_dataset("cifar10", str(tmp_path / "empty"), storage_size=32, workers=1)
    message = str(info.value)
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert str(tmp_path / "empty" / "cifar-10-python.tar.gz") in message
    assert "c58f30108f718f92721af3b95e74349a" in message


def test_folder_converts_grayscale_and_rgba(tmp_path):
    root = make_folder(tmp_path / "d")
    Image.fromarray(np.full((16, 16), 200, np.uint8), "L").save(root / "train" / "alpha" / "gray.png")
    Image.fromarray(np.full((16, 16, 4), 100, np.uint8), "RGBA").save(root / "train" / "beta" / "rgba.png")
    (root / "train" / "beta" / "notes.txt").write_text("not an image: ignored")
    loaded = load_dataset(f"folder:{root}", None, storage_size=16, workers=2)
    train, test = loaded.train, loaded.test
    assert train.classes == CLASSES and len(train) == 38 and len(test) == 18
    assert train.images.shape[1:] == (3, 16, 16)


def test_folder_with_mixed_sizes_is_brought_to_storage_size(tmp_path):
    root = make_folder(tmp_path / "d")
    Image.fromarray(np.zeros((40, 24, 3), np.uint8)).save(root / "test" / "gamma" / "tall.png")
    loaded = load_dataset(f"folder:{root}", None, storage_size=20, workers=1)
    train, test = loaded.train, loaded.test
    assert train.images.shape[1:] == (3, 20, 20) and test.images.shape[1:] == (3, 20, 20)


def test_decoded_folder_cache_is_reused_and_invalidated(tmp_path):
    root = make_folder(tmp_path / "d")
    loaded = load_dataset(f"folder:{root}", None, storage_size=16, workers=1)
    first, _ = loaded.train, loaded.test
    cached = list((tmp_path / "cache" / "decoded").glob("*.store"))
    assert len(cached) == 1
    loaded = load_dataset(f"folder:{root}", None, storage_size=16, workers=1)
    again, _ = loaded.train, loaded.test
    assert torch.equal(as_tensor(first.images), as_tensor(again.images))
    img = np.zeros((16, 16, 3), np.uint8)
    Image.fromarray(img).save(root / "train" / "alpha" / "0000.png")  # overwrite one file
    loaded = load_dataset(f"folder:{root}", None, storage_size=16, workers=1)
    changed, _ = loaded.train, loaded.test
    assert len(list((tmp_path / "cache" / "decoded").glob("*.store"))) == 2
    assert not torch.equal(as_tensor(first.images), as_tensor(changed.images))


def test_stratified_split_is_seeded_and_keeps_class_balance():
    labels = torch.arange(10).repeat_interleave(50)
    keep, held = stratified_split(labels, 0.1, seed=3)
    assert len(held) == 50 and np.bincount(labels[held].numpy()).tolist() == [5] * 10
    assert set(keep).isdisjoint(held) and len(keep) + len(held) == 500
    assert np.array_equal(held, stratified_split(labels, 0.1, seed=3)[1])
    assert not np.array_equal(held, stratified_split(labels, 0.1, seed=4)[1])
    sub = stratified_subset(labels, 37, seed=0)
    assert len(sub) == 37 and np.bincount(labels[sub].numpy()).max() - np.bincount(labels[sub].numpy()).min() <= 1


def test_validation_split_does_not_depend_on_train_subset(tmp_path):
    root = make_folder(tmp_path / "d", train_per_class=20)
    loaded = load_dataset(f"folder:{root}", None, storage_size=16, workers=1)
    train, test = loaded.train, loaded.test
    full = make_splits(Dataset(train, test), val_fraction=0.2, train_subset=None, seed=0)
    small = make_splits(Dataset(train, test), val_fraction=0.2, train_subset=9, seed=0)
    assert torch.equal(as_tensor(full.val.images), as_tensor(small.val.images)) and len(small.train) == 9
    with pytest.raises(UserError, match="--train-subset 1000"):
        make_splits(Dataset(train, test), val_fraction=0.2, train_subset=1000, seed=0)


def test_preprocess_normalises_resizes_and_augments_in_batches():
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    prep = Preprocess(24, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear", torch.device("cpu"), channels_last=True)
    plain = prep(x)
    assert plain.shape == (8, 3, 24, 24) and plain.is_contiguous(memory_format=torch.channels_last)
    same_size = Preprocess(16, (0.5,) * 3, (0.25,) * 3, "bilinear", torch.device("cpu"), channels_last=False)
    assert torch.allclose(same_size(x), (x.float() / 255 - 0.5) / 0.25, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    aug = same_size.augment(x, g)
    assert aug.shape == x.shape and aug.dtype == torch.uint8
    assert not torch.equal(aug, x)
    assert torch.equal(aug, same_size.augment(x, torch.Generator().manual_seed(0)))  # seeded: resume replays it


def test_augmentation_flip_and_shift_are_exact():
    img = torch.arange(2 * 3 * 8 * 8, dtype=torch.uint8).view(2, 3, 8, 8)
    prep = Preprocess(8, (0,) * 3, (1,) * 3, "bilinear", torch.device("cpu"), channels_last=False)
    seen_flip = seen_shift = False
    for seed in range(20):
        out = prep.augment(img, torch.Generator().manual_seed(seed))
        for b in range(2):
            o, i = out[b], img[b]
            # Interior columns of an output row are a contiguous run of an input row, forward or reversed.
            row = o[0, 4, 2:6].tolist()
            diffs = {row[k + 1] - row[k] for k in range(3)}
            assert diffs in ({1}, {-1})
            seen_flip |= diffs == {-1}
            seen_shift |= not torch.equal(o, i) and not torch.equal(o, i.flip(-1))
    assert seen_flip and seen_shift
