"""`transferbench rank`: candidates scored on the linear probe's own training features (same split, same
preprocessing, same cache), failures as rows, outputs written. The estimators themselves are checked in
test_transferability.py."""
import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CLASSES, class_image
from transferbench import rank as ranking
from transferbench.config import RunConfig
from transferbench.data import load_dataset, make_splits
from transferbench.features import extract_features
from transferbench.models import create_model, data_config
from transferbench.preprocess import Preprocess
from transferbench.transferability import score

CPU = torch.device("cpu")
GOOD = ("timm:test_resnet", "timm:test_efficientnet")
# Not the defaults, so that a rank which ignored them would score other images than the run trains on.
SPLIT = ["--image-size", "16", "--val-fraction", "0.25", "--train-subset", "18", "--seed", "3"]


@pytest.fixture(autouse=True)
def one_blas_thread():
    with ranking.one_blas_thread():  # see its docstring: numpy's BLAS threads crawl on a busy 2-core machine
        yield


@pytest.fixture
def zoo(tmp_path):
    """Local state dicts for two tiny timm models (random weights, BatchNorm with non-trivial statistics)."""
    paths = {}
    for i, name in enumerate(GOOD):
        torch.manual_seed(i)
        model = create_model(name, 1000).model
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        paths[name] = tmp_path / f"{name.split(':')[1]}.pth"
        torch.save(model.state_dict(), paths[name])
    return paths


def weights_args(paths: dict) -> list[str]:
    return [a for name, path in paths.items() for a in ("--weights", f"{name}={path}")]


def rank_args(folder, models, paths, out) -> list:
    return ["rank", "--dataset", f"folder:{folder}", "--models", ",".join(models), *weights_args(paths), *SPLIT,
            "--workers", "1", "--no-progress", "--out", out]


def feature_files(tmp_path) -> set[str]:
    d = tmp_path / "cache" / "features"
    return {p.name for p in d.glob("*.pt")} if d.is_dir() else set()


def expected_scores(folder, name, path) -> tuple[dict, int]:
    """What rank should report, computed from scratch: the run's training split, the weights' preprocessing."""
    data = load_dataset(f"folder:{folder}", None, storage_size=16, workers=1)
    train = make_splits(data, val_fraction=0.25, train_subset=18, seed=3).train
    bundle = create_model(name, len(train.classes), weights=path)
    prep = Preprocess.build(data_config(name), 16, CPU, channels_last=True)
    feats = extract_features(bundle, train, prep, CPU, 8, progress=False)
    return {e: score(e, feats, train.labels) for e in ("logme", "hscore")}, feats.shape[1]


def test_rank_scores_the_run_training_split_and_writes_table_json_csv(folder, tmp_path, cli_run, zoo, one_thread):
    out = tmp_path / "ranked"
    code, stdout, err = cli_run(*rank_args(folder, GOOD, zoo, out))
    assert code == 0, err
    record = json.loads((out / "rank.json").read_text())
    assert record["estimators"] == ["logme", "hscore"] and record["sort_by"] == "logme"
    assert record["dataset"] == f"folder:{folder.resolve()}"
    assert record["options"]["train_subset"] == 18 and record["options"]["seed"] == 3
    rows = record["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for r in rows:
        want, dim = expected_scores(folder, r["model"], zoo[r["model"]])
        assert r["feature_dim"] == dim and r["train_images"] == 18 and r["image_size"] == 16
        for e in ("logme", "hscore"):
            assert math.isclose(r["scores"][e], want[e], rel_tol=1e-6, abs_tol=1e-9), (r["model"], e)
        assert r["feature_cache_hit"] is False and r["feature_time_s"] > 0 and r["build_time_s"] > 0
        assert set(r["score_time_s"]) == {"logme", "hscore"}
        n = sum(p.numel() for p in create_model(r["model"], 3).model.parameters())
        assert r["params"] == n and 0 < r["backbone_params"] < n
        assert r["weights"] == str(zoo[r["model"]].resolve())
    # Best first by the first estimator, ranks per estimator.
    assert rows[0]["scores"]["logme"] >= rows[1]["scores"]["logme"]
    assert [r["ranks"]["logme"] for r in rows] == [1, 2]
    by_h = sorted(rows, key=lambda r: -r["scores"]["hscore"])
    assert [r["ranks"]["hscore"] for r in by_h] == [1, 2]
    # The CSV says the same.
    with open(out / "rank.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["model"] for t in table] == [r["model"] for r in rows]
    assert [float(t["logme"]) for t in table] == [r["scores"]["logme"] for r in rows]
    assert [int(t["feature_dim"]) for t in table] == [r["feature_dim"] for r in rows]
    # The printed table: a header, one line per model in rank order, a summary, where the files went.
    lines = stdout.splitlines()
    top = next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "model"])  # after the log lines
    assert lines[top].split()[:4] == ["rank", "model", "logme", "hscore"]
    assert [line.split()[1] for line in lines[top + 1:top + 3]] == [r["model"] for r in rows]
    assert "ranked 2 of 2 models by logme" in stdout and str(out / "rank.json") in stdout
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_a_model_that_cannot_be_built_or_loaded_is_a_failed_row(folder, tmp_path, cli_run, zoo, one_thread):
    text_file = tmp_path / "notes.pth"
    text_file.write_text("not weights")
    models = ["timm:test_resnet", "resnet18", "no_such_model", "timm:test_efficientnet", "timm:test_vit"]
    paths = {"timm:test_resnet": zoo["timm:test_resnet"], "resnet18": zoo["timm:test_resnet"],  # does not fit
             "timm:test_efficientnet": text_file}  # test_vit: pretrained weights, which cannot be downloaded here
    out = tmp_path / "ranked"
    code, stdout, err = cli_run(*rank_args(folder, models, paths, out))
    assert code == 0, err  # the others still rank
    rows = json.loads((out / "rank.json").read_text())["rows"]
    assert [r["model"] for r in rows] == models  # the one good model first; the failed ones in the order given
    assert rows[0]["status"] == "ok" and rows[0]["ranks"] == {"logme": 1, "hscore": 1}
    failed = {r["model"]: r for r in rows[1:]}
    assert all(r["status"] == "failed" and r["scores"] == {} and r["ranks"] == {"logme": None, "hscore": None}
               for r in failed.values())
    assert failed["resnet18"]["stage"] == "build" and "does not fit" in failed["resnet18"]["error"]
    assert failed["no_such_model"]["stage"] == "config" and "unknown model" in failed["no_such_model"]["error"]
    assert failed["timm:test_efficientnet"]["stage"] == "build"
    assert "a text file, not PyTorch weights" in failed["timm:test_efficientnet"]["error"]
    assert failed["timm:test_vit"]["stage"] == "build" and "could not download" in failed["timm:test_vit"]["error"]
    for name, r in failed.items():
        assert any(line.split()[:3] == ["-", name, "FAILED"] and r["error"] in line for line in stdout.splitlines())
    assert "ranked 1 of 5 models by logme (4 failed)" in stdout
    with open(out / "rank.csv") as f:
        assert [t["status"] for t in csv.DictReader(f)] == ["ok"] + ["failed"] * 4
    # Nothing scored at all: the files are still written, and the exit status says so.
    code, stdout, _ = cli_run(*rank_args(folder, ["resnet18", "no_such_model"], {"resnet18": text_file},
                                         tmp_path / "none"))
    assert code == 1 and "no model could be scored" in stdout
    assert [r["status"] for r in json.loads((tmp_path / "none" / "rank.json").read_text())["rows"]] == ["failed"] * 2


def test_rank_and_linear_probe_extract_the_training_features_once(folder, tmp_path, cli_run, zoo, one_thread):
    code, _, err = cli_run(*rank_args(folder, GOOD, zoo, tmp_path / "r1"))
    assert code == 0, err
    after_rank = feature_files(tmp_path)
    rows = {r["model"]: r for r in json.loads((tmp_path / "r1" / "rank.json").read_text())["rows"]}
    assert after_rank == {r["feature_file"].rsplit("/", 1)[1] for r in rows.values()}  # one file per model
    name = "timm:test_resnet"
    code, _, err = cli_run("run", "--dataset", f"folder:{folder}", "--model", name, "--weights", zoo[name],
                           "--strategy", "linear-probe", "--no-augment", "--epochs", "1", *SPLIT, "--workers", "1",
                           "--no-progress", "--output-dir", tmp_path / "runs")
    assert code == 0, err
    summary = json.loads((tmp_path / "runs" / "imgs-test_resnet-linear-probe-s3" / "summary.json").read_text())
    assert summary["feature_cache"] and summary["train_images"] == 18
    after_run = feature_files(tmp_path)
    assert after_rank < after_run and len(after_run - after_rank) == 2  # only validation and test were extracted
    # Ranking again reads every model's features back, and scores the same.
    code, stdout, err = cli_run(*rank_args(folder, GOOD, zoo, tmp_path / "r2"))
    assert code == 0, err
    again = {r["model"]: r for r in json.loads((tmp_path / "r2" / "rank.json").read_text())["rows"]}
    assert feature_files(tmp_path) == after_run
    assert all(r["feature_cache_hit"] for r in again.values()) and stdout.count("(cached)") == 4  # log + table
    assert {m: r["scores"] for m, r in again.items()} == {m: r["scores"] for m, r in rows.items()}
    # Other split options are other features: a new file, not a stale one.
    code, _, err = cli_run(*rank_args(folder, [name], {name: zoo[name]}, tmp_path / "r3"), "--train-subset", "15")
    assert code == 0, err
    assert len(feature_files(tmp_path) - after_run) == 1


def test_a_carved_test_split_is_carved_as_the_run_carves_it(tmp_path, cli_run, zoo, one_thread):
    """Class folders only: the test split is carved with the run's seed and --test-fraction, so the training split
    (and its features) depend on them too."""
    rng = np.random.default_rng(0)
    root = tmp_path / "classes"
    for label, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True)
        for i in range(16):
            Image.fromarray(class_image(label, rng)).save(root / cls / f"{i:04d}.png")
    name = "timm:test_resnet"
    split = ["--image-size", "16", "--seed", "3", "--test-fraction", "0.3", "--val-fraction", "0.25"]
    code, _, err = cli_run("rank", "--dataset", f"folder:{root}", "--models", name, "--weights", f"{name}={zoo[name]}",
                           *split, "--workers", "1", "--no-progress", "--out", tmp_path / "r")
    assert code == 0, err
    after_rank = feature_files(tmp_path)
    code, _, err = cli_run("run", "--dataset", f"folder:{root}", "--model", name, "--weights", zoo[name],
                           "--strategy", "linear-probe", "--no-augment", "--epochs", "1", *split, "--workers", "1",
                           "--no-progress", "--output-dir", tmp_path / "runs")
    assert code == 0, err
    assert len(after_rank) == 1 and after_rank < feature_files(tmp_path)
    assert len(feature_files(tmp_path) - after_rank) == 2


def test_api_sorts_by_the_first_estimator(folder, tmp_path, zoo, one_thread):
    base = RunConfig(dataset=f"folder:{folder}", image_size=16, val_fraction=0.25, train_subset=18, seed=3,
                     workers=1)
    result = ranking.rank(base, list(GOOD), weights={k: str(v) for k, v in zoo.items()},
                          estimators=["hscore", "logme"], progress=False)
    assert result.estimators == ["hscore", "logme"] and len(result.ranked) == 2
    assert [r.ranks["hscore"] for r in result.rows] == [1, 2]
    assert result.rows[0].scores["hscore"] >= result.rows[1].scores["hscore"]
    assert result.table().splitlines()[0].split()[:4] == ["rank", "model", "hscore", "logme"]
    json_path, csv_path = result.write(tmp_path / "api")
    assert json.loads(json_path.read_text())["sort_by"] == "hscore" and csv_path.is_file()
    out = ranking.default_out_dir(f"folder:{folder}", tmp_path)
    assert out.parent == tmp_path and out.name.startswith("rank-imgs-")


@pytest.mark.parametrize("extra, message", [
    (["--weights", "resnet50=x.pth"], "'resnet50' is not one of --models"),
    (["--weights", "timm:test_resnet"], "expected MODEL=FILE"),
    (["--estimators", "logme,leep"], "unknown transferability estimator 'leep'"),
    (["--val-fraction", "1.5"], "--val-fraction must be between 0 and 1"),
])
def test_bad_options_stop_before_any_model_is_built(folder, tmp_path, cli_run, extra, message):
    code, stdout, err = cli_run("rank", "--dataset", f"folder:{folder}", "--models", "timm:test_resnet", *extra,
                                "--out", tmp_path / "out", "--no-progress")
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists() and not feature_files(tmp_path)


def test_missing_dataset_and_existing_output(folder, tmp_path, cli_run, zoo, one_thread):
    code, _, err = cli_run(*rank_args(tmp_path / "nowhere", GOOD, zoo, tmp_path / "out"))
    assert code == 2 and "does not exist" in err
    args = rank_args(folder, GOOD[:1], {GOOD[0]: zoo[GOOD[0]]}, tmp_path / "out")
    assert cli_run(*args)[0] == 0
    code, _, err = cli_run(*args)
    assert code == 2 and "--overwrite" in err
    assert cli_run(*args, "--overwrite")[0] == 0


def test_study_scores_its_models_before_training_and_the_report_sets_scores_beside_accuracy(
        folder, tmp_path, cli_run, zoo, one_thread):
    from transferbench.report import write_report
    from transferbench.transferability import weighted_kendall_tau

    variants = "\n".join(f"  m{i}: {{model: '{name}', weights: '{path}'}}"
                         for i, (name, path) in enumerate(zoo.items()))
    study = tmp_path / "s.yaml"
    study.write_text(f"""\
options: {{dataset: 'folder:{folder}', strategy: linear-probe, epochs: 2, image_size: 16, val_fraction: 0.25,
          train_subset: 18, seed: 3, batch_size: 8, workers: 1}}
variants:
{variants}
  scratch-cnn: {{model: simple_cnn, strategy: scratch}}
transferability: [logme, hscore]
""")
    code, out, err = cli_run("study", study, "--output-dir", tmp_path / "runs", "--no-progress")
    assert code == 0, err
    (scored,) = (tmp_path / "runs" / "s" / "transferability").glob("*/rank.json")
    doc = json.loads(scored.read_text())
    assert {r["model"] for r in doc["rows"]} == {*zoo, "simple_cnn"} and doc["estimators"] == ["logme", "hscore"]
    # scored on the training images the runs train on
    assert {r["train_images"] for r in doc["rows"]} == {18}
    stamp = scored.stat().st_mtime_ns
    code, _, err = cli_run("study", study, "--output-dir", tmp_path / "runs", "--no-progress")
    assert code == 0 and scored.stat().st_mtime_ns == stamp  # kept, not scored again

    write_report(tmp_path / "runs", tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Transferability before fine-tuning" in md
    # the strategy most models ran (linear-probe: the two timm models), accuracy from their summaries
    accs = {json.loads((d / "config.json").read_text())["model"]: json.loads((d / "summary.json").read_text())
            for d in (tmp_path / "runs" / "s").glob("m*/*")}
    rows = {r["model"]: r for r in doc["rows"]}
    for est in ("logme", "hscore"):
        tau = weighted_kendall_tau([rows[m]["scores"][est] for m in zoo], [accs[m]["test_acc"] for m in zoo])
        assert f"weighted Kendall's τ between {est} and test accuracy (linear-probe, 2 models): {tau:.2f}" in md
    assert "a hint, not a validation" in md
    assert list((tmp_path / "report" / "report-plots").glob("*transferability*.png"))
