"""Experiment trackers: what TensorBoard and MLflow receive, read back with their own readers; resume; missing libs."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from transferbench.errors import UserError
from transferbench.trackers import MLFLOW_RUN_ID, PARAM_VALUE_LIMIT, FanOut, Tracker, open_trackers

# mlflow 3.17's SQL store on SQLAlchemy 2.1: a deprecation of theirs, nothing of ours
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")

CONFIG = {"dataset": "cifar10", "model": "resnet18", "lr": 0.003, "epochs": 3, "augment": True, "image_size": None,
          "notes": "x" * 600, "data": {"mean": [0.5, 0.5, 0.5], "size": 32}}
TAGS = {"study": "demo-study", "run": "cifar10-resnet18-full-s0", "dataset": "cifar10", "model": "resnet18",
        "strategy": "full"}
SUMMARY = {"test_acc": 0.875, "best_val_acc": 0.9, "best_epoch": 3, "images_per_s": 123.5, "model": "resnet18",
           "augment": True, "image_size": None, "versions": {"torch": "2.x"}}


def row(epoch: int, scale: float = 1.0) -> dict:
    """A metrics.jsonl row; train_acc is None in epoch 1 (as in a zero-shot baseline row)."""
    return {"epoch": epoch, "phase": 1, "train_loss": scale / epoch, "train_acc": None if epoch == 1 else 0.1 * epoch,
            "val_loss": 2.0 / epoch, "val_acc": 0.5 + 0.1 * epoch, "lr": 1e-3 * epoch, "epoch_time_s": 1.5}


def run_epochs(kinds: list[str], run_dir: Path, epochs, *, scale: float = 1.0, summary: dict | None = None,
               files: list[Path] = (), config: dict = CONFIG) -> None:
    with open_trackers(kinds, run_dir=run_dir, config=config, tags=TAGS) as tracker:
        for epoch in epochs:
            tracker.log_epoch(row(epoch, scale), step=epoch)
        if summary is not None:
            tracker.finish(summary, files)


# ----- TensorBoard --------------------------------------------------------------------------------------------------

def read_events(log_dir: Path):
    pytest.importorskip("torch.utils.tensorboard")
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(log_dir))
    acc.Reload()
    return acc


def scalars(acc, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_tensorboard_scalars_and_hparams(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    run_dir = tmp_path / "run"
    run_epochs(["tensorboard"], run_dir, [1, 2, 3], summary=SUMMARY)
    acc = read_events(run_dir / "tensorboard")
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "lr", "phase", "epoch_time_s"} <= tags
    assert "epoch" not in tags and "final/model" not in tags and "final/augment" not in tags, tags
    assert scalars(acc, "train/loss") == pytest.approx({1: 1.0, 2: 0.5, 3: 1 / 3})
    assert scalars(acc, "val/acc") == pytest.approx({1: 0.6, 2: 0.7, 3: 0.8})
    assert scalars(acc, "lr") == pytest.approx({1: 1e-3, 2: 2e-3, 3: 3e-3})
    assert scalars(acc, "train/acc") == pytest.approx({2: 0.2, 3: 0.3})  # the None of epoch 1 is skipped
    finals = {t: scalars(acc, t) for t in tags if t.startswith("final/")}
    assert all(list(steps) == [3] for steps in finals.values()), finals  # at the last epoch's step
    assert {t: steps[3] for t, steps in finals.items()} == pytest.approx(
        {"final/test_acc": 0.875, "final/best_val_acc": 0.9, "final/best_epoch": 3.0, "final/images_per_s": 123.5})

    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    hp = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    assert hp["lr"] == pytest.approx(0.003) and hp["epochs"] == 3 and hp["model"] == "resnet18"
    assert hp["augment"] == "True" and hp["data.mean"] == "[0.5, 0.5, 0.5]" and hp["data.size"] == 32
    assert "image_size" not in hp  # None: left out
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == set(finals)


def test_tensorboard_resume_replaces_superseded_epochs(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with open_trackers(["tensorboard"], run_dir=run_dir, config=CONFIG, tags=TAGS) as tracker:
            for epoch in (1, 2, 3):
                tracker.log_epoch(row(epoch), step=epoch)
            raise RuntimeError("crash after epoch 3, last checkpoint at epoch 2")
    run_epochs(["tensorboard"], run_dir, [3, 4], scale=10.0, summary=SUMMARY)
    acc = read_events(run_dir / "tensorboard")
    assert scalars(acc, "train/loss") == pytest.approx({1: 1.0, 2: 0.5, 3: 10 / 3, 4: 2.5})
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]  # epoch 3's first attempt is purged


# ----- MLflow -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlflow_schema(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, made once: creating one runs ~70 alembic migrations (seconds); tests copy it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # before mlflow is first imported: it reads it then
        mp.setenv("DO_NOT_TRACK", "true")
        pytest.importorskip("mlflow")
        db = tmp_path_factory.mktemp("mlflow-schema") / "empty.db"
        client_for(db).search_experiments()
    return db


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, mlflow_schema) -> Path:
    """cwd = tmp_path/store holding a fresh mlruns.db, no $MLFLOW_TRACKING_URI (so that is the default store)."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    store = tmp_path / "store"
    store.mkdir()
    shutil.copyfile(mlflow_schema, store / "mlruns.db")
    monkeypatch.chdir(store)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return store


def client_for(db: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{db}")


def only_run(client, experiment: str = "demo-study"):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, [e.name for e in client.search_experiments()]
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, runs
    return exp, runs[0]


def history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_mlflow_run(tmp_path, mlflow_store, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text("{}\n")
    (run_dir / MLFLOW_RUN_ID).write_text("0123456789abcdef0123456789abcdef\n")  # from another store: a new run
    run_epochs(["mlflow", "tensorboard"], run_dir, [1, 2, 3], summary=SUMMARY, files=[run_dir / "summary.json"])
    assert "MLflow run 0123456789abcdef0123456789abcdef is not in sqlite:///" in capsys.readouterr().err
    client = client_for(mlflow_store / "mlruns.db")
    exp, run = only_run(client)
    assert run.info.run_name == TAGS["run"] and run.info.status == "FINISHED"
    assert (run_dir / MLFLOW_RUN_ID).read_text().strip() == run.info.run_id
    assert {k: run.data.tags[k] for k in TAGS} == TAGS
    assert run.data.tags["transferbench.run_dir"] == str(run_dir.resolve())

    params = run.data.params
    assert params["lr"] == "0.003" and params["augment"] == "True" and params["image_size"] == "None"
    assert params["data.mean"] == "[0.5, 0.5, 0.5]" and params["data.size"] == "32"
    assert len(params["notes"]) == PARAM_VALUE_LIMIT and params["notes"].endswith("...")

    assert history(client, run.info.run_id, "train_loss") == pytest.approx({1: 1.0, 2: 0.5, 3: 1 / 3})
    assert history(client, run.info.run_id, "val_acc") == pytest.approx({1: 0.6, 2: 0.7, 3: 0.8})
    assert history(client, run.info.run_id, "train_acc") == pytest.approx({2: 0.2, 3: 0.3})
    metrics = run.data.metrics
    assert "epoch" not in metrics and "final/model" not in metrics and "final/augment" not in metrics
    assert {k: v for k, v in metrics.items() if k.startswith("final/")} == pytest.approx(
        {"final/test_acc": 0.875, "final/best_val_acc": 0.9, "final/best_epoch": 3.0, "final/images_per_s": 123.5})

    found = client.search_runs([exp.experiment_id], "metrics.`final/test_acc` > 0.8 and tags.model = 'resnet18'")
    assert [r.info.run_id for r in found] == [run.info.run_id]

    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["summary.json"]
    stored = list((mlflow_store / "mlartifacts").rglob("summary.json"))  # beside the database
    assert len(stored) == 1 and run.info.run_id in stored[0].parts
    assert (run_dir / "tensorboard").is_dir()  # both trackers were fed


def test_mlflow_resume_continues_the_run(tmp_path, mlflow_store, mlflow_schema, monkeypatch):
    db = tmp_path / "elsewhere" / "tracking.db"
    db.parent.mkdir()
    shutil.copyfile(mlflow_schema, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")  # the env var wins over cwd/mlruns.db
    client = client_for(db)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"):
        with open_trackers(["mlflow"], run_dir=run_dir, config=CONFIG, tags=TAGS) as tracker:
            for epoch in (1, 2, 3):
                tracker.log_epoch(row(epoch), step=epoch)
            raise RuntimeError("boom")
    _, run = only_run(client)
    assert run.info.status == "FAILED"
    run_id = run.info.run_id

    with open_trackers(["mlflow"], run_dir=run_dir, config={**CONFIG, "resume_only": 1}, tags=TAGS) as tracker:
        assert client.get_run(run_id).info.status == "RUNNING"
        tracker.log_epoch(row(4), step=4)
        tracker.finish(SUMMARY, [])  # files=[]: nothing to upload
    _, run = only_run(client)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert (run_dir / MLFLOW_RUN_ID).read_text().strip() == run_id
    assert history(client, run_id, "val_acc") == pytest.approx({1: 0.6, 2: 0.7, 3: 0.8, 4: 0.9})
    assert run.data.params["resume_only"] == "1" and run.data.params["lr"] == "0.003"
    assert run.data.metrics["final/test_acc"] == pytest.approx(0.875)
    assert client_for(mlflow_store / "mlruns.db").get_experiment_by_name("demo-study") is None
    location = client.get_experiment_by_name("demo-study").artifact_location
    assert location == (db.parent / "mlartifacts" / "demo-study").as_uri()  # beside that database


# ----- choosing trackers --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, module", [("mlflow", "mlflow"), ("tensorboard", "torch.utils.tensorboard")])
def test_missing_library_is_a_user_error(tmp_path, monkeypatch, kind, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError, installed or not
    run_dir = tmp_path / "run"
    with pytest.raises(UserError) as err:
        open_trackers([kind], run_dir=run_dir, config=CONFIG, tags=TAGS)
    assert str(err.value) == f"--log {kind} needs {kind}: pip install 'transferbench[tracking]'"
    with pytest.raises(UserError, match="needs"):
        open_trackers(["tensorboard", "mlflow"], run_dir=run_dir, config=CONFIG, tags=TAGS)
    assert not run_dir.exists()  # every kind is checked before any is opened


def test_unknown_kind_lists_the_choices(tmp_path):
    with pytest.raises(UserError, match=r"unknown tracker 'mlfow' \(choices: tensorboard, mlflow\)\..*mlflow"):
        open_trackers(["mlfow"], run_dir=tmp_path / "run", config=CONFIG, tags=TAGS)


def test_no_kinds_is_a_no_op(tmp_path):
    run_dir = tmp_path / "run"
    with open_trackers([], run_dir=run_dir, config=CONFIG, tags=TAGS) as tracker:
        tracker.log_epoch(row(1), step=1)
        tracker.finish(SUMMARY, [])
    assert not run_dir.exists()


class Recorder(Tracker):
    name = "recorder"

    def __init__(self, fail: bool = False):
        self.fail, self.calls = fail, []

    def log_epoch(self, row, step):
        if self.fail:
            raise ConnectionError("tracking server is down")
        self.calls.append(("log_epoch", step))

    def finish(self, summary, files=()):
        self.calls.append(("finish",))

    def close(self, status="FINISHED"):
        self.calls.append(("close", status))


def test_a_failing_tracker_is_dropped_and_statuses(capsys):
    good, bad = Recorder(), Recorder(fail=True)
    with FanOut([bad, good]) as tracker:
        tracker.log_epoch(row(1), step=1)
        tracker.log_epoch(row(2), step=2)
        tracker.finish(SUMMARY, [])
    assert good.calls == [("log_epoch", 1), ("log_epoch", 2), ("finish",), ("close", "FINISHED")]
    assert bad.calls == [("close", "FAILED")]
    err = capsys.readouterr().err
    assert err.count("warning: recorder tracking failed in log_epoch (ConnectionError") == 1, err

    for exc, status in ((ValueError, "FAILED"), (KeyboardInterrupt, "KILLED")):
        rec = Recorder()
        with pytest.raises(exc):
            with FanOut([rec]):
                raise exc()
        assert rec.calls == [("close", status)]
