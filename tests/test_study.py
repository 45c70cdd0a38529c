"""`transferbench study`: a study file is checked, planned, run, skipped when done and resumed when killed;
every shipped study passes --dry-run, and a shrunken copy of each runs end to end."""
import json
import logging
import re
from pathlib import Path

import pytest
import torch

from conftest import make_folder, write_cifar
from transferbench import training
from transferbench.report import write_report
from transferbench.results import load_runs, selection_results
from transferbench.study import load_study, run_study

REPO = Path(__file__).resolve().parents[1]
STUDIES = sorted((REPO / "studies").glob("*.yaml"))
TINY = """\
options:
  dataset: folder:{folder}
  model: simple_cnn
  image_size: 8
  batch_size: 8
  workers: 1
  val_fraction: 0.25
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("nothing may run here")
    monkeypatch.setattr(training, "run", refuse)


def study_file(tmp_path, folder, body, name="s.yaml"):
    path = tmp_path / name
    path.write_text(TINY.format(folder=folder) + body)
    return path


def test_dry_run_prints_one_line_per_run_and_runs_nothing(folder, tmp_path, cli_run, no_training):
    path = study_file(tmp_path, folder, """\
grid:
  strategy: [scratch, full]
  seed: [0, 1]
variants:
  short: {epochs: 1}
  long: {epochs: [2, 3], lr: 3.0e-3}
""")
    code, out, err = cli_run("study", path, "--dry-run", "--output-dir", tmp_path / "runs")
    assert code == 0, err
    lines = [l for l in out.splitlines() if re.match(r"\s+\d+\s+new\s", l)]
    names = [l.split()[2] for l in lines]
    assert len(lines) == 12 and len(set(names)) == 12
    assert "short/imgs-simple_cnn-scratch-s0" in names and "long/imgs-simple_cnn-full-s1-e3" in names
    long3 = next(l for l in lines if "long/imgs-simple_cnn-full-s1-e3" in l)
    assert "strategy=full" in long3 and "epochs=3" in long3 and "lr=0.003" in long3 and "seed=1" in long3
    assert "nothing was run" in out
    assert not (tmp_path / "runs").exists()


BAD = [  # (what the file says, what the error must name)
    ("option: {epochs: 1}\ngrid: {seed: [0]}\n", ["unknown top-level key 'option'"]),
    ("grid: {epoch: [1, 2]}\n", ["grid: unknown key 'epoch'", "epochs"]),
    ("grid: {seed: [0]}\nvariants:\n  a: {stratgy: full}\n", ["variants.a: unknown key 'stratgy'", "strategy"]),
    ("grid: {epochs: [1, many]}\n", ["grid.epochs", "integer", "'many'"]),
    ("grid: {lr: [0.1, -1]}\n", ["grid.lr", "--lr must be > 0"]),
    ("grid: {strategy: [full, last-n:x]}\n", ["grid.strategy", "last-n"]),
    ("grid: {strategy: [full, two-phase], epochs: [1]}\n", ["grid.epochs", "two-phase", "--epochs must be larger"]),
    ("grid: {}\n", ["grid is empty"]),
    ("grid:\n", ["grid is empty"]),
    ("grid: {seed: []}\n", ["grid.seed", "empty"]),
    ("grid: {seed: 3}\n", ["grid.seed", "list"]),
    ("grid: {seed: [0, 0]}\n", ["grid.seed", "twice"]),
    ("grid: {seed: [0]}\nvariants:\n  a: {dataset: folder:nowhere}\n", ["variants.a.dataset", "nowhere"]),
    ("grid: {seed: [0]}\nvariants:\n  a: {model: [simple_cnn, 'tv:no_such_net']}\n", ["variants.a.model",
                                                                                      "no_such_net"]),
    ("grid: {output_dir: [x]}\n", ["'output_dir' cannot be set"]),
    ("grid: {seed: [0]}\nreferences:\n  - {match: {strategy: full}, value: 50}\n", ["references[0].match", "matches "
                                                                                                           "none"]),
    ("grid: {seed: [0]}\nreferences:\n  - {match: {seed: 0}, value: 150}\n", ["references[0].value"]),
    ("grid: {seed: [0, 1]}\nselect: {among: {seed: [0, 1]}, by: test_acc}\n", ["select.by"]),
    ("grid: {seed: [0, 1]}\nselect: {among: {seed: 0}}\n", ["select.among", "at least two"]),
    ("grid: {seed: [0]}\ndataset_labels: {cifar10: CIFAR-10}\n", ["dataset_labels", "'cifar10'"]),
]


@pytest.mark.parametrize("body,expected", BAD, ids=[b[1][0] for b in BAD])
def test_bad_study_files_are_rejected_before_anything_runs(folder, tmp_path, cli_run, no_training, body, expected):
    path = study_file(tmp_path, folder, body)
    code, out, err = cli_run("study", path, "--output-dir", tmp_path / "runs")
    assert code == 2 and err.startswith(f"transferbench: error: {path}: "), err
    for text in expected:
        assert text in err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def test_missing_and_malformed_files(tmp_path, cli_run, no_training):
    code, _, err = cli_run("study", tmp_path / "nope.yaml")
    assert code == 2 and "nope.yaml does not exist" in err
    (tmp_path / "bad.yaml").write_text("grid: [unclosed\n")
    code, _, err = cli_run("study", tmp_path / "bad.yaml")
    assert code == 2 and "bad.yaml: not valid YAML" in err


def read(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [{k: v for k, v in json.loads(l).items() if k not in ("epoch_time_s", "images_per_s")}
               for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, metrics


def test_rerun_skips_complete_runs_and_resumes_the_interrupted_one(folder, tmp_path, cli_run, monkeypatch):
    path = study_file(tmp_path, folder, "  strategy: scratch\n  epochs: 2\ngrid:\n  seed: [0, 1]\n")
    out_dir = tmp_path / "runs"
    calls = []

    def killed_in_the_second_run(epoch):
        calls.append(epoch)
        if len(calls) == 3:  # seed 0: epochs 1, 2; seed 1: killed after its first epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "after_epoch", killed_in_the_second_run)
    code, out, err = cli_run("study", path, "--output-dir", out_dir)
    assert code == 130 and "run the same command again" in err
    assert "study s: 0/2 runs" in err  # the overall progress bar, above the run's own
    assert "[study s] 1/2 runs done" in out and "left; starting imgs-simple_cnn-scratch-s1" in out
    first, second = out_dir / "s" / "imgs-simple_cnn-scratch-s0", out_dir / "s" / "imgs-simple_cnn-scratch-s1"
    assert (first / "summary.json").exists() and (second / "checkpoint.pt").exists()
    assert not (second / "summary.json").exists()
    assert json.loads((out_dir / "s" / "study.json").read_text())["runs"][1]["name"] == second.name

    monkeypatch.setattr(training, "after_epoch", lambda epoch: None)
    code, out, err = cli_run("study", path, "--dry-run", "--output-dir", out_dir)
    assert code == 0 and re.search(r"1\s+done\s+imgs-simple_cnn-scratch-s0", out) and "resume@1" in out

    finished_before = (first / "summary.json").read_bytes()
    started = []
    real_run = training.run
    monkeypatch.setattr(training, "run", lambda cfg, **kw: started.append((cfg.name, kw["resume"])) or real_run(cfg,
                                                                                                                **kw))
    code, out, err = cli_run("study", path, "--output-dir", out_dir, "--no-progress")
    assert code == 0, err
    assert started == [(second.name, True)]
    assert "1 of 2 runs already complete, skipped" in out and "resuming" in out
    assert (first / "summary.json").read_bytes() == finished_before

    # The resumed run ends exactly as one that was never interrupted.
    straight = load_study(path, tmp_path / "straight").runs[1].config
    real_run(straight, progress=False)
    a, ma = read(second)
    b, mb = read(tmp_path / "straight" / "s" / second.name)
    assert ma == mb and a["test_acc"] == b["test_acc"] and a["best_val_acc"] == b["best_val_acc"]

    started.clear()
    code, out, err = cli_run("study", path, "--output-dir", out_dir, "--no-progress")
    assert code == 0 and started == [] and "2 of 2 runs already complete" in out

    # Changing what a finished run computed is refused, never silently mixed with the old results.
    path.write_text(path.read_text().replace("epochs: 2", "epochs: 3"))
    code, out, err = cli_run("study", path, "--dry-run", "--output-dir", out_dir)
    assert code == 2 and "epochs=2" in err and "epochs=3" in err and started == []

    # A default that changed since the run (here: the run recorded another lr than today's default) names the
    # default and how to keep the run, rather than claiming the study file says so.
    path.write_text(path.read_text().replace("epochs: 3", "epochs: 2"))
    config = json.loads((first / "config.json").read_text())
    (first / "config.json").write_text(json.dumps({**config, "lr": config["lr"] / 3}))
    code, out, err = cli_run("study", path, "--dry-run", "--output-dir", out_dir)
    assert code == 2 and "the default of lr is now" in err and f"set lr: {config['lr'] / 3!r}" in err, err


def test_a_failed_run_stops_the_study_or_is_skipped_with_keep_going(folder, tmp_path, cli_run):
    path = study_file(tmp_path, folder, "  epochs: 1\ngrid:\n  strategy: [scratch, last-n:99, full]\n")
    code, out, err = cli_run("study", path, "--output-dir", tmp_path / "runs", "--no-progress")
    assert code == 2 and "run 'imgs-simple_cnn-last-n99-s0' failed" in err and "last-n:99" in err
    assert (tmp_path / "runs" / "s" / "imgs-simple_cnn-scratch-s0" / "summary.json").exists()
    assert not (tmp_path / "runs" / "s" / "imgs-simple_cnn-full-s0").exists()
    code, out, err = cli_run("study", path, "--output-dir", tmp_path / "runs", "--no-progress", "--keep-going")
    assert code == 1 and "2/3 runs complete (1 skipped, 1 failed)" in out
    assert (tmp_path / "runs" / "s" / "imgs-simple_cnn-full-s0" / "summary.json").exists()


# ----------------------------------------------------------------------------------- shipped studies

def stand_in_checkout(base: Path) -> Path:
    """A checkout with a `../shared` beside it holding what the study files name: a dry run checks that
    the data folder and weights file exist, not what they hold, so no real data is needed."""
    shared = base / "shared"
    make_folder(shared / "data" / "cifar10-jpeg", train_per_class=1, test_per_class=1)
    (shared / "weights").mkdir()
    for name in ("tf_efficientnet_lite0.in1k.pth", "tf_efficientnet_lite1.in1k.pth", "tf_efficientnet_lite2.in1k.pth",
                 "mobilenet_v2.features.pth"):
        (shared / "weights" / name).touch()
    (base / "checkout").mkdir()
    return base / "checkout"


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_shipped_study_passes_dry_run(path, tmp_path, cli_run, monkeypatch, no_training):
    monkeypatch.chdir(stand_in_checkout(tmp_path))  # paths in study files are relative to where `study` runs
    code, out, err = cli_run("study", path, "--dry-run", "--output-dir", tmp_path / "runs")
    assert code == 0, err
    assert "nothing was run" in out and not (tmp_path / "runs").exists()


def test_shipped_studies_as_the_issue_lists_them():
    names = {p.stem for p in STUDIES}
    for base in ("cifar10-backbones", "cifar10-resnet18-vs-cnn", "cifar100-resnet50-layerwise",
                 "cifar10-efficientnet-b0"):
        assert {base, base + "-improved"} <= names
    assert "cpu-cifar10-lite0" in names
    refs = {p.stem: {r.value for r in load_study(p, transform=lambda run: None).references} for p in STUDIES}
    assert {79.32, 46.20, 93.43, 90.0} <= refs["cifar10-backbones"] <= refs["cifar10-backbones-improved"]
    assert {50.15, 55.30, 53.40, 60.42, 66.10, 69.99, 72.18} <= refs["cifar100-resnet50-layerwise"]
    assert {9.89, 86.52} <= refs["cifar10-efficientnet-b0"] <= refs["cifar10-efficientnet-b0-improved"]


def anywhere(run):
    """The run as planned, minus what only exists on this machine (../shared)."""
    return run.config.to_dict() | {"weights": None, "dataset": "cifar10"}


def test_shipped_last_n_k_fit_their_models():
    """Every last-n:K asks for at most the tensors its real model has (models built on the meta device)."""
    from transferbench.models import create_model

    counts = {}
    for path in STUDIES:
        for run in load_study(path, transform=anywhere).runs:
            strategy, model = run.config.strategy, run.config.model
            if strategy.startswith("last-n:"):
                if model not in counts:
                    with torch.device("meta"):
                        counts[model] = len(list(create_model(model, 10).model.parameters()))
                assert int(strategy.split(":")[1]) <= counts[model], (path.name, run.name)
    assert counts["resnet50"] == 161 and counts["tf_efficientnet_lite0"] == 149


def tiny_model(name: str) -> str:
    arch = name.split(":")[-1]
    if arch == "simple_cnn":
        return arch
    return "test_vit" if "vit" in arch else "test_efficientnet" if "efficientnet" in arch else "test_resnet"


def shrink(data_dirs: dict, folder: Path):
    """The study as written, on tiny data with tiny random-init models for 1 epoch (2 for two-phase).
    Options that tell runs apart (image size, subset, epochs, K) stay apart."""
    def transform(run):
        c = run.config.to_dict()
        if c["seed"] != 0:
            return None
        if c["dataset"].startswith("folder:"):
            c["dataset"] = f"folder:{folder}"
        else:
            c["data_dir"] = str(data_dirs[c["dataset"]])
        kind, _, k = c["strategy"].partition(":")
        if kind == "last-n":
            c["strategy"] = f"last-n:{min(int(k), 40)}"
        epochs = c["epochs"]
        c.update(model=tiny_model(c["model"]), pretrained=False, weights=None, batch_size=8, workers=1,
                 val_fraction=0.2,
                 device="cpu", amp=None, compile=False, head_epochs=1,
                 image_size=32 if (c["image_size"] or 0) > 96 else 16,
                 epochs=max(2 if kind == "two-phase" else 1, (epochs >= 50) + (epochs >= 100) + 1),
                 train_subset=12 if c["train_subset"] else None)
        return c
    return transform


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_shrunken_copy_of_shipped_study_runs_end_to_end(path, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="transferbench")
    data_dirs = {"cifar10": write_cifar(tmp_path / "c10", "cifar10", monkeypatch, per_class_train=10),
                 "cifar100": write_cifar(tmp_path / "c100", "cifar100", monkeypatch, per_class_train=2,
                                         per_class_test=1)}
    folder = make_folder(tmp_path / "imgs", train_per_class=8, test_per_class=3, size=16)
    study = load_study(path, tmp_path / "runs", transform=shrink(data_dirs, folder))
    full = load_study(path, tmp_path / "runs", transform=anywhere)
    assert len(study.runs) == sum(r.config.seed == 0 for r in full.runs) >= 2
    outcome = run_study(study, progress=False)
    assert outcome["failed"] == {} and outcome["complete"] == len(study.runs)
    out = caplog.text
    runs = load_runs(study.dir)
    assert sorted(r.in_study for r in runs) == sorted(r.name for r in study.runs)
    assert all(r.study.name == study.name for r in runs)

    result = write_report(study.dir, tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    for ref in study.references:
        assert f"| {ref.label} | {ref.value:.2f}" in md
    order = [r.name for r in study.runs]
    selections = {s.name: s for s in study.selections}
    for sel in selection_results(runs):  # select on validation: the best best_val_acc, the file's first of equals
        candidates = sorted((r for r in runs if r.in_study in selections[sel["name"]].runs),
                            key=lambda r: order.index(r.in_study))
        best = max(candidates, key=lambda r: r.summary["best_val_acc"])
        assert sel["group"].runs[0].in_study == best.in_study
        assert sel["value"] == best.summary["test_acc"]
        assert sel["text"] in out and sel["text"] in md
    assert len(result["selections"]) == len(study.selections)


def test_select_then_refit_retrains_the_chosen_configuration_on_train_and_val(folder, tmp_path, cli_run):
    path = study_file(tmp_path, folder, """\
  strategy: scratch
  epochs: 3
grid:
  lr: [1.0e-3, 3.0e-2]
  seed: [0, 1]
select: {name: best-lr, among: {strategy: scratch}, refit: true}
""")
    out_dir = tmp_path / "runs"
    code, out, err = cli_run("study", path, "--output-dir", out_dir, "--no-progress")
    assert code == 0, err
    study = load_study(path, out_dir)
    runs = load_runs(study.dir)
    (sel,) = selection_results(runs)
    chosen = sel["group"].runs
    assert sel["protocol"] == "refit" and len(chosen) == 2
    refits = {r.config["seed"]: r for r in runs if r.in_study.startswith("refit/best-lr/")}
    assert sorted(refits) == [0, 1]
    for run in chosen:  # per seed: the chosen configuration, on train+val, for the epochs its run selected
        refit = refits[run.config["seed"]]
        assert refit.config["refit"] is True and refit.config["lr"] == run.config["lr"]
        assert refit.config["epochs"] == run.summary["best_epoch"] == refit.summary["best_epoch"]
        assert refit.summary["train_images"] == run.summary["train_images"] + run.summary["val_images"]
        assert refit.summary["test_images"] == run.summary["test_images"]
        assert refit.summary["protocol"].startswith("refit")
    mean = sum(r.summary["test_acc"] for r in refits.values()) / 2
    assert sel["value"] == pytest.approx(mean)
    assert "refit on train+val" in sel["text"] and "[protocol: select on validation, then refit" in sel["text"]
    assert sel["text"] in out
    write_report(study.dir, tmp_path / "report")
    assert sel["text"] in (tmp_path / "report" / "report.md").read_text()

    code, out, err = cli_run("study", path, "--output-dir", out_dir, "--no-progress")  # nothing left to train
    assert code == 0 and "starting" not in out + err
    code, out, _ = cli_run("study", path, "--output-dir", out_dir, "--status")
    assert code == 0 and len([l for l in out.splitlines() if re.match(r"\s+R\s+done\s+refit/best-lr/", l)]) == 2
    code, out, _ = cli_run("study", path, "--output-dir", out_dir, "--dry-run")
    assert "then its refit on train+val" in out and out.count("refit refit/best-lr/") == 2


def test_refit_waits_for_every_candidate(folder, tmp_path):
    path = study_file(tmp_path, folder, """\
  strategy: scratch
  epochs: 2
grid: {lr: [1.0e-3, 3.0e-2]}
select: {name: best, among: {strategy: scratch}, refit: true}
""")
    study = load_study(path, tmp_path / "runs")
    outcome = run_study(study, progress=False, shard=(0, 2))  # one of the two candidates
    assert outcome["ran"] == [study.runs[0].name] and study.refits == []
    (sel,) = selection_results(load_runs(study.dir))
    assert sel["protocol"] == "selected run" and "its refit on train+val has not finished" in sel["text"]
    outcome = run_study(study, progress=False, shard=(1, 2))  # the last candidate: its process then refits
    assert outcome["ran"] == [study.runs[1].name, *(r.name for r in study.refits)] and len(study.refits) == 1


@pytest.mark.parametrize("body, expected", [
    ("grid: {seed: [0, 1]}\nselect: {among: {seed: [0, 1]}, refit: yes please}\n", ["select.refit", "true or false"]),
    ("grid: {seed: [0, 1]}\nselect: {among: {seed: [0, 1]}, refit: true, report: best_val_acc}\n",
     ["select.report", "report test_acc"]),
    ("grid: {seed: [0, 1]}\nselect: {name: a/b, among: {seed: [0, 1]}}\n", ["select.name", "letters, digits"]),
])
def test_bad_refit_selections(folder, tmp_path, cli_run, no_training, body, expected):
    code, _, err = cli_run("study", study_file(tmp_path, folder, body), "--dry-run")
    assert code == 2 and all(e in err for e in expected), err
