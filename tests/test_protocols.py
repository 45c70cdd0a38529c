"""The evaluation protocols as strategies (logreg, knn), few-shot training sets and refit, end to end on
tiny data: each writes the full record, and the test split is scored once."""
import json

import numpy as np
import torch

from conftest import make_folder

COMMON = ["--image-size", "16", "--batch-size", "8", "--no-progress", "--workers", "1", "--val-fraction", "0.25"]


def run_args(folder, tmp_path, strategy, *extra):
    return ["run", "--dataset", f"folder:{folder}", "--model", "resnet18", "--no-pretrained", "--strategy", strategy,
            "--output-dir", tmp_path / "runs", *COMMON, *extra]


def summary(tmp_path, name):
    return json.loads((tmp_path / "runs" / name / "summary.json").read_text())


def test_logreg_records_its_choice_and_installs_the_refit_head(folder, tmp_path, cli_run):
    code, out, err = cli_run(*run_args(folder, tmp_path, "logreg"))
    assert code == 0, err
    s = summary(tmp_path, "imgs-resnet18-logreg-s0")
    assert len(s["val_curve"]) == 45 and s["chosen_wd"] in [p["wd"] for p in s["val_curve"]]
    assert s["best_val_acc"] == max(p["val_acc"] for p in s["val_curve"])
    assert s["feature_cache"] is True and s["epochs"] == 0
    # model.pt holds the refit head: re-evaluating it reproduces the recorded test accuracy
    code, out, err = cli_run("evaluate", tmp_path / "runs" / "imgs-resnet18-logreg-s0")
    assert code == 0 and json.loads(out)["test_acc"] == s["test_acc"]
    predictions = np.load(tmp_path / "runs" / "imgs-resnet18-logreg-s0" / "predictions.npz")
    assert (predictions["topk_classes"][:, 0] == predictions["label"]).mean() == s["test_acc"]


def test_knn_shares_the_feature_cache_and_keeps_no_model_file(folder, tmp_path, cli_run):
    assert cli_run(*run_args(folder, tmp_path, "logreg"))[0] == 0
    cached = sorted(p.name for p in (tmp_path / "cache" / "features").iterdir())
    code, out, err = cli_run(*run_args(folder, tmp_path, "knn"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "cache" / "features").iterdir()) == cached  # one extraction
    s = summary(tmp_path, "imgs-resnet18-knn-s0")
    assert s["chosen_k"] in (10, 20, 100, 200) and [p["k"] for p in s["val_curve"]] == [10, 20, 100, 200]
    assert not (tmp_path / "runs" / "imgs-resnet18-knn-s0" / "model.pt").exists()
    code, out, err = cli_run("evaluate", tmp_path / "runs" / "imgs-resnet18-knn-s0")
    assert code == 2 and "knn run" in err and "predictions.npz" in err


def test_shots_train_on_exactly_k_images_per_class(folder, tmp_path, cli_run, monkeypatch):
    from transferbench import training

    seen = {}
    real = training.prepare

    def spy(cfg, **kw):
        exp = real(cfg, **kw)
        seen["labels"] = exp.splits.train.labels.clone()
        return exp

    monkeypatch.setattr(training, "prepare", spy)
    code, _, err = cli_run(*run_args(folder, tmp_path, "full", "--shots", "2", "--epochs", "1"))
    assert code == 0, err
    assert torch.bincount(seen["labels"]).tolist() == [2, 2, 2]
    assert summary(tmp_path, "imgs-resnet18-full-s0")["train_images"] == 6
    code, _, err = cli_run(*run_args(folder, tmp_path, "full", "--shots", "50", "--name", "too-many"))
    assert code == 2 and "fewer than 50" in err


def test_refit_trains_on_train_and_val_and_keeps_the_last_epoch(tmp_path, cli_run):
    root = make_folder(tmp_path / "d", train_per_class=8)
    code, _, err = cli_run("run", "--dataset", f"folder:{root}", "--model", "simple_cnn", "--strategy", "scratch",
                           "--epochs", "3", "--refit", "--output-dir", tmp_path / "runs", *COMMON)
    assert code == 0, err
    s = summary(tmp_path, "d-simple_cnn-scratch-s0")
    assert s["train_images"] == 24 and s["best_epoch"] == 3 and s["protocol"].startswith("refit")


def test_predict_classifies_files_folders_and_globs_and_reports_unreadable_ones(folder, tmp_path, cli_run):
    assert cli_run("run", "--dataset", f"folder:{folder}", "--model", "simple_cnn", "--strategy", "scratch",
                   "--epochs", "2", "--lr", "3e-3", "--output-dir", tmp_path / "runs", "--name", "r", *COMMON)[0] == 0
    run_dir = tmp_path / "runs" / "r"
    (tmp_path / "bad.png").write_bytes(b"not a png")
    code, out, err = cli_run("predict", run_dir, folder / "test" / "alpha", str(folder / "test" / "beta" / "*.png"),
                             tmp_path / "bad.png", "--top-k", "2")
    assert code == 0, err
    rows = [line.split(",") for line in out.strip().splitlines()]
    assert rows[0] == ["path", "class1", "prob1", "class2", "prob2", "error"]
    assert len(rows) == 1 + 6 + 3 + 1 and "1 of 10 images could not be read" in err
    bad = next(r for r in rows if r[0].endswith("bad.png"))
    assert bad[1] == "" and "cannot read image" in bad[-1]
    for r in rows[1:]:
        if r[1]:
            assert r[1] in ("alpha", "beta", "gamma") and 1 >= float(r[2]) >= float(r[4]) >= 0
    # the model's own answer for a test image equals what the run's evaluation predicted for it
    alpha = [r for r in rows[1:] if "/alpha/" in r[0]]
    assert sum(r[1] == "alpha" for r in alpha) >= 4  # colour-coded classes: the run learned them
    code, out, err = cli_run("predict", run_dir, tmp_path / "bad.png", "--out", tmp_path / "p.csv")
    assert code == 1 and (tmp_path / "p.csv").read_text().count("\n") == 2
