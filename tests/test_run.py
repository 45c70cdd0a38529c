"""`transferbench run` / `evaluate` end to end, in process, on tiny generated data."""
import json

import pytest
import torch

from conftest import make_folder, write_cifar
from transferbench import training
from transferbench.config import DEFAULT_LR
from transferbench.models import create_model

COMMON = ["--image-size", "16", "--batch-size", "8", "--no-progress", "--workers", "1", "--val-fraction", "0.25"]


def read_run(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, metrics


def test_run_writes_a_complete_record_and_evaluate_reproduces_it(folder, tmp_path, cli_run):
    code, out, err = cli_run("run", "--dataset", f"folder:{folder}", "--model", "simple_cnn", "--strategy", "scratch",
                             "--epochs", "3", "--output-dir", tmp_path / "runs", *COMMON)
    assert code == 0, err
    run_dir = tmp_path / "runs" / "imgs-simple_cnn-scratch-s0"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "confusion.csv", "confusion.png", "curves.png",
                                                         "metrics.jsonl", "model.pt", "per_class.png",
                                                         "predictions.npz", "summary.json"]
    summary, metrics = read_run(run_dir)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert set(metrics[0]) >= {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s",
                               "images_per_s"}
    assert 0 <= summary["test_acc"] <= 1 and summary["best_val_acc"] == max(m["val_acc"] for m in metrics)
    assert summary["best_epoch"] == 1 + max(range(3), key=lambda i: (metrics[i]["val_acc"], -i))
    for key in ("test_loss", "epochs", "trainable_params", "total_params", "train_time_s", "images_per_s",
                "peak_memory_mb",
                "model", "dataset", "strategy", "seed", "image_size", "num_classes", "device", "versions"):
        assert key in summary
    assert set(summary["versions"]) == {"python", "torch", "torchvision", "timm"}
    assert summary["trainable_params"] == summary["total_params"] and summary["test_images"] == 18
    config = json.loads((run_dir / "config.json").read_text())
    assert config["lr"] == DEFAULT_LR["adamw"][0] and config["image_size"] == 16 and config["pretrained"] is False
    assert config["bn_frozen"] is False  # the resolved defaults are recorded: from scratch, nothing to keep
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    code, out, err = cli_run("evaluate", run_dir)
    assert code == 0, err
    assert json.loads(out)["test_acc"] == summary["test_acc"]


def test_learns_the_task(tmp_path, cli_run):
    root = make_folder(tmp_path / "easy", train_per_class=40, test_per_class=20)
    code, _, err = cli_run("run", "--dataset", f"folder:{root}", "--model", "simple_cnn", "--strategy", "scratch",
                           "--epochs", "4", "--lr", "3e-3", "--output-dir", tmp_path / "runs", *COMMON)
    assert code == 0, err
    summary, _ = read_run(tmp_path / "runs" / "easy-simple_cnn-scratch-s0")
    assert summary["test_acc"] >= 0.9  # colour-coded classes: chance is 1/3


@pytest.fixture
def resnet_weights(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet18", 1000).model
    # Non-trivial running statistics, so "unchanged" below means something.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "r18.pth"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


@pytest.mark.parametrize("cache", ["--no-feature-cache", "--feature-cache"])
def test_linear_probe_changes_nothing_but_the_head(folder, tmp_path, cli_run, resnet_weights, cache):
    path, initial = resnet_weights
    augment = ["--no-augment"] if cache == "--feature-cache" else ["--augment"]
    code, _, err = cli_run("run", "--dataset", f"folder:{folder}", "--model", "resnet18", "--weights", path,
                           "--strategy", "linear-probe", "--epochs", "2", cache, *augment,
                           "--output-dir", tmp_path / "runs", *COMMON)
    assert code == 0, err
    run_dir = tmp_path / "runs" / "imgs-resnet18-linear-probe-s0"
    final = torch.load(run_dir / "model.pt", weights_only=False)["state_dict"]
    for k, v in final.items():
        if not k.startswith("fc."):
            assert torch.equal(v, initial[k]), f"{k} changed under linear-probe"  # weights and BN statistics
    assert not torch.equal(final["fc.weight"][:3], initial["fc.weight"][:3])
    summary, _ = read_run(run_dir)
    assert summary["trainable_params"] == 512 * 3 + 3 and summary["feature_cache"] is (cache == "--feature-cache")
    code, out, err = cli_run("evaluate", run_dir)
    assert json.loads(out)["test_acc"] == summary["test_acc"]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_two_phase_trains_head_then_everything(folder, tmp_path, cli_run, resnet_weights, monkeypatch, compiled):
    """Compiled too: a graph traced while the backbone was frozen must not keep it frozen in phase 2.
    aot_eager traces forward and backward as inductor does, without needing a C++ compiler."""
    path, initial = resnet_weights
    if compiled:
        real_compile = torch.compile
        monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend="aot_eager"))
    snapshots = {}
    real = training.after_epoch

    def snapshot(epoch):
        snapshots[epoch] = torch.load(tmp_path / "runs" / "imgs-resnet18-two-phase-s0" / "checkpoint.pt",
                                      weights_only=False, map_location="cpu")["model"]
        real(epoch)

    monkeypatch.setattr(training, "after_epoch", snapshot)
    code, _, err = cli_run("run", "--dataset", f"folder:{folder}", "--model", "resnet18", "--weights", path,
                           "--strategy", "two-phase", "--epochs", "3", "--head-epochs", "1", "--lr", "1e-2",
                           "--no-bn-frozen",  # phase 2 then moves the BatchNorm statistics too (phase 1 never does)
                           "--output-dir", tmp_path / "runs", *COMMON, *(["--compile"] if compiled else []))
    assert code == 0, err
    assert torch.equal(snapshots[1]["conv1.weight"], initial["conv1.weight"])
    assert torch.equal(snapshots[1]["bn1.running_mean"], initial["bn1.running_mean"])
    assert not torch.equal(snapshots[1]["fc.weight"][:3], initial["fc.weight"][:3])
    assert not torch.equal(snapshots[2]["conv1.weight"], initial["conv1.weight"])
    assert not torch.equal(snapshots[2]["bn1.running_mean"], initial["bn1.running_mean"])
    _, metrics = read_run(tmp_path / "runs" / "imgs-resnet18-two-phase-s0")
    assert [m["phase"] for m in metrics] == [0, 1, 1]


def test_bn_frozen_trains_batchnorm_weights_but_keeps_its_statistics(folder, tmp_path, cli_run, resnet_weights):
    path, initial = resnet_weights
    code, _, err = cli_run("run", "--dataset", f"folder:{folder}", "--model", "resnet18", "--weights", path,
                           "--strategy", "full", "--bn-frozen", "--epochs", "1", "--lr", "1e-2",
                           "--output-dir", tmp_path / "runs", *COMMON)
    assert code == 0, err
    final = torch.load(tmp_path / "runs" / "imgs-resnet18-full-s0" / "model.pt", weights_only=False)["state_dict"]
    for k, v in final.items():
        if "running_" in k:
            assert torch.equal(v, initial[k]), f"{k} changed under --bn-frozen"
    assert not torch.equal(final["bn1.weight"], initial["bn1.weight"])
    assert not torch.equal(final["conv1.weight"], initial["conv1.weight"])


def test_zero_shot_evaluates_an_untrained_head(folder, tmp_path, cli_run, resnet_weights):
    path, _ = resnet_weights
    code, _, err = cli_run("run", "--dataset", f"folder:{folder}", "--model", "resnet18", "--weights", path,
                           "--strategy", "zero-shot", "--output-dir", tmp_path / "runs", *COMMON)
    assert code == 0, err
    summary, metrics = read_run(tmp_path / "runs" / "imgs-resnet18-zero-shot-s0")
    assert summary["epochs"] == 0 and summary["train_time_s"] == 0 and len(metrics) == 1


def test_resume_ends_exactly_like_an_uninterrupted_run(folder, tmp_path, cli_run, monkeypatch):
    args = ["run", "--dataset", f"folder:{folder}", "--model", "simple_cnn", "--strategy", "scratch", "--epochs", "3",
            "--warmup-epochs", "1", "--output-dir", tmp_path / "runs", *COMMON]
    assert cli_run(*args, "--name", "straight")[0] == 0

    def killed(epoch):
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "after_epoch", killed)
    code, _, err = cli_run(*args, "--name", "killed")
    assert code == 130 and "--resume" in err
    assert not (tmp_path / "runs" / "killed" / "summary.json").exists()
    code, _, err = cli_run(*args, "--name", "killed")
    assert code == 2 and "--resume" in err  # never silently overwritten
    monkeypatch.setattr(training, "after_epoch", lambda epoch: None)
    code, out, err = cli_run(*args, "--name", "killed", "--resume")
    assert code == 0, err
    assert "resuming" in out and "after epoch 2" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("epoch ")] == ["3/3"]  # only what was left
    a, ma = read_run(tmp_path / "runs" / "straight")
    b, mb = read_run(tmp_path / "runs" / "killed")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("epoch_time_s", "images_per_s")} for r in rows]
    assert strip(ma) == strip(mb)
    assert a["test_acc"] == b["test_acc"] and a["test_loss"] == b["test_loss"]
    sa = torch.load(tmp_path / "runs" / "straight" / "model.pt", weights_only=False)["state_dict"]
    sb = torch.load(tmp_path / "runs" / "killed" / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_nan_loss_stops_names_the_epoch_and_keeps_the_last_good_checkpoint(folder, tmp_path, cli_run, monkeypatch):
    import torch.nn.functional as F

    real = F.cross_entropy
    calls = {"n": 0}

    def poisoned(logits, target, **kw):  # training calls pass label_smoothing; poison from the 2nd epoch on
        loss = real(logits, target, **kw)
        if "label_smoothing" in kw:
            calls["n"] += 1
            if calls["n"] > 3:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(F, "cross_entropy", poisoned)
    code, _, err = cli_run("run", "--dataset", f"folder:{folder}", "--model", "simple_cnn", "--strategy", "scratch",
                           "--epochs", "3", "--output-dir", tmp_path / "runs", *COMMON)
    assert code == 2 and "NaN" in err and "epoch 2" in err and "Traceback" not in err
    run_dir = tmp_path / "runs" / "imgs-simple_cnn-scratch-s0"
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["epoch"] == 0
    assert not (run_dir / "summary.json").exists()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1


def test_cifar10_run_from_data_dir(tmp_path, cli_run, monkeypatch):
    root = write_cifar(tmp_path / "c10", "cifar10", monkeypatch)
    code, out, err = cli_run("run", "--dataset", "cifar10", "--data-dir", root, "--model", "simple_cnn",
                             "--strategy", "scratch", "--epochs", "1", "--output-dir", tmp_path / "runs", *COMMON)
    assert code == 0, err
    summary, _ = read_run(tmp_path / "runs" / "cifar10-simple_cnn-scratch-s0")
    assert summary["num_classes"] == 10 and summary["test_images"] == 30 and summary["image_size"] == 16


def test_last_n_trains_only_the_last_tensors(folder, tmp_path, cli_run, resnet_weights):
    path, initial = resnet_weights
    code, out, err = cli_run("run", "--dataset", f"folder:{folder}", "--model", "resnet18", "--weights", path,
                             "--strategy", "last-n:3", "--epochs", "1", "--lr", "1e-2", "--no-bn-frozen",
                             "--output-dir", tmp_path / "runs", *COMMON)
    assert code == 0, err
    final = torch.load(tmp_path / "runs" / "imgs-resnet18-last-n3-s0" / "model.pt", weights_only=False)["state_dict"]
    changed = {k for k, v in final.items() if not k.startswith("fc.") and not torch.equal(v, initial[k])}
    # The last 3 tensors: layer4.1.bn2.bias, fc.weight, fc.bias. bn2 trains and is not bn-frozen: its statistics move.
    assert changed == {"layer4.1.bn2.bias", "layer4.1.bn2.running_mean", "layer4.1.bn2.running_var",
                       "layer4.1.bn2.num_batches_tracked"}
