"""The fine-tuning recipe: batched augmentations, mixup/cutmix, layer-wise lr decay, the head's own learning
rate, EMA weights and LP-FT, each checked on tiny models and images."""
import json

import pytest
import torch

from transferbench import training
from transferbench.config import RunConfig
from transferbench.models import create_model
from transferbench.preprocess import Preprocess
from transferbench.training import build_optimizer

COMMON = ["--image-size", "16", "--batch-size", "8", "--no-progress", "--workers", "1", "--val-fraction", "0.25"]


def prep(policy, erasing=0.0, size=24):
    return Preprocess(size, (0.5,) * 3, (0.25,) * 3, "bilinear", torch.device("cpu"), channels_last=False,
                      policy=policy, random_erasing=erasing)


@pytest.mark.parametrize("policy", ["crop-flip", "rrc", "trivialaugment", "randaugment"])
@pytest.mark.parametrize("erasing", [0.0, 0.5])
def test_each_augmentation_keeps_shape_and_dtype_and_replays_under_its_seed(policy, erasing):
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    p = prep(policy, erasing)
    out = p(x, augment=True, generator=torch.Generator().manual_seed(3))
    assert out.shape == (6, 3, 24, 24) and out.dtype == torch.float32 and torch.isfinite(out).all()
    again = p(x, augment=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again)  # a resumed epoch replays the same draws
    other = p(x, augment=True, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(out, other)
    assert torch.equal(p(x), prep("none")(x))  # evaluation never augments


def test_random_resized_crop_draws_its_own_box_per_image():
    # one image repeated: identical inputs, different boxes
    x = torch.arange(16 * 16, dtype=torch.float32).view(1, 1, 16, 16).expand(8, 3, 16, 16).to(torch.uint8)
    out = prep("rrc", size=16).random_resized_crop(x, torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 16, 16)
    assert len({tuple(o[0, :, 8].round().tolist()) for o in out}) == 8
    # the whole image at scale 1, aspect 1 and no flip is the image itself (roi_align is exact on the grid)
    p = prep("rrc", size=16)
    full = p.random_resized_crop(x[:1], torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(full, x[:1].float(), atol=1e-3) or torch.allclose(full.flip(-1), x[:1].float(), atol=1e-3)


def test_mixup_and_cutmix_targets_are_distributions(folder, tmp_path, cli_run, monkeypatch):
    import transferbench.training as t

    seen = []
    real = t.SoftTargetCrossEntropy

    class Spy(real):
        def forward(self, x, target):
            seen.append(target.detach().clone())
            return super().forward(x, target)

    monkeypatch.setattr(t, "SoftTargetCrossEntropy", Spy)
    code, _, err = cli_run("run", "--dataset", f"folder:{folder}", "--model", "simple_cnn", "--strategy", "scratch",
                           "--epochs", "1", "--mixup", "0.4", "--cutmix", "1.0", "--output-dir", tmp_path / "runs",
                           *COMMON)
    assert code == 0, err
    assert seen and all(torch.allclose(t.sum(1), torch.ones(len(t))) for t in seen)
    assert any((t.max(1).values < 0.95).any() for t in seen)  # some targets really mixed (smoothing alone: 0.933)


def test_odd_batches_cannot_mix(folder, tmp_path, cli_run):
    code, _, err = cli_run("run", "--dataset", f"folder:{folder}", "--model", "simple_cnn", "--strategy", "scratch",
                           "--mixup", "0.2", "--output-dir", tmp_path / "runs", *COMMON[:2], "--batch-size", "7")
    assert code == 2 and "--batch-size must be even" in err


def test_layer_decay_and_head_lr_give_the_documented_group_rates():
    model = create_model("resnet18", 3).model
    cfg = RunConfig(model="resnet18", strategy="full", layer_decay=0.5, head_lr_scale=10.0, weight_decay=0.0)
    opt = build_optimizer(model, cfg, lr=1e-3, head="fc")
    rate = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            rate[names[id(p)]] = g["lr"]
    # stages conv1, bn1, layer1..4, fc (relu / maxpool / avgpool hold no parameters): fc is the top one
    stages = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]
    for name, lr in rate.items():
        depth = len(stages) - 1 - stages.index(name.split(".")[0])
        expected = 1e-3 * 0.5 ** depth * (10 if name.startswith("fc.") else 1)
        assert lr == pytest.approx(expected), name
    timm_model = create_model("timm:test_efficientnet", 3).model
    opt = build_optimizer(timm_model, RunConfig(layer_decay=0.5, head_lr_scale=1.0, weight_decay=0.0), lr=1.0)
    rates = sorted({g["lr"] for g in opt.param_groups})
    assert rates[-1] == 1.0 and rates[0] < 0.1 and all(b / a == pytest.approx(2.0) for a, b in zip(rates, rates[1:]))


def test_default_head_rate_is_ten_times_when_pretrained_layers_train_too():
    assert RunConfig(strategy="full").resolved().head_lr_scale == 10.0
    assert RunConfig(strategy="last-n:3").resolved().head_lr_scale == 10.0
    assert RunConfig(strategy="linear-probe").resolved().head_lr_scale == 1.0
    assert RunConfig(strategy="two-phase").resolved().head_lr_scale == 1.0


def test_defaults_follow_the_measured_sweep():
    """studies/cpu-cifar10-defaults-sweep.yaml chose AdamW 3e-3 for a new head (or from scratch), 3e-4 for pretrained
    layers, and BatchNorm statistics frozen wherever pretrained layers train; explicit options win."""
    rows = {"linear-probe": (3e-3, False), "two-phase": (3e-3, True), "scratch": (3e-3, False),
            "full": (3e-4, True), "last-n:3": (3e-4, True)}
    for strategy, (lr, bn_frozen) in rows.items():
        c = RunConfig(strategy=strategy, model="resnet18").resolved()
        assert (c.lr, c.bn_frozen) == (lr, bn_frozen), strategy
    assert RunConfig(strategy="full", pretrained=False).resolved().bn_frozen is False  # nothing pretrained to keep
    assert RunConfig(strategy="full", bn_frozen=False, lr=1e-2).resolved().bn_frozen is False
    assert RunConfig(strategy="full", optimizer="sgd").resolved().lr == 0.01
    assert RunConfig(strategy="linear-probe", optimizer="adam").resolved().lr == 1e-3


def test_ema_weights_are_selected_like_raw_ones_and_saved_when_they_win(folder, tmp_path, cli_run, monkeypatch):
    snapshots = {}
    real = training.end_epoch

    def spy(exp, state, done, row):
        real(exp, state, done, row)
        snapshots[row["epoch"]] = ({k: v.clone() for k, v in exp.learner.state_dict().items()},
                                   {k: v.clone() for k, v in exp.ema.module.state_dict().items()})

    monkeypatch.setattr(training, "end_epoch", spy)
    code, _, err = cli_run("run", "--dataset", f"folder:{folder}", "--model", "simple_cnn", "--strategy", "scratch",
                           "--epochs", "3", "--ema", "0.5", "--lr", "3e-3", "--output-dir", tmp_path / "runs",
                           "--name", "r", *COMMON)
    assert code == 0, err
    run_dir = tmp_path / "runs" / "r"
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("val_acc_ema" in m for m in metrics)
    raw, ema = snapshots[summary["best_epoch"]]
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # the EMA is not a copy of the raw weights
    saved = torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]
    winner = ema if summary["ema_selected"] else raw
    assert all(torch.equal(saved[k], winner[k]) for k in saved)
    best = max(max(m["val_acc"], m["val_acc_ema"]) for m in metrics)
    assert summary["best_val_acc"] == best


def test_a_resumed_run_with_the_whole_recipe_ends_exactly_as_an_uninterrupted_one(folder, tmp_path, cli_run,
                                                                                monkeypatch):
    args = ["run", "--dataset", f"folder:{folder}", "--model", "simple_cnn", "--strategy", "scratch", "--epochs", "3",
            "--augment", "rrc", "--mixup", "0.4", "--cutmix", "1.0", "--random-erasing", "0.3", "--ema", "0.8",
            "--output-dir", tmp_path / "runs", *COMMON]
    assert cli_run(*args, "--name", "straight")[0] == 0

    def killed(epoch):
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "after_epoch", killed)
    assert cli_run(*args, "--name", "resumed")[0] == 130
    monkeypatch.setattr(training, "after_epoch", lambda epoch: None)
    assert cli_run(*args, "--name", "resumed", "--resume")[0] == 0
    runs = tmp_path / "runs"

    def strip(name):
        rows = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "images_per_s")} for r in rows]

    assert strip("straight") == strip("resumed")
    a = torch.load(runs / "straight" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(runs / "resumed" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lp_ft_starts_fine_tuning_from_the_logreg_head(folder, tmp_path, cli_run, monkeypatch):
    heads = {}
    real = training.start_phase

    def spy(exp, phase):
        heads["start"] = exp.model.fc.weight.detach().clone()
        return real(exp, phase)

    monkeypatch.setattr(training, "start_phase", spy)
    torch.manual_seed(0)
    torch.save(create_model("resnet18", 1000).model.state_dict(), tmp_path / "r18.pth")
    code, _, err = cli_run("run", "--dataset", f"folder:{folder}", "--model", "resnet18", "--weights",
                           tmp_path / "r18.pth", "--strategy", "two-phase", "--head-init", "logreg", "--epochs", "1",
                           "--output-dir", tmp_path / "runs", "--name", "lpft", *COMMON)
    assert code == 0, err
    summary = json.loads((tmp_path / "runs" / "lpft" / "summary.json").read_text())
    assert summary["head_init_wd"] > 0 and summary["epochs"] == 1
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "lpft" / "metrics.jsonl").read_text().splitlines()]
    assert [m["phase"] for m in metrics] == [1]  # every epoch fine-tunes everything
    fresh = create_model("resnet18", 3).model.fc.weight  # what an untrained head would look like (other seed)
    assert heads["start"].abs().max() > fresh.abs().max()  # fitted, not freshly initialised
    code, _, err = cli_run("run", "--dataset", f"folder:{folder}", "--model", "resnet18", "--weights",
                           tmp_path / "r18.pth", "--strategy", "full", "--head-init", "logreg",
                           "--output-dir", tmp_path / "runs", *COMMON)
    assert code == 2 and "no head phase" in err
