"""Every bad input exits non-zero with one clear message, no traceback, and writes nothing."""
import shutil

import pytest
import torch

from conftest import make_folder
from transferbench.models import create_model

BASE = ["--image-size", "16", "--batch-size", "8", "--no-progress", "--workers", "1", "--epochs", "1"]


def expect_error(cli_run, tmp_path, *argv, match: str):
    runs = tmp_path / "runs"
    code, out, err = cli_run("run", *argv, "--output-dir", runs, *BASE)
    assert code == 2, (out, err)
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("transferbench: error: "), err
    assert match in err, err
    assert not runs.exists() or not any(runs.iterdir()), "a failed start must leave no run directory behind"
    return err


def test_unknown_model_suggests(folder, tmp_path, cli_run):
    expect_error(cli_run, tmp_path, "--dataset", f"folder:{folder}", "--model", "resnet51", "--strategy", "full",
                 match="Did you mean: resnet51q, resnet50")


def test_unknown_dataset(tmp_path, cli_run):
    expect_error(cli_run, tmp_path, "--dataset", "cifar11", "--model", "simple_cnn", "--strategy", "scratch",
                 match="Did you mean: cifar10")


def test_unknown_strategy(folder, tmp_path, cli_run):
    expect_error(cli_run, tmp_path, "--dataset", f"folder:{folder}", "--model", "simple_cnn", "--strategy", "fine-tune",
                 match="unknown strategy 'fine-tune'")


def test_last_n_out_of_range(folder, tmp_path, cli_run):
    expect_error(cli_run, tmp_path, "--dataset", f"folder:{folder}", "--model", "simple_cnn", "--strategy", "last-n:0",
                 match="K >= 1")
    expect_error(cli_run, tmp_path, "--dataset", f"folder:{folder}", "--model", "simple_cnn", "--strategy", "last-n:99",
                 "--no-pretrained", match="more parameter tensors than the model has (10)")


@pytest.mark.parametrize("missing", ["train", "test"])
def test_folder_without_split(folder, tmp_path, cli_run, missing):
    shutil.rmtree(folder / missing)
    expect_error(cli_run, tmp_path, "--dataset", f"folder:{folder}", "--model", "simple_cnn", "--strategy", "scratch",
                 match=f"has no '{missing}/' directory")


def test_empty_class_folder(folder, tmp_path, cli_run):
    for f in (folder / "test" / "beta").iterdir():
        f.unlink()
    expect_error(cli_run, tmp_path, "--dataset", f"folder:{folder}", "--model", "simple_cnn", "--strategy", "scratch",
                 match=f"class folder {folder / 'test' / 'beta'} has no images")


def test_unreadable_image_is_named(folder, tmp_path, cli_run):
    bad = folder / "train" / "gamma" / "0003.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    expect_error(cli_run, tmp_path, "--dataset", f"folder:{folder}", "--model", "simple_cnn", "--strategy", "scratch",
                 match=f"cannot read image {bad}")


def test_mismatched_class_folders(tmp_path, cli_run):
    root = make_folder(tmp_path / "d")
    (root / "test" / "gamma").rename(root / "test" / "delta")
    expect_error(cli_run, tmp_path, "--dataset", f"folder:{root}", "--model", "simple_cnn", "--strategy", "scratch",
                 match="only in train: ['gamma']; only in test: ['delta']")


def test_weights_that_do_not_fit(folder, tmp_path, cli_run):
    torch.save(create_model("resnet18", 1000).model.state_dict(), tmp_path / "r18.pth")
    expect_error(cli_run, tmp_path, "--dataset", f"folder:{folder}", "--model", "resnet34", "--weights",
                 tmp_path / "r18.pth",
                 "--strategy", "linear-probe", match="does not fit torchvision model 'resnet34'")
    expect_error(cli_run, tmp_path, "--dataset", f"folder:{folder}", "--model", "resnet18", "--weights",
                 tmp_path / "nope.pth",
                 "--strategy", "linear-probe", match="no such file")


def test_bad_numbers(folder, tmp_path, cli_run):
    expect_error(cli_run, tmp_path, "--dataset", f"folder:{folder}", "--model", "simple_cnn", "--strategy", "scratch",
                 "--val-fraction", "1.5", match="--val-fraction must be between 0 and 1")
    expect_error(cli_run, tmp_path, "--dataset", f"folder:{folder}", "--model", "simple_cnn", "--strategy", "two-phase",
                 "--head-epochs", "3", match="--epochs must be larger")


def test_offline_pretrained_download_says_use_weights(folder, tmp_path, cli_run, monkeypatch):
    """The function torchvision really downloads weights through is made to fail as it does offline; the
    test never touches the network (and TORCH_HOME is a temporary directory, see conftest)."""
    import urllib.error

    import torchvision.models._api as tv_api

    calls = []

    def offline(url, *a, **k):
        calls.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    expect_error(cli_run, tmp_path, "--dataset", f"folder:{folder}", "--model", "resnet18", "--pretrained",
                 "--strategy", "linear-probe", match="--weights FILE")
    assert calls and calls[0].startswith("https://download.pytorch.org/models/resnet18")


def test_existing_complete_run_is_never_overwritten_silently(folder, tmp_path, cli_run):
    args = ["run", "--dataset", f"folder:{folder}", "--model", "simple_cnn", "--strategy", "scratch",
            "--output-dir", tmp_path / "runs", *BASE]
    assert cli_run(*args)[0] == 0
    summary = (tmp_path / "runs" / "imgs-simple_cnn-scratch-s0" / "summary.json").read_text()
    code, _, err = cli_run(*args)
    assert code == 2 and "already exists" in err
    code, _, err = cli_run(*args, "--resume")
    assert code == 2 and "already complete" in err
    assert (tmp_path / "runs" / "imgs-simple_cnn-scratch-s0" / "summary.json").read_text() == summary
    assert cli_run(*args, "--overwrite")[0] == 0


def test_evaluate_on_a_directory_that_is_not_a_run(tmp_path, cli_run):
    code, _, err = cli_run("evaluate", tmp_path)
    assert code == 2 and "has no model.pt" in err
