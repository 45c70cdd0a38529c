"""Bad or unusual input, one class of defect per test: nothing lost, nothing silently wrong, one clear
message (exit 2, no traceback) where a run cannot go on."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_folder
from transferbench import UserError
from transferbench.data import Dataset, load_dataset, make_splits
from transferbench.models import create_model

BASE = ["--image-size", "16", "--batch-size", "8", "--no-progress", "--workers", "1", "--epochs", "1"]


def one_error(cli_run, *argv, match: str):
    code, out, err = cli_run(*argv)
    assert code == 2, (out, err)
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("transferbench: error: "), err
    assert match in err, err
    return err


def scratch_run(folder, out_dir, *extra):
    return ["run", "--dataset", f"folder:{folder}", "--model", "simple_cnn", "--strategy", "scratch",
            "--output-dir", out_dir, *BASE, *extra]


# ------------------------------------------------------------------------------ data loss

@pytest.mark.parametrize("breakage", ["unreadable image", "weights that do not fit", "diverging run"])
def test_overwrite_keeps_the_finished_run_until_the_new_one_succeeds(folder, tmp_path, cli_run, monkeypatch, breakage):
    runs = tmp_path / "runs"
    args = ["run", "--dataset", f"folder:{folder}", "--model", "resnet18", "--no-pretrained", "--strategy", "full",
            "--output-dir", runs, "--name", "r", *BASE]
    assert cli_run(*args)[0] == 0
    run_dir = runs / "r"
    (run_dir / "model.onnx").write_bytes(b"an export of the old model")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    extra = []
    if breakage == "unreadable image":
        (folder / "train" / "alpha" / "0003.jpg").write_bytes(b"not a jpeg")
    elif breakage == "weights that do not fit":
        torch.save(create_model("resnet34", 10).model.state_dict(), tmp_path / "r34.pth")
        extra = ["--weights", tmp_path / "r34.pth"]
        args[args.index("--no-pretrained")] = "--no-augment"
    else:
        import torch.nn.functional as F

        real = F.cross_entropy
        monkeypatch.setattr(F, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    code, _, err = cli_run(*args, *extra, "--overwrite")
    assert code == 2 and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    assert sorted(p.name for p in runs.iterdir()) == ["r"]  # no staging directory left behind


def test_overwrite_replaces_every_file_of_the_old_run(folder, tmp_path, cli_run):
    runs = tmp_path / "runs"
    assert cli_run(*scratch_run(folder, runs, "--name", "r"))[0] == 0
    (runs / "r" / "model.onnx").write_bytes(b"an export of the old model")
    (runs / "r" / "model.onnx.json").write_text("{}")
    old = (runs / "r" / "summary.json").read_text()
    assert cli_run(*scratch_run(folder, runs, "--name", "r", "--seed", "1", "--overwrite"))[0] == 0
    names = sorted(p.name for p in (runs / "r").iterdir())
    assert "model.onnx" not in names and "model.onnx.json" not in names and "summary.json" in names
    assert (runs / "r" / "summary.json").read_text() != old
    assert json.loads((runs / "r" / "config.json").read_text())["seed"] == 1


# ------------------------------------------------------------------------------ silently wrong

def test_gif_and_nested_images_are_read_and_other_files_are_named(tmp_path, caplog):
    root = make_folder(tmp_path / "d")
    (root / "train" / "alpha" / "more" / "deeper").mkdir(parents=True)
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(root / "train" / "alpha" / "more" / "deeper" / "x.png")
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(root / "train" / "beta" / "y.gif")
    (root / "train" / "beta" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="transferbench"):
        loaded = load_dataset(f"folder:{root}", None, storage_size=16, workers=1)
        train, _ = loaded.train, loaded.test
    assert len(train) == 12 * 3 + 2
    assert "skipped 1 file(s)" in caplog.text and "notes.txt" in caplog.text
    gif = train.images[train.labels == 1].float().mean(dim=(1, 2, 3))
    assert (gif > 190).any()  # the GIF's near-white pixels are there


def test_sixteen_bit_png_keeps_its_brightness(tmp_path):
    root = make_folder(tmp_path / "d")
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(root / "train" / "alpha" / "grey16.png")
    loaded = load_dataset(f"folder:{root}", None, storage_size=16, workers=1)
    train, _ = loaded.train, loaded.test
    grey = [img for img in train.images if (img == 128).all()]
    assert len(grey) == 1  # mid-grey stays mid-grey (PIL's convert("RGB") alone makes it 255, white)


def splits_of(root, **kw):
    loaded = load_dataset(f"folder:{root}", None, storage_size=16, workers=1)
    train, test = loaded.train, loaded.test
    return make_splits(Dataset(train, test), **{"val_fraction": 0.25, "train_subset": None, "seed": 0, **kw})


def test_a_class_without_validation_images_is_an_error(tmp_path):
    root = make_folder(tmp_path / "d", train_per_class=3)
    for f in sorted((root / "train" / "beta").iterdir())[1:]:
        f.unlink()
    with pytest.raises(UserError, match=r"at least 2 training images .*beta \(1\)"):
        splits_of(root)


def test_train_subset_must_leave_every_class_an_image(tmp_path):
    root = make_folder(tmp_path / "d")
    with pytest.raises(UserError, match="smaller than the number of classes"):
        splits_of(root, train_subset=2)
    assert len(splits_of(root, train_subset=3).train) == 3


def test_one_class_dataset_is_refused(tmp_path, cli_run):
    root = make_folder(tmp_path / "d", classes=["only"])
    one_error(cli_run, *scratch_run(root, tmp_path / "runs"), match="at least 2 classes")


def test_resume_refuses_changed_data(folder, tmp_path, cli_run, monkeypatch):
    from transferbench import training

    args = scratch_run(folder, tmp_path / "runs", "--epochs", "2")
    monkeypatch.setattr(training, "after_epoch", lambda e: (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli_run(*args)[0] == 130
    monkeypatch.setattr(training, "after_epoch", lambda e: None)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "train" / "gamma" / "0001.png")
    one_error(cli_run, *args, "--resume", match="changed since the run started")


def test_report_counts_a_copied_run_once(tmp_path, cli_run, folder, caplog):
    import shutil

    runs = tmp_path / "runs"
    assert cli_run(*scratch_run(folder, runs, "--name", "a"))[0] == 0
    shutil.copytree(runs / "a", runs / "b")
    assert cli_run("report", runs)[0] == 0
    table = [line for line in (runs / "report.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 3 and not any("±" in line or "seeds" in line for line in table), table
    assert "repeats" in caplog.text


def test_duplicate_keys_in_a_study_file(folder, tmp_path, cli_run):
    path = tmp_path / "s.yaml"
    path.write_text(f"options:\n  dataset: folder:{folder}\n  epochs: 1\n  epochs: 5\ngrid:\n  seed: [0]\n")
    one_error(cli_run, "study", path, "--dry-run", match="'epochs' is given twice")


@pytest.mark.parametrize("name, head", [("mobilenet_v2", "classifier.1"), ("timm:test_efficientnet", "classifier")])
def test_linear_probe_head_sees_the_cached_features_with_dropout_before_it(name, head):
    """MobileNetV2 has a Dropout module before its head; timm applies drop_rate functionally in forward_head.
    Under a head-only phase neither is active, so training sees exactly what the feature cache stores."""
    from transferbench.features import extract_features
    from transferbench.images import ImageSet
    from transferbench.preprocess import Preprocess
    from transferbench.strategies import apply_trainable, parse_strategy, set_train_mode

    torch.manual_seed(0)
    bundle = create_model(name, 3)
    if name.startswith("timm:"):
        bundle.model.drop_rate = 0.5
    images = ImageSet(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.arange(4) % 3, list("abc"))
    prep = Preprocess(32, (0.5,) * 3, (0.5,) * 3, "bilinear", torch.device("cpu"), channels_last=False)
    cached = extract_features(bundle, images, prep, torch.device("cpu"), 4, progress=False)
    phase = parse_strategy("linear-probe").phases(bundle.model, bundle.head, 1, 1, 1.0)[0]
    assert bundle.head == head and phase.head_only(head)
    apply_trainable(bundle.model, phase.trainable)
    set_train_mode(bundle.model, head_only=head)
    seen = []
    hook = bundle.model.get_submodule(head).register_forward_pre_hook(lambda m, a: seen.append(a[0].flatten(1)))
    with torch.no_grad():
        bundle.model(prep(images.images))
    hook.remove()
    assert bundle.model.get_submodule(head).training
    assert torch.allclose(seen[0], cached, rtol=1e-5, atol=0)  # random-init features are tiny: relative
    set_train_mode(bundle.model)  # the old rule: a parameterless Dropout stayed in training mode
    with torch.no_grad():
        hook = bundle.model.get_submodule(head).register_forward_pre_hook(lambda m, a: seen.append(a[0].flatten(1)))
        bundle.model(prep(images.images))
        hook.remove()
    assert not torch.allclose(seen[1], cached, rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------ one clear message

@pytest.mark.parametrize("flag, value, match", [
    ("--seed", "-1", "--seed must be an integer from 0"), ("--seed", str(10**23), "--seed must be an integer from 0"),
    ("--warmup-epochs", "nan", "--warmup-epochs must be a finite number"),
    ("--warmup-epochs", "-1", "--warmup-epochs must be >= 0"),
    ("--weight-decay", "-0.1", "--weight-decay must be >= 0"),
    ("--lr", "inf", "--lr must be a finite number"), ("--name", "", "--name is empty"),
    ("--name", "a/b", "plain directory name")])
def test_bad_numbers_and_names(folder, tmp_path, cli_run, flag, value, match):
    one_error(cli_run, *scratch_run(folder, tmp_path / "runs", flag, value), match=match)


def test_unwritable_places(folder, tmp_path, cli_run, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    one_error(cli_run, *scratch_run(folder, tmp_path / "a-file"), match="--output-dir")
    one_error(cli_run, *scratch_run(folder, "/proc/transferbench-runs"), match="not a writable directory")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "taken").write_text("x")
    one_error(cli_run, *scratch_run(folder, tmp_path / "runs", "--name", "taken"), match="is a file")
    monkeypatch.setenv("TRANSFERBENCH_CACHE", str(tmp_path / "a-file"))
    one_error(cli_run, *scratch_run(folder, tmp_path / "runs"), match="TRANSFERBENCH_CACHE")
    monkeypatch.setenv("TRANSFERBENCH_CACHE", str(tmp_path / "cache"))
    assert cli_run(*scratch_run(folder, tmp_path / "runs"))[0] == 0
    one_error(cli_run, "report", tmp_path / "runs", "--out", tmp_path / "a-file", match="a-file")
    one_error(cli_run, "report", tmp_path / "runs", "--out", "/proc/transferbench-report", match="cannot write")
    one_error(cli_run, "export", tmp_path / "runs" / "imgs-simple_cnn-scratch-s0", "--out", "/proc/x/model.onnx",
              match="--out /proc/x is not a writable directory")


def test_corrupt_cache_files_are_rebuilt_with_a_warning(folder, tmp_path, cli_run):
    args = ["run", "--dataset", f"folder:{folder}", "--model", "resnet18", "--no-pretrained", "--strategy",
            "linear-probe", "--no-augment", "--output-dir", tmp_path / "runs", *BASE]
    assert cli_run(*args, "--name", "a")[0] == 0
    caches = [p for p in (tmp_path / "cache").rglob("*") if p.suffix in (".pt", ".store")]
    assert {p.parent.name for p in caches} == {"decoded", "features"}
    for p in caches:
        p.write_bytes(p.read_bytes()[:100])
    code, _, err = cli_run(*args, "--name", "b")
    assert code == 0 and err.count("is unreadable") == len(caches), err
    a = json.loads((tmp_path / "runs" / "a" / "summary.json").read_text())
    b = json.loads((tmp_path / "runs" / "b" / "summary.json").read_text())
    assert a["test_acc"] == b["test_acc"]


@pytest.mark.parametrize("content, match", [
    (b"just some text", "is a text file"), (b"\x93NUMPY\x01\x00v\x00", "is a NumPy .npy array"),
    ("whole model", "holds pickled Python objects"), ("directory", "is a directory"),
    ("nan", "NaN or infinite values in 1 tensor(s): conv1.weight")])
def test_weights_files_that_are_not_weights(folder, tmp_path, cli_run, content, match):
    path = tmp_path / "w.pth"
    if content == "whole model":
        torch.save(create_model("resnet18", 3).model, path)
    elif content == "directory":
        path.mkdir()
    elif content == "nan":
        state = create_model("resnet18", 3).model.state_dict()
        state["conv1.weight"][0, 0, 0, 0] = float("nan")
        torch.save(state, path)
    else:
        path.write_bytes(content)
    err = one_error(cli_run, "run", "--dataset", f"folder:{folder}", "--model", "resnet18", "--weights", path,
                    "--strategy", "linear-probe", "--output-dir", tmp_path / "runs", *BASE, match=match)
    assert "weights_only" not in err


def test_evaluate_after_the_data_moved_names_data_dir(folder, tmp_path, cli_run):
    assert cli_run(*scratch_run(folder, tmp_path / "runs", "--name", "r"))[0] == 0
    folder.rename(tmp_path / "moved")
    one_error(cli_run, "evaluate", tmp_path / "runs" / "r", match="--data-dir")
    code, out, err = cli_run("evaluate", tmp_path / "runs" / "r", "--data-dir", tmp_path / "moved")
    assert code == 0, err


def test_keep_going_survives_a_run_that_crashes(folder, tmp_path, cli_run, monkeypatch):
    from transferbench import training

    path = tmp_path / "s.yaml"
    path.write_text(f"options:\n  dataset: folder:{folder}\n  model: simple_cnn\n  strategy: scratch\n  epochs: 1\n"
                    f"  image_size: 16\n  batch_size: 8\n  workers: 1\n  val_fraction: 0.25\ngrid:\n  seed: [0, 1]\n")
    real = training.run

    def crash_seed_0(cfg, **kw):
        if cfg.seed == 0:
            raise RuntimeError("a bug")
        return real(cfg, **kw)

    monkeypatch.setattr(training, "run", crash_seed_0)
    code, out, err = cli_run("study", path, "--output-dir", tmp_path / "runs", "--no-progress", "--keep-going")
    assert code == 1 and "RuntimeError: a bug" in err and "1/2 runs complete" in out
