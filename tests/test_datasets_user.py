"""Users' data as it really is: CSV files, folders of class folders only, a val/ folder, Hugging Face datasets;
the decoded store on disk (memory-mapped) they are all read from; one clear error per defect, naming the file."""
import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CLASSES, class_image, make_folder
from transferbench import UserError
from transferbench.data import Batches, Dataset, check_dataset, fingerprint, load_dataset, make_splits
from transferbench.images import DiskImages, ImageSet, Store, StoreWriter, as_tensor, ordered_map, update_hash


def load(text, **kw):
    return load_dataset(text, None, storage_size=16, workers=1, **kw)


def write_csv(path: Path, rows, header=("path", "label", "split")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def folder_rows(root: Path, with_split: bool = True):
    """One row per image of a train/test folder, paths relative to root."""
    rows = []
    for split in ("train", "test"):
        for p in sorted((root / split).rglob("*.*")):
            rel = p.relative_to(root).as_posix()
            rows.append([rel, p.parent.name, split] if with_split else [rel, p.parent.name])
    return rows


def class_only(tmp_path: Path, per_class: int = 10) -> Path:
    """A folder of class folders only (no train/ or test/), as people have them."""
    src = make_folder(tmp_path / "src", train_per_class=per_class, test_per_class=1)
    root = tmp_path / "photos"
    for cls in CLASSES:
        shutil.copytree(src / "train" / cls, root / cls)
    return root


def same(a: ImageSet, b: ImageSet) -> bool:
    return torch.equal(as_tensor(a.images), as_tensor(b.images)) and torch.equal(a.labels, b.labels) \
        and a.classes == b.classes


# --------------------------------------------------------------------------------------------------- CSV

def test_csv_with_a_split_column_is_the_folder_itself(folder, tmp_path):
    rows = folder_rows(folder)
    np.random.default_rng(0).shuffle(rows)  # row order does not matter
    as_csv = load(f"csv:{write_csv(folder / 'list.csv', rows)}")
    as_folder = load(f"folder:{folder}")
    assert same(as_csv.train, as_folder.train) and same(as_csv.test, as_folder.test)
    assert as_csv.test_files is None and as_csv.val is None and as_csv.metric == "top1"
    assert fingerprint(make_splits(as_csv, val_fraction=0.25, train_subset=None, seed=0)) == \
        fingerprint(make_splits(as_folder, val_fraction=0.25, train_subset=None, seed=0))


def test_csv_paths_are_relative_to_the_csv_file_and_val_rows_are_the_validation_split(folder, tmp_path):
    rows = [["../imgs/" + r[0], r[1], r[2]] for r in folder_rows(folder)]
    for r in rows[:6]:  # the first two training images of every class... (sorted: alpha, alpha, ...) -> val
        r[2] = "val"
    (tmp_path / "lists").mkdir()
    data = load(f"csv:{write_csv(tmp_path / 'lists' / 'l.csv', rows)}")
    assert len(data.val) == 6 and len(data.train) == 30 and len(data.test) == 18
    splits = make_splits(data, val_fraction=0.5, train_subset=None, seed=0)
    assert same(splits.val, data.val) and len(splits.train) == 30  # the data's own validation split, untouched


def test_csv_without_a_split_column_gets_a_seeded_stratified_test_split(folder, tmp_path):
    path = write_csv(folder / "l.csv", [r[:2] for r in folder_rows(folder) if r[2] == "train"], ("path", "label"))
    a = load(f"csv:{path}", test_fraction=0.25, seed=3)
    assert len(a.test) == 9 and torch.bincount(a.test.labels).tolist() == [3, 3, 3]
    assert len(a.train) == 27 and len(a.test_files) == 9 and all(f.startswith("train/") for f in a.test_files)
    assert a.test_files == load(f"csv:{path}", test_fraction=0.25, seed=3).test_files
    assert a.test_files != load(f"csv:{path}", test_fraction=0.25, seed=4).test_files
    # the files named are the test images
    named = torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / "imgs" / f).convert("RGB"))).permute(2, 0, 1)
                         for f in a.test_files])
    assert (as_tensor(a.test.images).float() - named.float()).abs().mean() < 8  # JPEG vs PNG decoders agree closely


def test_numeric_labels_are_ordered_as_numbers(folder, tmp_path):
    rows = [[r[0], str({"alpha": 2, "beta": 10, "gamma": 9}[r[1]]), r[2]] for r in folder_rows(folder)]
    data = load(f"csv:{write_csv(folder / 'l.csv', rows)}")
    assert data.classes == ["2", "9", "10"]


@pytest.mark.parametrize("defect, match", [
    ("no label column", "has no 'label' column"),
    ("missing file", r"line 3: .*nope.jpg does not exist"),
    ("bad split", "line 2: split 'training' is not one of train, val, test"),
    ("unseen label", r"0000.jpg: its label 'delta' in the test split is not a class of the training split"),
    ("listed twice", r"0000.jpg is listed in the train and the test split \(lines 2 and \d+\)"),
    ("same bytes", r"are the same image \(identical bytes\)"),
    ("unreadable", r"cannot read image .*broken.jpg"),
    ("empty label", "line 2: train/alpha/0000.jpg has an empty label"),
])
def test_csv_defects_are_one_clear_error_naming_the_file(folder, tmp_path, defect, match):
    rows = folder_rows(folder)
    header = ("path", "label", "split")
    if defect == "no label column":
        header = ("path", "class", "split")
    elif defect == "missing file":
        rows[1][0] = "train/alpha/nope.jpg"
    elif defect == "bad split":
        rows[0][2] = "training"
    elif defect == "unseen label":
        test_row = next(r for r in rows if r[2] == "test")
        test_row[1] = "delta"
    elif defect == "listed twice":
        rows.append([rows[0][0], rows[0][1], "test"])
    elif defect == "same bytes":
        shutil.copy(folder / rows[0][0], folder / "test" / "alpha" / "copy.jpg")
        rows.append(["test/alpha/copy.jpg", "alpha", "test"])
    elif defect == "unreadable":
        (folder / "train" / "alpha" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
        rows.append(["train/alpha/broken.jpg", "alpha", "train"])
    elif defect == "empty label":
        rows[0][1] = ""
    with pytest.raises(UserError, match=match):
        load(f"csv:{write_csv(folder / 'l.csv', rows, header)}")


def test_check_dataset_refuses_missing_csv_and_folders_before_anything_runs(tmp_path):
    with pytest.raises(UserError, match="CSV file .*nope.csv does not exist"):
        check_dataset(f"csv:{tmp_path / 'nope.csv'}")
    with pytest.raises(UserError, match="is a directory, not a CSV file"):
        check_dataset(f"csv:{tmp_path}")
    with pytest.raises(UserError, match="hf:.*nowhere does not exist"):
        check_dataset(f"hf:{tmp_path / 'nowhere'}")


# ----------------------------------------------------------------------------------------------- folders

def test_class_only_folder_gets_a_carved_recorded_test_split(tmp_path):
    root = class_only(tmp_path)
    data = load(f"folder:{root}", test_fraction=0.2, seed=0)
    assert data.classes == CLASSES and len(data.train) == 24 and len(data.test) == 6
    assert torch.bincount(data.test.labels).tolist() == [2, 2, 2]
    assert sorted(data.test_files) == data.test_files and all((root / f).is_file() for f in data.test_files)
    assert {f.split("/")[0] for f in data.test_files} == set(CLASSES)
    # train and test are disjoint and cover the folder
    everything = {bytes(im.numpy()) for s in (data.train, data.test) for im in s.images}
    assert len(everything) == 30
    again = load(f"folder:{root}", test_fraction=0.2, seed=0)
    assert again.test_files == data.test_files and same(again.test, data.test)
    assert load(f"folder:{root}", test_fraction=0.2, seed=1).test_files != data.test_files
    assert len(load(f"folder:{root}", test_fraction=0.5, seed=0).test) == 15


@pytest.mark.parametrize("layout", ["class folders", "train/test"])
def test_a_val_folder_is_the_validation_split(tmp_path, layout):
    root = class_only(tmp_path) if layout == "class folders" else make_folder(tmp_path / "d")
    rng = np.random.default_rng(5)
    for label, cls in enumerate(CLASSES):
        (root / "val" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(class_image(label, rng)).save(root / "val" / cls / f"v{i}.png")
    data = load(f"folder:{root}")
    assert data.classes == CLASSES  # "val" is not a class
    assert len(data.val) == 6 and torch.bincount(data.val.labels).tolist() == [2, 2, 2]
    splits = make_splits(data, val_fraction=0.3, train_subset=None, seed=0)
    assert same(splits.val, data.val) and len(splits.train) == len(data.train)


def test_a_test_class_the_training_split_lacks_is_named(folder):
    (folder / "test" / "gamma").rename(folder / "test" / "delta")
    with pytest.raises(UserError, match=r"test/delta/0000.jpg: its label 'delta' in the test split .*only in train: "
                                        r"\['gamma'\]; only in test: \['delta'\]"):
        load(f"folder:{folder}")


def test_a_test_split_missing_a_class_is_fine(folder):
    shutil.rmtree(folder / "test" / "gamma")
    data = load(f"folder:{folder}")
    assert data.classes == CLASSES and sorted(set(data.test.labels.tolist())) == [0, 1]


def test_the_same_image_in_train_and_test_is_named(folder):
    shutil.copy(folder / "train" / "beta" / "0003.png", folder / "test" / "beta" / "leak.png")
    with pytest.raises(UserError, match=r"train/beta/0003.png \(train\) and .*test/beta/leak.png \(test\) are the "
                                        r"same image"):
        load(f"folder:{folder}")


def test_an_empty_class_folder_is_named(tmp_path):
    root = class_only(tmp_path)
    (root / "delta").mkdir()
    with pytest.raises(UserError, match=f"class folder {root / 'delta'} has no images"):
        load(f"folder:{root}")


def test_progress_bars_only_when_asked(folder, capsys):
    load(f"folder:{folder}")
    assert capsys.readouterr().err == ""
    load(f"folder:{folder}", test_fraction=0.3)  # cached: nothing to decode
    load(f"folder:{make_folder(folder.parent / 'other', train_per_class=2, test_per_class=1)}", progress=True)
    err = capsys.readouterr().err
    assert "reading image sizes" in err and "decoding" in err


# ---------------------------------------------------------------------------------------------- hf:

datasets = pytest.importorskip("datasets", reason="hf: datasets need the optional 'datasets' package")


def hf_split(n: int, rng, labels=None, string_labels=False, second_image=False):
    labels = [i % 3 for i in range(n)] if labels is None else labels
    pics = [Image.fromarray(class_image(lbl, rng)) for lbl in labels]
    columns = {"picture": pics, "kind": [CLASSES[lbl] for lbl in labels] if string_labels else labels,
               "index": list(range(n))}
    features = {"picture": datasets.Image(), "index": datasets.Value("int32"),
                "kind": datasets.Value("string") if string_labels else datasets.ClassLabel(names=CLASSES)}
    if second_image:
        columns["thumb"], features["thumb"] = pics, datasets.Image()
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def test_hf_saved_dataset_uses_its_train_validation_and_test_splits(tmp_path):
    rng = np.random.default_rng(0)
    datasets.DatasetDict({"train": hf_split(12, rng), "validation": hf_split(6, rng),
                          "test": hf_split(9, rng)}).save_to_disk(str(tmp_path / "hfd"))
    data = load(f"hf:{tmp_path / 'hfd'}")
    assert (len(data.train), len(data.val), len(data.test)) == (12, 6, 9) and data.classes == CLASSES
    assert data.test_files is None and data.train.images.shape[1:] == (3, 16, 16)
    means = as_tensor(data.test.images).float().mean(dim=(2, 3))
    assert (means.argmax(1) == data.test.labels).all()  # pixels and labels stay together
    assert Path(data.store).is_file()
    assert same(load(f"hf:{tmp_path / 'hfd'}").train, data.train)  # the second time from the store


def test_hf_data_file_without_test_split_gets_a_carved_one(tmp_path):
    rng = np.random.default_rng(0)
    hf_split(15, rng).to_parquet(str(tmp_path / "train.parquet"))
    data = load(f"hf:{tmp_path / 'train.parquet'}", test_fraction=0.2, seed=0)
    assert len(data.test) == 3 and len(data.train) == 12 and data.val is None
    assert len(data.test_files) == 3 and all(f.startswith("train[") for f in data.test_files)


def test_hf_columns_named_when_the_features_do_not_say(tmp_path):
    rng = np.random.default_rng(0)
    ds = hf_split(12, rng, string_labels=True, second_image=True)
    datasets.DatasetDict({"train": ds, "test": hf_split(6, rng, string_labels=True, second_image=True)}) \
        .save_to_disk(str(tmp_path / "hfd"))
    with pytest.raises(UserError, match="more than one Image column.*--image-column"):
        load(f"hf:{tmp_path / 'hfd'}")
    with pytest.raises(UserError, match="no ClassLabel column.*--label-column"):
        load(f"hf:{tmp_path / 'hfd'}", image_column="picture")
    with pytest.raises(UserError, match="no column 'knd'.*Did you mean: kind"):
        load(f"hf:{tmp_path / 'hfd'}", image_column="picture", label_column="knd")
    data = load(f"hf:{tmp_path / 'hfd'}", image_column="picture", label_column="kind")
    assert data.classes == CLASSES and len(data.test) == 6


def test_hf_unlabelled_test_rows_and_unknown_names_are_clear_errors(tmp_path):
    rng = np.random.default_rng(0)
    test = hf_split(3, rng).cast_column("kind", datasets.Value("int64")).map(lambda r: {"kind": -1})
    train = hf_split(6, rng).cast_column("kind", datasets.Value("int64"))
    datasets.DatasetDict({"train": train.cast_column("kind", datasets.ClassLabel(names=CLASSES)),
                          "test": test.cast_column("kind", datasets.ClassLabel(names=CLASSES))}) \
        .save_to_disk(str(tmp_path / "hfd"))
    with pytest.raises(UserError, match="row 0 of the test split has no label"):
        load(f"hf:{tmp_path / 'hfd'}")
    with pytest.raises(UserError, match="hf:nobody/nothing: cannot load it.*Hugging Face cache"):
        load("hf:nobody/nothing")  # HF_HUB_OFFLINE=1 (conftest): never the network


# ------------------------------------------------------------------------------------ the store on disk

def test_store_round_trip_streams_in_and_reads_rows_back(tmp_path):
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (10, 3, 4, 5), dtype=np.uint8))
    path = tmp_path / "s.store"
    with StoreWriter(path, 10, (3, 4, 5), {"source": "test"}) as w:
        w.begin("train", ["a", "b"])
        w.add(x[:3], [0, 1, 0])
        for i in range(3, 7):
            w.add_hwc(x[i].permute(1, 2, 0).numpy(), i % 2)  # one decoded (H, W, 3) image
        w.begin("test", ["a", "b"])
        w.add(x[7:], [1, 1, 0])
        sets = w.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.store"]  # the partial file was renamed into place
    store = Store(path)
    assert store.header["source"] == "test" and store.labels.tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 1, 0]
    train, test = sets["train"], sets["test"]
    assert isinstance(train.images, DiskImages) and len(train) == 7 and len(test) == 3
    d = test.images
    assert torch.equal(d[0], x[7]) and torch.equal(d[1:], x[8:]) and torch.equal(d[torch.tensor([2, 0])], x[[9, 7]])
    assert torch.equal(d[torch.tensor([True, False, True])], x[[7, 9]]) and torch.equal(d[:, 1, 2], x[7:, 1, 2])
    assert torch.equal(d[..., ::2], x[7:, ..., ::2]) and torch.equal(torch.stack(list(d)), x[7:])
    assert d.shape == (3, 3, 4, 5) and d.numel() == 180 and d.to("cpu").equal(x[7:])
    sub = train.subset(torch.tensor([6, 2]))
    assert isinstance(sub.images, DiskImages) and torch.equal(as_tensor(sub.images), x[[6, 2]])
    assert sub.labels.tolist() == [0, 0]
    for rows in (1, 4):  # the store's bytes hash as the tensor's, a chunk at a time
        h1, h2 = hashlib.sha256(), hashlib.sha256()
        update_hash(h1, train.images, rows=rows)
        t = x[:7].reshape(-1)
        h2.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h2.update(t.numpy().data)
        assert h1.hexdigest() == h2.hexdigest()


def test_an_unfinished_store_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError):
        with StoreWriter(tmp_path / "s.store", 4, (3, 2, 2)) as w:
            w.begin("train", ["a"])
            w.add(np.zeros((2, 3, 2, 2), np.uint8), [0, 0])
            raise RuntimeError("decoding failed")
    assert not any(tmp_path.iterdir())


def resident_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no /proc/self/status")


def test_reading_rows_leaves_them_in_the_page_cache_not_in_the_process(tmp_path):
    path = tmp_path / "s.store"
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (512, 3, 64, 64), dtype=np.uint8)  # 6 MB
    with StoreWriter(path, 512, (3, 64, 64)) as w:
        w.begin("train", ["a"])
        w.add(x, [0] * 512)
        w.finish()
    d = Store(path).images()
    before = resident_file_kb()
    for _ in range(3):
        order = rng.permutation(512)
        for start in range(0, 512, 64):
            rows = order[start:start + 64]
            assert np.array_equal(d[torch.from_numpy(rows)].numpy(), x[rows])
    assert resident_file_kb() - before < 1024  # not even a sixth of the 6 MB read three times


def test_a_store_truncated_while_in_use_is_a_clear_error(tmp_path):
    path = tmp_path / "s.store"
    with StoreWriter(path, 4, (3, 8, 8)) as w:
        w.begin("train", ["a"])
        w.add(np.zeros((4, 3, 8, 8), np.uint8), [0] * 4)
        w.finish()
    d = Store(path).images()
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match="ended early"):
        d[3]


def test_a_truncated_store_is_rebuilt_with_a_warning(folder, caplog):
    first = load(f"folder:{folder}")
    pixels, path = as_tensor(first.train.images), Path(first.store)
    path.write_bytes(path.read_bytes()[:100])
    again = load(f"folder:{folder}")
    assert "is unreadable" in caplog.text and torch.equal(as_tensor(again.train.images), pixels)


def test_decoding_streams_with_bounded_work_in_flight():
    pulled = []

    def items():
        for i in range(100):
            pulled.append(i)
            yield i

    out = ordered_map(lambda i: i * i, items(), workers=2, window=4)
    assert [next(out) for _ in range(3)] == [0, 1, 4]
    assert len(pulled) <= 3 + 4  # never the whole input at once
    assert list(out) == [i * i for i in range(3, 100)]


def test_disk_backed_splits_stay_lazy_and_batch_like_tensors(folder):
    data = load(f"folder:{folder}")
    splits = make_splits(data, val_fraction=0.25, train_subset=12, seed=0)
    assert all(isinstance(s.images, DiskImages) for s in (splits.train, splits.val, splits.test))
    memory = Dataset(*(ImageSet(as_tensor(s.images), s.labels, s.classes) for s in (data.train, data.test)))
    in_memory = make_splits(memory, val_fraction=0.25, train_subset=12, seed=0)
    assert fingerprint(splits) == fingerprint(in_memory)
    cpu = torch.device("cpu")
    a = list(Batches(splits.train, None, cpu).iterate(5, shuffle=True, generator=torch.Generator().manual_seed(0)))
    b = list(Batches(in_memory.train, None, cpu).iterate(5, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_a_store_that_does_not_fit_on_disk_is_refused_before_decoding(folder, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UserError, match=r"need .* which has 1.00 KB free: .*TRANSFERBENCH_CACHE"):
        load(f"folder:{folder}")


def test_a_partial_store_left_by_a_killed_process_is_swept(folder, tmp_path):
    import os
    import time

    decoded = tmp_path / "cache" / "decoded"
    decoded.mkdir(parents=True)
    old, fresh = decoded / ".abc.store.123.456.tmp", decoded / ".def.store.789.1.tmp"
    for f in (old, fresh):
        f.write_bytes(b"half")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    load(f"folder:{folder}")
    assert not old.exists() and fresh.exists()  # one still being written (by another process) is left alone


def test_csv_with_train_and_val_rows_only_gets_a_carved_test_split(folder):
    rows = [r for r in folder_rows(folder) if r[2] == "train"]
    for r in rows[::4]:
        r[2] = "val"
    data = load(f"csv:{write_csv(folder / 'l.csv', rows)}", test_fraction=0.25)
    assert len(data.val) == 9 and len(data.train) + len(data.test) == 27 and len(data.test_files) == len(data.test)
