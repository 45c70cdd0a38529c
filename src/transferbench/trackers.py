"""Experiment trackers a training run reports to: TensorBoard and MLflow (``--log tensorboard,mlflow``).

Both are optional (``pip install 'transferbench[tracking]'``); this module imports them only when asked for one.
The run directory stays the record of a run: a tracker mirrors it, so a tracker that fails mid-run prints a
warning and is dropped, and the training goes on.

::

    with open_trackers(["tensorboard", "mlflow"], run_dir=run_dir, config=cfg.to_dict(),
                       tags={"run": cfg.name, "dataset": cfg.dataset, "model": cfg.model}) as tracker:
        for epoch ...:
            tracker.log_epoch(row, step=row["epoch"])
        tracker.finish(summary, files=[run_dir / "config.json", run_dir / "summary.json"])

Open trackers in the main process only (one per run, not one per rank).

What each receives:

* ``log_epoch(row, step)``: every number in the row (None, bools and strings are skipped); the row's ``epoch``
  key is the step, not a metric.
* ``finish(summary, files)``: every top-level number of the summary (bools, strings, None and nested values are
  skipped) as a final metric named ``final/<key>``; the files as artifacts where the tracker keeps files.
* leaving the ``with`` normally ends the run FINISHED, by an exception FAILED (KILLED for Ctrl-C).

TensorBoard (event files under ``run_dir/tensorboard``): epoch metrics ``train_loss`` -> ``train/loss``,
``val_acc`` -> ``val/acc`` (``train_``, ``val_`` and ``test_`` prefixes become sections), other keys as they are
(``lr``, ``epoch_time_s``); final metrics as ``final/<key>`` at the last epoch's step; the config (flattened, None
values left out) as HParams, with the final metrics as the HParams metrics, so ``tensorboard --logdir`` on a study
directory compares its runs in the HParams tab. No artifacts. A resumed run purges the events its first logged
epoch supersedes, so the curves do not zig-zag.

MLflow: the tracking URI is ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlruns.db``. An experiment this module
creates in a SQLite store keeps its artifacts in ``mlartifacts/<experiment>/`` beside the database file (see them
with ``mlflow ui --backend-store-uri sqlite:///mlruns.db`` from that directory); elsewhere the store decides. The
experiment is ``tags["study"]`` or ``transferbench``; one MLflow run per transferbench run, named ``tags["run"]``
(default the run directory's name), with every tag set plus ``transferbench.run_dir``. Params: the config flattened
(``a.b`` for nested keys), values as strings, cut to 500 characters. Metrics: the epoch row's keys as they are,
step = epoch; the summary as ``final/<key>`` (quote them in a search: metrics.`final/test_acc` > 0.9). The run's
id goes to ``run_dir/mlflow_run_id`` when it starts; a resumed run (that file exists) continues the same MLflow run,
adding only params it lacks. Epochs logged before a crash but after the last checkpoint are logged again, so their
history can hold two points for one step.
"""
from __future__ import annotations

import importlib
import json
import logging
import numbers
import os
import re
import time
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Iterable

from .errors import UserError, did_you_mean
from .rundir import atomic_write_text

log = logging.getLogger(__name__)
KINDS = ("tensorboard", "mlflow")
TENSORBOARD_DIR = "tensorboard"
MLFLOW_RUN_ID = "mlflow_run_id"
DEFAULT_EXPERIMENT = "transferbench"
PARAM_VALUE_LIMIT = 500  # MLflow's limit on a param's value in older servers (newer ones take 6000)
FINAL_PREFIX = "final/"
SPLIT_PREFIXES = ("train_", "val_", "test_")
_BATCH = 100  # params/tags per MLflow log_batch call (its limit); metrics go 100 at a time too


class Tracker:
    """Where a run's metrics go. This base class is the no-op tracker (no ``--log``)."""

    name = "none"

    def log_epoch(self, row: dict[str, Any], step: int) -> None:
        """One epoch's metrics (a metrics.jsonl row) at ``step`` (the epoch)."""

    def finish(self, summary: dict[str, Any], files: Iterable[Path] = ()) -> None:
        """The run's final metrics and files (artifacts, where the tracker keeps files)."""

    def close(self, status: str = "FINISHED") -> None:
        """End the run as FINISHED, FAILED or KILLED; closing twice is harmless."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(exit_status(exc_type))


def exit_status(exc_type: type[BaseException] | None) -> str:
    if exc_type is None:
        return "FINISHED"
    return "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"


def open_trackers(kinds: Iterable[str], *, run_dir: Path, config: dict[str, Any], tags: dict[str, str]) -> Tracker:
    """One tracker that reports to each of ``kinds`` (a subset of KINDS; none: a no-op tracker).

    Every kind is checked (known, library installed) before any is opened; if one fails to open, those opened
    before it are closed as FAILED and the error propagates.
    """
    wanted = list(dict.fromkeys(kinds))  # drop repeats, keep the order
    for kind in wanted:
        if kind not in KINDS:
            raise UserError(f"unknown tracker '{kind}' (choices: {', '.join(KINDS)}).{did_you_mean(kind, KINDS)}")
    libs = {kind: _require(kind) for kind in wanted}
    opened: list[Tracker] = []
    try:
        for kind in wanted:
            if kind == "tensorboard":
                opened.append(TensorBoardTracker(Path(run_dir), config, lib=libs[kind]))
            else:
                opened.append(MlflowTracker(Path(run_dir), config, tags, lib=libs[kind]))
    except BaseException:
        for tracker in opened:
            tracker.close("FAILED")
        raise
    return FanOut(opened)


_LIBRARIES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}


def _require(kind: str) -> ModuleType:
    module, package = _LIBRARIES[kind]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UserError(f"--log {kind} needs {package}: pip install 'transferbench[tracking]'") from err


def warn(message: str) -> None:
    log.warning(message)


class FanOut(Tracker):
    """Reports to each of its trackers; one that raises is warned about, closed as FAILED and dropped."""

    name = "fan-out"

    def __init__(self, trackers: list[Tracker]):
        self.trackers = list(trackers)

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as err:  # a tracker mirrors the run directory: losing it must not lose the run
                warn(f"{tracker.name} tracking failed in {method} ({type(err).__name__}: {err}); "
                     f"the run goes on without it")
                self.trackers.remove(tracker)
                try:
                    tracker.close("FAILED")
                except Exception:
                    pass

    def log_epoch(self, row: dict[str, Any], step: int) -> None:
        self._each("log_epoch", row, step)

    def finish(self, summary: dict[str, Any], files: Iterable[Path] = ()) -> None:
        self._each("finish", summary, list(files))

    def close(self, status: str = "FINISHED") -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            try:
                tracker.close(status)
            except Exception as err:
                warn(f"closing {tracker.name} tracking failed ({type(err).__name__}: {err})")


# ----- what gets logged ---------------------------------------------------------------------------------------------

def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def epoch_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row, the step key ``epoch`` aside."""
    return {k: float(v) for k, v in row.items() if k != "epoch" and is_number(v)}


def final_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """``final/<key>`` for every top-level number of a summary."""
    return {FINAL_PREFIX + k: float(v) for k, v in summary.items() if is_number(v)}


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become ``a.b`` keys; lists and tuples JSON text; other non-scalars their str()."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value, default=str)
        else:
            flat[name] = str(value)
    return flat


def tensorboard_tag(key: str) -> str:
    for prefix in SPLIT_PREFIXES:
        if key.startswith(prefix) and len(key) > len(prefix):
            return f"{prefix[:-1]}/{key[len(prefix):]}"
    return key


def param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= PARAM_VALUE_LIMIT else text[:PARAM_VALUE_LIMIT - 3] + "..."


# ----- TensorBoard --------------------------------------------------------------------------------------------------

class TensorBoardTracker(Tracker):
    """Event files under ``run_dir/tensorboard``, written by torch's SummaryWriter (created at the first write)."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, config: dict[str, Any], *, lib: ModuleType | None = None):
        self.lib = lib or _require("tensorboard")
        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        self.config = config
        self.writer: Any = None
        self.last_step = 0
        self.closed = False

    def _writer(self, step: int | None) -> Any:
        if self.writer is None:
            resumed = self.log_dir.is_dir() and any(self.log_dir.glob("events.out.tfevents.*"))
            # a resumed run hides what an earlier attempt logged from this step on (SessionLog.START)
            purge = step if resumed and step is not None else None
            self.writer = self.lib.SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)
        return self.writer

    def log_epoch(self, row: dict[str, Any], step: int) -> None:
        writer = self._writer(step)
        for key, value in epoch_metrics(row).items():
            writer.add_scalar(tensorboard_tag(key), value, step)
        writer.flush()  # an epoch is minutes: flush so a crash loses nothing and a live TensorBoard sees it
        self.last_step = step

    def finish(self, summary: dict[str, Any], files: Iterable[Path] = ()) -> None:
        from torch.utils.tensorboard.summary import hparams

        writer = self._writer(None)
        metrics = final_metrics(summary)
        hparams_dict = {}
        for key, value in flatten(self.config).items():
            if value is None:
                continue  # an HParam has one type across runs: "None" would turn a number column into text
            hparams_dict[key] = str(value) if isinstance(value, bool) else value  # torch would log a bool as 0/1
        # what SummaryWriter.add_hparams does, but into this run's own event file rather than a timestamped subdir
        for proto in hparams(hparams_dict, metrics):
            writer.file_writer.add_summary(proto, self.last_step)
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, self.last_step)
        writer.flush()

    def close(self, status: str = "FINISHED") -> None:
        if not self.closed and self.writer is not None:
            self.writer.close()
        self.closed = True


# ----- MLflow -------------------------------------------------------------------------------------------------------

def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlruns.db'}"


def sqlite_artifact_root(uri: str) -> Path | None:
    """``mlartifacts`` beside a SQLite store's database file; None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///"):].split("?", 1)[0]
    if not db or db == ":memory:":
        return None
    return Path(db).resolve().parent / "mlartifacts"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"


class MlflowTracker(Tracker):
    """One MLflow run (through MlflowClient, so no global active-run state), resumed through ``mlflow_run_id``."""

    name = "mlflow"

    def __init__(self, run_dir: Path, config: dict[str, Any], tags: dict[str, str], *,
                 lib: ModuleType | None = None):
        self.lib = lib or _require("mlflow")
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database..."
        self.run_dir = Path(run_dir)
        self.uri = tracking_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        self.last_step = 0
        self.closed = False
        all_tags = {str(k): str(v) for k, v in tags.items()}
        all_tags.setdefault("transferbench.run_dir", str(self.run_dir.resolve()))
        run = self._resumed()
        resumed = run is not None
        if run is None:
            experiment_id = self._experiment(tags.get("study") or DEFAULT_EXPERIMENT)
            run = self.client.create_run(experiment_id, run_name=tags.get("run") or self.run_dir.name, tags=all_tags)
        self.run_id = run.info.run_id
        try:
            if resumed:
                self.client.update_run(self.run_id, status="RUNNING")
                self._batch(tags=[RunTag(k, v) for k, v in all_tags.items()])
            else:
                atomic_write_text(self.run_dir / MLFLOW_RUN_ID, self.run_id + "\n")
            logged = run.data.params  # params are immutable: a resumed run adds only those it lacks
            self._batch(params=[Param(k, param_value(v)) for k, v in flatten(config).items() if k not in logged])
        except BaseException:
            self.close("FAILED")  # rather than left RUNNING for ever
            raise

    def _resumed(self) -> Any:
        path = self.run_dir / MLFLOW_RUN_ID
        if not path.is_file():
            return None
        from mlflow.exceptions import MlflowException

        run_id = path.read_text().strip()
        try:
            run = self.client.get_run(run_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            warn(f"{path}: MLflow run {run_id} is not in {self.uri}; starting a new MLflow run")
            return None
        if run.info.lifecycle_stage == "deleted":
            warn(f"{path}: MLflow run {run_id} was deleted; starting a new MLflow run")
            return None
        return run

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is None:
            root = sqlite_artifact_root(self.uri)
            location = (root / _slug(name)).as_uri() if root else None
            try:
                return self.client.create_experiment(name, artifact_location=location)
            except MlflowException:  # another run of the study created it meanwhile
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            raise UserError(f"MLflow experiment '{name}' is deleted in {self.uri}: restore it "
                            f"(mlflow experiments restore --experiment-id {found.experiment_id}) or delete it for good "
                            f"(mlflow gc), or name the study otherwise")
        return found.experiment_id

    def _batch(self, *, metrics: list | None = None, params: list | None = None, tags: list | None = None) -> None:
        for what, items in (("metrics", metrics or []), ("params", params or []), ("tags", tags or [])):
            for start in range(0, len(items), _BATCH):
                self.client.log_batch(self.run_id, **{what: items[start:start + _BATCH]})

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._batch(metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def log_epoch(self, row: dict[str, Any], step: int) -> None:
        self._metrics(epoch_metrics(row), step)
        self.last_step = step

    def finish(self, summary: dict[str, Any], files: Iterable[Path] = ()) -> None:
        values = final_metrics(summary)
        self._metrics(values, self.last_step)
        for file in files:
            file = Path(file)
            if file.is_dir():
                self.client.log_artifacts(self.run_id, str(file), artifact_path=file.name)
            elif file.is_file():
                self.client.log_artifact(self.run_id, str(file))
            else:
                warn(f"mlflow: {file} does not exist; not logged as an artifact")

    def close(self, status: str = "FINISHED") -> None:
        if not self.closed:
            self.closed = True
            self.client.set_terminated(self.run_id, status=status)
