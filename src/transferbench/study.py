"""`transferbench study FILE.yaml`: a grid of runs declared in one file, planned, checked, then run in turn.

A study file (YAML)::

    name: cifar100-resnet50-layerwise      # default: the file's stem; the runs go to OUTPUT_DIR/NAME/
    description: free text
    dataset_labels:                         # optional: how reports name a dataset (default: CIFAR-10,
      folder:data/c10-jpeg: CIFAR-10 (JPEG copy)  #   CIFAR-100, or a folder dataset's folder name)
    options:                                # RunConfig fields shared by every run (scalars)
      dataset: cifar100
      model: resnet50
      epochs: 15
    grid:                                   # RunConfig fields -> lists: every combination is one run
      strategy: [linear-probe, last-n:3, last-n:25]
      seed: [0, 1, 2]
    variants:                               # optional, named: each one is expanded over the grid;
      faithful: {optimizer: adam}           #   a scalar overrides (options or a grid axis), a list
      improved: {image_size: [160, 224]}    #   sweeps (replacing the grid's axis of that name)
    references:                             # published figures, in percent
      - {label: "last-n:25", match: {strategy: last-n:25}, metric: test_acc, value: 72.18, source: "..."}
    transferability: [logme, hscore]        # optional: score every (dataset, model) before training (see rank)
    select:                                 # "choose on validation, then test" (one rule or a list)
      {name: best-K, among: {strategy: [last-n:3, last-n:25]}, by: best_val_acc, report: test_acc,
       refit: true}                         # optional: retrain the chosen one on train+val, test that

Every run has the outputs of `transferbench run` in OUTPUT_DIR/NAME/[VARIANT/]RUN_NAME, where RUN_NAME is
the default run name plus the values of the swept options it does not already show (``-px224``,
``-n5000``, ``-e20``, ...); OUTPUT_DIR/NAME/study.json records the plan, the references and the
selection rules for `transferbench report`. Paths in the file (``folder:PATH``, ``weights``) are relative
to the current directory, as on the command line. The whole file, and every run's configuration, is
checked before anything runs: an unknown key, a bad value or an empty grid is an error naming the file
and the key. Running a study again skips complete runs and resumes interrupted ones.

`match` (references) and `among` (select) name options as the file sets them, or `variant`; a list
means any of its values. A selection compares configurations (seeds of one configuration averaged) by
`by` and reports the chosen one's `report` figure; it never chooses on the test set. With `refit: true`,
once every candidate has finished, the chosen configuration is trained again per seed on train+val for the
epoch count its run selected (`--refit`) and tested once, in NAME/refit/SELECTION/; that is the reported
answer (the protocol of VTAB and Kornblith et al.), and the report says which protocol gave each answer.
With `transferability`, every model of each dataset is scored (`rank.rank`, on the training features the runs
use) before any run trains, into NAME/transferability/DATASET/rank.json; the report sets the scores beside the
measured accuracy.

Running: `run_study` trains the planned runs in this process, each under a claim (see `claims`), so any number of
processes may share one study directory at once: `study --workers N` on one machine (see `executors`), `--shard K/N`
slices started by a scheduler, `--executor slurm` job arrays, or the same command started on several machines. A run
is claimed atomically before it starts and checked again for summary.json once claimed; a run claimed elsewhere is
waited for; a claim whose holder stopped heartbeating for TRANSFERBENCH_CLAIM_STALE_S (120 s) is taken over and its
run resumed from its last checkpoint; a finished run is never started again. `status_lines` is `study --status`.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from tqdm import tqdm

from . import claims, rank, rundir, training
from .config import FIELDS, DatasetSpec, RunConfig, canonical_dataset, default_run_name, differences, field_type, slug
from .data import check_dataset
from .errors import UserError, did_you_mean
from .models import resolve_name
from .results import load_runs, selection_results
from .strategies import parse_strategy

log = logging.getLogger(__name__)

TOP_KEYS = ("name", "description", "dataset_labels", "options", "grid", "variants", "references", "select",
            "transferability")
REFERENCE_KEYS = ("label", "match", "metric", "value", "source")
SELECT_KEYS = ("name", "among", "by", "report", "refit")
REFIT_DIR = "refit"  # a selection's refit runs: STUDY_DIR/refit/SELECTION/[VARIANT/]RUN
METRICS = ("test_acc", "best_val_acc")
RESERVED = {"name": "run names come from the study", "output_dir": "pass --output-dir to `transferbench study`"}
# Short tags for swept options in run names; other options appear as their own name.
NAME_TAGS = {"image_size": "px", "train_subset": "n", "epochs": "e", "batch_size": "b", "lr": "lr",
             "weight_decay": "wd", "head_epochs": "he", "val_fraction": "val", "label_smoothing": "ls"}
IN_DEFAULT_NAME = ("dataset", "model", "strategy", "seed")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


# ---------------------------------------------------------------------------------------- the plan

@dataclass
class PlannedRun:
    name: str  # "VARIANT/RUN" or "RUN": its path under the study directory
    variant: str | None
    config: RunConfig  # as the study sets it (output_dir and name filled in), not yet resolved
    options: dict[str, Any]  # every option the study file set for this run, in RunConfig order
    sources: dict[str, str] = field(repr=False, default_factory=dict)  # option -> where in the file
    refit_of: str | None = None  # a refit run: the name of the selection it answers

    @property
    def dir(self) -> Path:
        return Path(self.config.output_dir).expanduser() / self.config.name

    def state(self) -> str:
        """'complete', 'interrupted' (started, not finished) or 'new'."""
        if (self.dir / rundir.SUMMARY).is_file():
            return "complete"
        if (self.dir / rundir.CONFIG).is_file():
            return "interrupted"
        return "new"

    def epochs_done(self) -> int:
        path = self.dir / rundir.METRICS
        if not path.is_file():
            return 0
        return len(rundir.read_jsonl(path))


@dataclass
class Reference:
    label: str
    match: dict[str, Any]
    metric: str
    value: float  # percent
    source: str
    runs: list[str]  # names of the planned runs it applies to

    def record(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Selection:
    name: str
    among: dict[str, Any]
    by: str
    report: str
    runs: list[str]  # the candidates
    refit: bool = False  # retrain the chosen configuration on train+val and report that (see plan_refits)

    def record(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Study:
    name: str
    description: str
    path: Path
    output_dir: Path
    runs: list[PlannedRun]
    references: list[Reference]
    selections: list[Selection]
    dataset_labels: dict[str, str] = field(default_factory=dict)
    refits: list[PlannedRun] = field(default_factory=list)  # planned once a refit selection's candidates finished
    transferability: list[str] = field(default_factory=list)  # estimators scoring every (dataset, model)

    @property
    def dir(self) -> Path:
        return self.output_dir.expanduser() / self.name

    def record(self) -> dict:
        """What study.json holds: enough for `transferbench report` to place, compare and select runs."""
        return {
            "format": 1, "name": self.name, "description": self.description, "file": str(self.path),
            "dataset_labels": self.dataset_labels,
            "runs": [{"name": r.name, "variant": r.variant, "options": r.options} for r in self.runs],
            "references": [r.record() for r in self.references],
            "select": [s.record() for s in self.selections],
            "refit_runs": [{"name": r.name, "selection": r.refit_of, "options": r.options} for r in self.refits],
            "transferability": self.transferability,
        }


# ---------------------------------------------------------------------------------------- parsing

def _coerce(src: str, where: str, key: str, value: Any) -> Any:
    """A YAML value as the RunConfig field's type, or a UserError naming the file and the key."""
    kind, optional = field_type(key)
    if value is None:
        if optional:
            return None
        raise UserError(f"{src}: {where}: '{key}' cannot be empty (null)")
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    if kind is str and isinstance(value, str):
        return value
    alias = RunConfig.__dataclass_fields__[key].metadata["bool_alias"]
    if kind is str and alias and isinstance(value, bool):  # augment: false
        return alias[value]
    raise UserError(f"{src}: {where}: '{key}' must be {names.get(kind, kind.__name__)}, got {value!r}")


def _check_key(src: str, where: str, key: Any, extra: tuple[str, ...] = ()) -> str:
    if not isinstance(key, str):
        raise UserError(f"{src}: {where}: key {key!r} is not a name")
    if key in RESERVED and key not in extra:
        raise UserError(f"{src}: {where}: '{key}' cannot be set in a study file ({RESERVED[key]})")
    if key not in FIELDS and key not in extra:
        choices = [f for f in FIELDS if f not in RESERVED] + list(extra)
        raise UserError(f"{src}: {where}: unknown key '{key}'.{did_you_mean(key, choices)}")
    return key


def _mapping(src: str, where: str, value: Any, *, allow_empty: bool = True) -> dict:
    if value is None and allow_empty:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{src}: '{where}' must be a mapping (key: value lines), got {type(value).__name__}")
    if not value and not allow_empty:
        raise UserError(f"{src}: '{where}' is empty")
    return value


def _axis(src: str, where: str, key: str, values: Any) -> list:
    if not isinstance(values, list):
        raise UserError(f"{src}: {where}.{key}: a grid axis must be a list of values, e.g. {key}: [{values!r}]")
    if not values:
        raise UserError(f"{src}: {where}.{key}: empty list: an empty grid axis declares no runs")
    out = [_coerce(src, f"{where}.{key}", key, v) for v in values]
    dupes = sorted({repr(v) for v in out if out.count(v) > 1})
    if dupes:
        raise UserError(f"{src}: {where}.{key}: value {dupes[0]} is listed twice")
    return out


def _scalar(src: str, where: str, key: str, value: Any, hint: str) -> Any:
    if isinstance(value, (list, dict)):
        raise UserError(f"{src}: {where}.{key}: must be a single value here ({hint})")
    return _coerce(src, f"{where}.{key}", key, value)


def _tag(key: str, value: Any) -> str:
    if value is None:  # the option's default: all the data, the weights' own resolution, ...
        text = "all" if key == "train_subset" else "default"
    elif isinstance(value, bool):
        text = str(value).lower()
    else:
        text = f"{value:g}" if isinstance(value, float) else str(value)
    return NAME_TAGS.get(key, key.replace("_", "-") + "-") + slug(text, empty="")


def _matches(run: PlannedRun, match: dict[str, Any]) -> bool:
    for key, wanted in match.items():
        have = run.variant if key == "variant" else run.options.get(key, getattr(run.config, key))
        if have not in (wanted if isinstance(wanted, list) else [wanted]):
            return False
    return True


def _parse_match(src: str, where: str, value: Any) -> dict[str, Any]:
    match = {}
    for key, wanted in _mapping(src, where, value).items():
        _check_key(src, where, key, extra=("variant",))
        if key == "variant":
            match[key] = [str(v) for v in wanted] if isinstance(wanted, list) else str(wanted)
        elif isinstance(wanted, list):
            match[key] = [_coerce(src, f"{where}.{key}", key, v) for v in wanted]
        else:
            match[key] = _coerce(src, f"{where}.{key}", key, wanted)
    return match


def _fmt(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (bool, type(None))) else str(value)


def _validate_values(src: str, runs: list[PlannedRun]) -> None:
    """What `training.preflight` checks, with the place in the file that set the bad value: each distinct
    strategy, model and dataset once, then every run's full configuration."""
    seen: set[tuple[str, Any]] = set()
    for run in runs:
        for key, check in (("strategy", parse_strategy), ("dataset", check_dataset), ("model", resolve_name)):
            value = getattr(run.config, key)
            if (key, value) in seen:
                continue
            seen.add((key, value))
            try:
                check(value)
            except UserError as err:
                raise UserError(f"{src}: {run.sources.get(key, 'default ' + key)}: {err}") from None
    for run in runs:
        try:
            run.config.validate()
        except UserError as err:
            message = str(err)
            flags = [m.replace("-", "_") for m in re.findall(r"--([a-z][a-z-]*)", message)]
            where = next((run.sources[f] for f in flags if f in run.sources), None)
            raise UserError(f"{src}: " + (f"{where}: " if where else "") + f"{message} (run '{run.name}')") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise UserError(f"{self.source}: line {key_node.start_mark.line + 1}: key {key!r} is given twice in "
                                f"one "
                                f"mapping; keep one (YAML would silently use the last)")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read(path: Path) -> dict:
    src = str(path)
    if path.is_dir():
        raise UserError(f"study file {src} is a directory; give the .yaml file inside it (see studies/)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"study file {src} does not exist") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{src}: not UTF-8 text (byte {err.start}); save the study file as UTF-8") from None
    except OSError as err:
        raise UserError(f"cannot read study file {src} ({err.strerror})") from None
    loader = _UniqueKeyLoader(text)
    loader.source = src
    try:
        doc = loader.get_single_data()
    except yaml.YAMLError as err:
        raise UserError(f"{src}: not valid YAML: {err}") from None
    finally:
        loader.dispose()
    doc = _mapping(src, "the file", doc, allow_empty=False)
    for key in doc:
        if key not in TOP_KEYS:
            raise UserError(f"{src}: unknown top-level key '{key}' (expected {', '.join(TOP_KEYS)})."
                            f"{did_you_mean(str(key), TOP_KEYS)}")
    return doc


def _parse_header(src: str, doc: dict, path: Path) -> tuple[str, str]:
    name = doc.get("name", path.stem)
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise UserError(f"{src}: name: {name!r} must be a plain directory name (letters, digits, '.', '_', '-')")
    description = doc.get("description") or ""
    if not isinstance(description, str):
        raise UserError(f"{src}: description must be text")
    return name, description


def _parse_options(src: str, doc: dict) -> dict[str, Any]:
    options = {}
    for key, value in _mapping(src, "options", doc.get("options")).items():
        _check_key(src, "options", key)  # before the value: an unknown key has no type to check it against
        options[key] = _scalar(src, "options", key, value, "put values to sweep under grid")
    return options


def _parse_grid(src: str, doc: dict, options: dict[str, Any]) -> dict[str, list]:
    if "grid" not in doc:
        return {}
    raw = _mapping(src, "grid", doc["grid"], allow_empty=True)
    if not raw:
        raise UserError(f"{src}: grid is empty: give at least one key with a list of values, or remove 'grid'")
    grid = {}
    for key, values in raw.items():
        _check_key(src, "grid", key)
        grid[key] = _axis(src, "grid", key, values)
        if key in options:
            raise UserError(f"{src}: grid.{key}: '{key}' is also in options; keep it in one place")
    return grid


def _parse_variants(src: str, doc: dict) -> dict[str, dict]:
    if "variants" not in doc:
        return {}
    raw = _mapping(src, "variants", doc["variants"], allow_empty=True)
    if not raw:
        raise UserError(f"{src}: variants is empty: name at least one variant, or remove 'variants'")
    variants: dict[str, dict] = {}
    for vname, body in raw.items():
        if not isinstance(vname, str) or not _NAME_RE.fullmatch(vname):
            raise UserError(f"{src}: variants: {vname!r} must be a plain directory name (letters, digits, '.', '_', "
                            f"'-')")
        variants[vname] = {}
        for key, value in _mapping(src, f"variants.{vname}", body).items():
            _check_key(src, f"variants.{vname}", key)
            variants[vname][key] = (_axis(src, f"variants.{vname}", key, value) if isinstance(value, list)
                                    else _scalar(src, f"variants.{vname}", key, value, ""))
    return variants


def _plan_runs(src: str, study_dir: Path, options: dict, grid: dict, variants: dict) -> list[PlannedRun]:
    """Every combination of the grid, per variant; a variant's scalar overrides, its list sweeps."""
    runs: list[PlannedRun] = []
    for vname, body in (variants or {None: {}}).items():
        fixed = dict(options)
        sources = {k: f"options.{k}" for k in options}
        axes = dict(grid)
        sources.update({k: f"grid.{k}" for k in grid})
        for key, value in body.items():
            sources[key] = f"variants.{vname}.{key}"
            if isinstance(value, list):
                axes[key] = value
                fixed.pop(key, None)
            else:
                fixed[key] = value
                axes.pop(key, None)
        swept = [k for k, v in axes.items() if len(v) > 1 and k not in IN_DEFAULT_NAME]
        for combo in itertools.product(*axes.values()):
            chosen = {**fixed, **dict(zip(axes, combo))}
            chosen = {k: chosen[k] for k in FIELDS if k in chosen}
            base = RunConfig(**chosen)
            run_name = "-".join([default_run_name(base), *(_tag(k, chosen[k]) for k in swept)])
            out = study_dir / vname if vname else study_dir
            runs.append(PlannedRun(f"{vname}/{run_name}" if vname else run_name, vname,
                                   dataclasses.replace(base, output_dir=str(out), name=run_name), chosen, sources))
    by_name: dict[str, PlannedRun] = {}
    for run in runs:
        if run.name in by_name:
            raise UserError(f"{src}: two runs would both be named '{run.name}' ({run.options} and "
                            f"{by_name[run.name].options}); make them differ in a swept key or put them in different "
                            f"variants")
        by_name[run.name] = run
    return runs


def _check_metric(src: str, where: str, metric: Any) -> str:
    if metric not in METRICS:
        raise UserError(f"{src}: {where}: must be one of {', '.join(METRICS)}, got {metric!r}."
                        f"{did_you_mean(str(metric), METRICS)}")
    return metric


def _check_entry_keys(src: str, where: str, entry: dict, allowed: tuple[str, ...]) -> None:
    for key in entry:
        if key not in allowed:
            raise UserError(f"{src}: {where}: unknown key '{key}' (expected {', '.join(allowed)})."
                            f"{did_you_mean(str(key), allowed)}")


def _parse_references(src: str, doc: dict, runs: list[PlannedRun]) -> list[Reference]:
    raw = doc.get("references") or []
    if not isinstance(raw, list):
        raise UserError(f"{src}: references must be a list of entries (- match: ..., value: ...)")
    references = []
    for i, entry in enumerate(raw):
        where = f"references[{i}]"
        entry = _mapping(src, where, entry, allow_empty=False)
        _check_entry_keys(src, where, entry, REFERENCE_KEYS)
        if "match" not in entry or "value" not in entry:
            raise UserError(f"{src}: {where}: needs 'match' (which runs) and 'value' (the published figure, in "
                            f"percent)")
        match = _parse_match(src, f"{where}.match", entry["match"])
        value = entry["value"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
            raise UserError(f"{src}: {where}.value: must be a percentage between 0 and 100 (e.g. 79.32), got {value!r}")
        metric = _check_metric(src, f"{where}.metric", entry.get("metric", "test_acc"))
        matched = [r.name for r in runs if _matches(r, match)]
        if not matched:
            raise UserError(f"{src}: {where}.match: {match} matches none of the study's {len(runs)} runs")
        label = entry.get("label") or " ".join(str(v) for v in match.values())
        references.append(Reference(str(label), match, metric, float(value), str(entry.get("source") or ""), matched))
    return references


def _parse_selections(src: str, doc: dict, runs: list[PlannedRun]) -> list[Selection]:
    raw = doc.get("select")
    raw = [] if raw is None else raw if isinstance(raw, list) else [raw]
    selections = []
    for i, entry in enumerate(raw):
        where = f"select[{i}]" if isinstance(doc.get("select"), list) else "select"
        entry = _mapping(src, where, entry, allow_empty=False)
        _check_entry_keys(src, where, entry, SELECT_KEYS)
        among = _parse_match(src, f"{where}.among", entry.get("among"))
        by = _check_metric(src, f"{where}.by", entry.get("by", "best_val_acc"))
        report = _check_metric(src, f"{where}.report", entry.get("report", "test_acc"))
        if by == "test_acc":
            raise UserError(f"{src}: {where}.by: selecting on test_acc would report a test figure chosen on the test "
                            f"set; select by best_val_acc")
        refit = entry.get("refit", False)
        if not isinstance(refit, bool):
            raise UserError(f"{src}: {where}.refit: true or false, got {refit!r}")
        if refit and report != "test_acc":
            raise UserError(f"{src}: {where}.report: a refit run has no validation split left; with refit: true "
                            f"report test_acc")
        candidates = [r.name for r in runs if _matches(r, among)]
        if len(candidates) < 2:
            raise UserError(f"{src}: {where}.among: {among} matches {len(candidates)} run(s); a selection needs at "
                            f"least two candidates")
        name = str(entry.get("name") or f"selection-{i + 1}")
        if not _NAME_RE.fullmatch(name):
            raise UserError(f"{src}: {where}.name: {name!r} names a directory of refit runs: letters, digits, '.', "
                            f"'_' and '-' only")
        if name in {s.name for s in selections}:
            raise UserError(f"{src}: {where}.name: two selections are named '{name}'")
        selections.append(Selection(name, among, by, report, candidates, refit))
    return selections


def _parse_transferability(src: str, doc: dict) -> list[str]:
    raw = doc.get("transferability")
    if raw is None:
        return []
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{src}: transferability: a list of estimators, e.g. [logme, hscore], got {raw!r}")
    try:
        return rank.parse_estimators([str(e) for e in raw])
    except UserError as err:
        raise UserError(f"{src}: transferability: {err}") from None


def _parse_dataset_labels(src: str, doc: dict, runs: list[PlannedRun]) -> dict[str, str]:
    labels = {}
    for spec, label in _mapping(src, "dataset_labels", doc.get("dataset_labels")).items():
        if not any(r.options.get("dataset", RunConfig.dataset) == spec for r in runs):
            used = sorted({r.options.get("dataset", RunConfig.dataset) for r in runs})
            raise UserError(f"{src}: dataset_labels: '{spec}' is not a dataset of this study ({', '.join(used)})")
        if not isinstance(label, str) or not label.strip():
            raise UserError(f"{src}: dataset_labels.{spec}: must be a non-empty text, got {label!r}")
        labels[canonical_dataset(str(spec))] = label.strip()  # as config.json records it
    return labels


def _transformed(runs: list[PlannedRun], transform: Callable[[PlannedRun], dict[str, Any] | None],
                 items: list) -> list[PlannedRun]:
    kept = []
    for run in runs:
        new = transform(run)
        if new is None:
            continue
        new = {k: new[k] for k in FIELDS if k in new and k not in RESERVED}
        config = dataclasses.replace(RunConfig(**new), output_dir=run.config.output_dir, name=run.config.name)
        kept.append(dataclasses.replace(run, config=config))
    names = {r.name for r in kept}
    for item in items:
        item.runs = [n for n in item.runs if n in names]
    return kept


def load_study(path: str | Path, output_dir: str | Path = "runs", *,
               transform: Callable[[PlannedRun], dict[str, Any] | None] | None = None) -> Study:
    """Read and check a study file, and plan its runs (nothing is written).

    `transform(run)` may return replacement options for a planned run, or None to drop it; names,
    references and selections keep what the file says (tests use this to run shrunken copies).
    Raises UserError, naming the file and the key, for anything wrong.
    """
    path = Path(path)
    src = str(path)
    doc = _read(path)
    name, description = _parse_header(src, doc, path)
    options = _parse_options(src, doc)
    grid = _parse_grid(src, doc, options)
    variants = _parse_variants(src, doc)
    if not grid and not variants:
        raise UserError(f"{src}: declares no runs: add a 'grid' (keys with lists of values) and/or 'variants'")
    runs = _plan_runs(src, Path(output_dir).expanduser() / name, options, grid, variants)
    references = _parse_references(src, doc, runs)
    selections = _parse_selections(src, doc, runs)
    dataset_labels = _parse_dataset_labels(src, doc, runs)
    transferability = _parse_transferability(src, doc)
    if transform is not None:
        runs = _transformed(runs, transform, [*references, *selections])
    _validate_values(src, runs)
    return Study(name, description, path, Path(output_dir), runs, references, selections, dataset_labels,
                 transferability=transferability)


# -------------------------------------------------------------------------------------- running

def parse_shard(text: str) -> tuple[int, int]:
    """`--shard K/N` -> (K, N): the K-th of N slices of the grid, K counted from 0 (K = 0 .. N-1)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise UserError(f"--shard {text!r}: expected K/N, the K-th of N slices counted from 0 (e.g. --shard 0/4; in a "
                        f"SLURM array: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --array=0-3)")
    k, n = int(m[1]), int(m[2])
    if n < 1:
        raise UserError(f"--shard {text}: N must be at least 1")
    if k >= n:
        raise UserError(f"--shard {k}/{n}: shards are numbered from 0 to {n - 1}. For a SLURM array that starts at 1 "
                        f"(--array=1-{n}) pass --shard $((SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN))/"
                        f"$SLURM_ARRAY_TASK_COUNT")
    return k, n


def shard_runs(runs: list[PlannedRun], shard: tuple[int, int] | None) -> list[PlannedRun]:
    """Shard K of N: runs K, K+N, K+2N, ... in plan order. The shards are disjoint, cover the grid, and each gets a
    mix of the grid's options (a slow axis is spread over all of them)."""
    if shard is None:
        return list(runs)
    k, n = shard
    return list(runs)[k::n]


def check_existing(study: Study) -> dict[str, str]:
    """State of every planned run; a run started or finished with other options is an error. Safe while other
    processes run the same study: every file it reads is written atomically, and one that vanishes meanwhile
    (a finished run's checkpoint) is read as absent."""
    states = {}
    for run in study.runs:
        state = run.state()
        if state != "new":
            try:
                saved = rundir.read_json(run.dir / rundir.CONFIG)
            except FileNotFoundError:
                saved = {}
            planned = run.config.resolved().to_dict()
            diffs = differences(saved, planned)
            if diffs:
                k = diffs[0]
                was = f"{run.dir} was {'run' if state == 'complete' else 'started'} with {k}={saved[k]!r}, but"
                if k in run.options:
                    raise UserError(f"{was} {study.path} now says {k}={planned[k]!r}; choose another --output-dir, "
                                    f"or delete that run directory to redo it")
                raise UserError(f"{was} the default of {k} is now {planned[k]!r} ({study.path} does not set it); to "
                                f"keep that run, set {k}: {saved[k]!r} in the study file, or delete the run directory "
                                f"to redo it with the new default")
        states[run.name] = state
    return states


def write_record(study: Study) -> None:
    """study.json, unless it already says the same: many processes may start one study at once, and each
    writes the same record atomically (a reader sees the old or the new file, whole)."""
    path = study.dir / rundir.STUDY_RECORD
    record = study.record()
    try:
        if rundir.read_json(path) == record:
            return
    except (OSError, ValueError):
        pass
    rundir.atomic_write_json(path, record)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _weight(run: PlannedRun) -> float:
    """Rough relative cost of a run, for the time estimate: one evaluation pass plus its epochs."""
    if not parse_strategy(run.config.strategy).trains:
        return 1.0
    return 1.0 + run.config.epochs * (0.3 if run.config.train_subset else 1.0)


def planned_epochs(run: PlannedRun) -> int:
    """The epochs the run trains (0 for a strategy that trains nothing or fits cached features)."""
    return run.config.resolved().epochs


class Overall:
    """Overall progress (runs done / total, elapsed, estimate left), kept above each run's own bar."""

    def __init__(self, name: str, runs: list[PlannedRun], states: dict[str, str], enabled: bool):
        self.total = len(runs)
        self.done = sum(states[r.name] == "complete" for r in runs)
        self.left_weight = sum(_weight(r) for r in runs if states[r.name] != "complete")
        self.spent_weight = 0.0
        self.start = time.perf_counter()
        self.note = ""
        self.bar = tqdm(total=self.total, initial=self.done, position=0, leave=True, dynamic_ncols=True,
                        desc=f"study {name}", unit="run", disable=not enabled,
                        bar_format="{desc}: {n_fmt}/{total_fmt} runs{postfix} |{bar}|")
        self.refresh()

    def eta(self) -> str:
        elapsed = time.perf_counter() - self.start
        if self.spent_weight == 0:
            return "estimate after the first run"
        return f"~{format_duration(elapsed / self.spent_weight * max(self.left_weight, 0.0))} left"

    def status(self) -> str:
        elapsed = format_duration(time.perf_counter() - self.start)
        return f"{self.done}/{self.total} runs done, {elapsed} elapsed, {self.eta()}"

    def refresh(self, note: str | None = None) -> None:
        if note is not None:
            self.note = note
        self.bar.set_postfix_str(f"{format_duration(time.perf_counter() - self.start)} elapsed, {self.eta()}"
                                 + (f"; {self.note}" if self.note else ""))

    def finished(self, run: PlannedRun, completed: bool) -> None:
        """A run this process (or one of its workers) trained ended, complete or failed."""
        w = _weight(run)
        self.left_weight -= w
        self.spent_weight += w
        if completed:
            self.done += 1
            self.bar.update(1)
        self.refresh()

    def done_elsewhere(self, run: PlannedRun) -> None:
        """Another process completed the run: it counts as done, and says nothing about our speed."""
        self.left_weight -= _weight(run)
        self.done += 1
        self.bar.update(1)
        self.refresh()

    def close(self) -> None:
        self.bar.close()


class Hooks:
    """How a process running a study reports to whoever started it. The default reports nothing; a worker of
    `study --workers N` publishes its state for the parent's display (see `executors`), a DDP task tells its other
    ranks when to train."""

    def update(self, **state: Any) -> None:
        """The worker's state changed: state='running' (run, epoch, epochs, since), 'waiting' (waiting: names),
        'idle'; done / failed: what it finished so far."""

    def stop(self) -> bool:
        """True when no new run should be started (a sibling worker failed and --keep-going is off)."""
        return False

    def failed_elsewhere(self) -> set[str]:
        """Runs a sibling worker of the same session failed: not retried here."""
        return set()

    def before_training(self, run: PlannedRun) -> None:
        """Called once the run is claimed, just before training.run."""


WAIT_POLL_S = 2.0  # how often a process waiting for runs held elsewhere looks at them again


class ClaimLost(Exception):
    """Our claim on a run was taken over: our heartbeat stopped for longer than stale_after_s (the process was
    suspended, the file server unreachable), and another worker now resumes the run."""


@contextmanager
def _watch_epochs(claim: claims.Claim, on_epoch: Callable[[int], None]):
    """While a run trains: report each finished epoch, and stop at the next epoch boundary once the claim is lost
    (the new owner has resumed from a checkpoint; two writers must not go on)."""
    previous = training.after_epoch

    def after_epoch(epoch: int) -> None:
        previous(epoch)
        on_epoch(epoch)
        if claim.lost:
            raise ClaimLost

    training.after_epoch = after_epoch
    try:
        yield
    finally:
        training.after_epoch = previous


def _holder(info: dict[str, Any] | None) -> str:
    if not info:
        return "another worker"
    return f"{info.get('host', '?')} pid {info.get('pid', '?')}"


class _Runner:
    """Runs the given runs of a study in this process, each under a claim, so that any number of processes may
    share the study directory: a run claimed elsewhere is left to its holder and waited for, a run whose holder
    stopped heartbeating is taken over and resumed, a finished run is never started again."""

    def __init__(self, study: Study, runs: list[PlannedRun], states: dict[str, str], *, progress: bool,
                 keep_going: bool, hooks: Hooks):
        self.study, self.runs, self.progress, self.keep_going, self.hooks = study, runs, progress, keep_going, hooks
        self.stale_s, self.heartbeat_s = claims.intervals()
        self.overall = Overall(study.name, runs, states, progress)
        self.ran: list[str] = []  # trained to completion here
        self.elsewhere: list[str] = []  # completed by another process while this one ran
        self.failed: dict[str, str] = {}

    def attempt(self, run: PlannedRun) -> str:
        """'done' (trained here), 'complete' (someone else finished it), 'busy' (claimed elsewhere) or 'lost'."""
        if run.state() == "complete":
            return "complete"
        before = claims.claim_state(run.dir, self.stale_s)
        claim = claims.try_claim(run.dir, stale_after_s=self.stale_s, heartbeat_s=self.heartbeat_s)
        if claim is None:
            return "complete" if run.state() == "complete" else "busy"
        with claim:
            state = run.state()  # after claiming: it may have been finished and released just now
            if state == "complete":
                return "complete"
            name = self.study.name
            if before and before["stale"]:
                log.warning(f"[study {name}] {run.name}: {_holder(before)} sent no heartbeat for "
                            f"{format_duration(before['age_s'])}; taking the run over")
            epochs, done = planned_epochs(run), run.epochs_done()
            how = f"resuming {run.name} after epoch {done}" if state == "interrupted" and done else (
                f"resuming {run.name}" if state == "interrupted" else f"starting {run.name}")
            log.info(f"[study {name}] {self.overall.status()}; {how}")
            self.hooks.update(state="running", run=run.name, epoch=done, epochs=epochs, resumed_at=done,
                              since=time.time())
            self.hooks.before_training(run)
            with _watch_epochs(claim, lambda epoch: self.hooks.update(epoch=epoch)):
                try:
                    summary = training.run(run.config, resume=True, progress=self.progress, tags={"study": name})
                except ClaimLost:
                    log.warning(f"[study {name}] {run.name}: our claim was taken over (no heartbeat for "
                                f"{format_duration(self.stale_s)}: was this process suspended?); stopped, the new "
                                f"holder goes on")
                    return "lost"
            self.ran.append(run.name)  # published before the claim goes, so no one reports it as done elsewhere first
            self.hooks.update(state="idle", run=None, done=self.ran,
                              last={"run": run.name, "test_acc": summary.get("test_acc")})
        return "done"

    def fail(self, run: PlannedRun, err: Exception) -> None:
        self.overall.finished(run, completed=False)
        if not isinstance(err, UserError):  # a bug, not bad input: keep its traceback for the report
            log.debug(f"run {run.name} failed", exc_info=True)
            err = UserError(f"{type(err).__name__}: {err}")
        self.failed[run.name] = str(err)
        self.hooks.update(state="idle", run=None, failed=self.failed)
        if not self.keep_going:
            raise UserError(f"study {self.study.name}: run '{run.name}' failed: {err}\nCompleted runs are kept: fix "
                            f"the problem and run the study again to continue (--keep-going runs the others "
                            f"first).") from None
        log.warning(f"[study {self.study.name}] run {run.name} failed: {err}")

    def wait_note(self, busy: list[PlannedRun]) -> str:
        holders = []
        for run in busy[:3]:
            info = claims.claim_state(run.dir, self.stale_s)
            beat = f", heartbeat {format_duration(info['age_s'])} ago" if info else ""
            holders.append(f"{run.name} ({_holder(info)}{beat})")
        more = f" and {len(busy) - 3} more" if len(busy) > 3 else ""
        return (f"waiting for {len(busy)} run(s) other workers hold: {', '.join(holders)}{more}; a holder silent for "
                f"{format_duration(self.stale_s)} is taken over")

    def loop(self, pending: list[PlannedRun]) -> None:
        """Pass over the pending runs until none is left. A pass that trained something is followed at once by
        another (runs held elsewhere may have finished meanwhile); a pass that only found busy runs waits a little
        (at most WAIT_POLL_S) before looking again."""
        waiting_for: list[str] = []
        while pending:
            busy, progressed = [], False
            for run in pending:
                if self.hooks.stop():
                    return
                if run.name in self.hooks.failed_elsewhere():
                    continue
                try:
                    outcome = self.attempt(run)
                except Exception as err:
                    self.fail(run, err)
                    progressed = True
                    continue
                if outcome == "done":
                    progressed = True
                    self.overall.finished(run, completed=True)
                elif outcome == "complete":
                    self.elsewhere.append(run.name)
                    self.hooks.update(elsewhere=self.elsewhere)
                    self.overall.done_elsewhere(run)
                    log.info(f"[study {self.study.name}] {run.name} was completed by another worker")
                else:  # busy, or lost to a new holder: wait for it to finish (or to go silent in turn)
                    busy.append(run)
            pending = busy
            if pending and not progressed:
                names = [r.name for r in pending]
                if names != waiting_for:
                    log.info(f"[study {self.study.name}] {self.wait_note(pending)}")
                    waiting_for = names
                self.hooks.update(state="waiting", run=None, waiting=names)
                self.overall.refresh(f"waiting for {len(pending)} run(s) held elsewhere")
                time.sleep(min(self.heartbeat_s, WAIT_POLL_S))
        self.overall.refresh("")


def transferability_dir(study: Study, dataset: str) -> Path:
    return study.dir / rundir.TRANSFERABILITY_DIR / slug(DatasetSpec.parse(dataset).short_name())


def score_transferability(study: Study, *, progress: bool) -> None:
    """Score every model of each dataset of the study with its `transferability` estimators, before training: one
    `rank.rank` per dataset on the training features its first run defines (split, subset, seed, image size), each
    model with the weights its runs load, into STUDY_DIR/transferability/DATASET/rank.json|csv. A ranking already
    there for the same models is kept; one claimed by another process is left to it."""
    stale_s, heartbeat_s = claims.intervals()
    datasets: dict[str, list[PlannedRun]] = {}
    for run in study.runs:
        datasets.setdefault(canonical_dataset(run.config.dataset), []).append(run)
    for dataset, runs in datasets.items():
        weights: dict[str, str | None] = {}
        for run in runs:
            weights.setdefault(run.config.model, run.config.weights)  # the first run's weights speak for the model
        out = transferability_dir(study, dataset)
        try:
            done = rundir.read_json(out / rundir.RANK_JSON)
            if {r["model"] for r in done["rows"]} == set(weights) and done["estimators"] == study.transferability:
                continue
        except (OSError, ValueError, KeyError, TypeError):
            pass
        claim = claims.try_claim(out, stale_after_s=stale_s, heartbeat_s=heartbeat_s)
        if claim is None:
            log.info(f"[study {study.name}] {out} is being scored by another process")
            continue
        with claim:
            log.info(f"[study {study.name}] transferability of {len(weights)} models on {runs[0].config.dataset} "
                     f"({', '.join(study.transferability)}), before fine-tuning")
            try:
                ranking = rank.rank(runs[0].config, list(weights), estimators=study.transferability,
                                    weights={m: w for m, w in weights.items() if w}, progress=progress)
            except UserError as err:
                log.warning(f"[study {study.name}] no transferability scores for {runs[0].config.dataset}: {err}")
                continue
            ranking.write(out)
            log.info(f"[study {study.name}] {ranking.summary_line()} -> {out}")


def plan_refits(study: Study) -> list[str]:
    """Plan (into study.refits) the refit runs of every `refit: true` selection whose candidates have all finished:
    the chosen configuration, one run per seed, trained on train+val (`--refit`) for the epoch count that seed's run
    selected on validation, then tested once. Returns a note for each refit selection with nothing to run yet."""
    if not any(s.refit for s in study.selections):
        return []  # reading every finished run is for refit selections only
    planned = {r.name: r for r in study.runs}
    runs = load_runs(study.dir) if (study.dir / rundir.STUDY_RECORD).is_file() else []
    results = {r["name"]: r for r in selection_results(runs) if r["study"] == study.name}
    notes, refits = [], []
    for sel in (s for s in study.selections if s.refit):
        result = results.get(sel.name)
        if result is None or result["group"] is None or result["finished"] < result["planned"]:
            done = result["finished"] if result else 0
            notes.append(f"select {sel.name}: its refit waits for every candidate ({done} of {len(sel.runs)} "
                         f"finished)")
            continue
        group = result["group"]
        if not group.strategy.trains or group.strategy.fits_features:
            notes.append(f"select {sel.name}: the chosen {group.strategy.name} has no epochs to refit (logreg refits "
                         f"on train+val inside its run; knn and zero-shot train nothing): its run is the answer")
            continue
        for run in group.runs:
            base = planned[run.in_study]
            epochs = int(run.summary["best_epoch"])
            if group.strategy.phased and epochs <= base.config.head_epochs:
                epochs = base.config.epochs  # chosen inside the head phase: the whole declared schedule again
            options = {**base.options, "epochs": epochs, "refit": True}
            out = study.dir / REFIT_DIR / sel.name / (base.variant or "")
            config = dataclasses.replace(base.config, epochs=epochs, refit=True, output_dir=str(out))
            refits.append(PlannedRun(f"{REFIT_DIR}/{sel.name}/{base.name}", base.variant, config, options,
                                     base.sources, refit_of=sel.name))
    study.refits = refits
    return notes


def run_study(study: Study, *, progress: bool = True, keep_going: bool = False, shard: tuple[int, int] | None = None,
              only: list[str] | None = None, hooks: Hooks | None = None) -> dict[str, Any]:
    """Run every planned run (of shard K/N, or named in `only`) that is not complete yet; interrupted ones resume.

    Any number of processes, on any number of machines, may run the same study directory at once: each run is
    claimed (see `claims`) before it starts, runs claimed elsewhere are waited for, and a claim whose holder died is
    taken over after TRANSFERBENCH_CLAIM_STALE_S (120 s) and the run resumed from its last checkpoint.
    Returns the outcome: complete (runs complete now), skipped (complete before), ran, elsewhere, failed, ...
    """
    hooks = hooks or Hooks()
    states = check_existing(study)
    plan_refits(study)  # those that can choose already, so study.json lists them from the start
    write_record(study)
    if study.transferability and only is None:  # a job-array task runs its one run only
        score_transferability(study, progress=progress)
    runs = shard_runs(study.runs, shard)
    if only is not None:
        runs = [r for r in runs if r.name in set(only)]
    where = f" (shard {shard[0]}/{shard[1]}: {len(runs)} of {len(study.runs)} runs)" if shard else ""
    runner = _Runner(study, runs, states, progress=progress, keep_going=keep_going, hooks=hooks)
    skipped = [r.name for r in runs if states[r.name] == "complete"]
    if skipped:
        log.info(f"study {study.name}{where}: {len(skipped)} of {len(runs)} runs already complete, skipped")
    try:
        runner.loop([r for r in runs if states[r.name] != "complete"])
    finally:
        runner.overall.close()
    elapsed = time.perf_counter() - runner.overall.start
    others = f", {len(runner.elsewhere)} finished by other workers" if runner.elsewhere else ""
    log.info(f"study {study.name}{where}: {runner.overall.done}/{len(runs)} runs complete ({len(skipped)} skipped, "
             f"{len(runner.failed)} failed{others}) in {format_duration(elapsed)} -> {study.dir}")
    ran, failed = list(runner.ran), dict(runner.failed)
    if only is None and any(s.refit for s in study.selections):  # a job-array task runs its one run only
        ran_refits, failed_refits = _run_refits(study, progress=progress, keep_going=keep_going, hooks=hooks)
        ran += ran_refits
        failed.update(failed_refits)
    selections = summarize(study)
    return {"complete": runner.overall.done, "skipped": skipped, "ran": ran, "elsewhere": runner.elsewhere,
            "failed": failed, "elapsed_s": time.perf_counter() - runner.overall.start, "selections": selections}


def _run_refits(study: Study, *, progress: bool, keep_going: bool, hooks: Hooks) -> tuple[list[str], dict[str, str]]:
    """The refit runs whose selections can choose now (every candidate finished, here or elsewhere), each claimed
    like any other run, so of several processes finishing a study each refit trains once."""
    for note in plan_refits(study):
        log.info(f"[study {study.name}] {note}")
    write_record(study)
    states = {r.name: r.state() for r in study.refits}
    pending = [r for r in study.refits if states[r.name] != "complete"]
    if not pending:
        return [], {}
    runner = _Runner(study, study.refits, states, progress=progress, keep_going=keep_going, hooks=hooks)
    try:
        runner.loop(pending)
    finally:
        runner.overall.close()
    return runner.ran, runner.failed


def summarize(study: Study) -> list[str]:
    """Log the study's selections (on what is complete so far) and where its report comes from."""
    selections = selection_results(load_runs(study.dir)) if study.dir.is_dir() else []
    for result in selections:
        log.info(result["text"])
    log.info(f"tables and plots: transferbench report {study.dir}")
    return [r["text"] for r in selections]


# ---------------------------------------------------------------------------------- looking at a study

def plan_lines(study: Study, shard: tuple[int, int] | None = None) -> list[str]:
    """One line per planned run with its state and options: what `study --dry-run` prints."""
    states = check_existing(study)
    runs = shard_runs(study.runs, shard)
    counts = {s: sum(states[r.name] == s for r in runs) for s in ("new", "interrupted", "complete")}
    where = f" (shard {shard[0]}/{shard[1]}: {len(runs)} of {len(study.runs)} runs)" if shard else ""
    lines = [f"study {study.name} ({study.path}): {len(study.runs)} runs{where} -> {study.dir}"]
    width = max((len(r.name) for r in runs), default=0)
    number = {r.name: i for i, r in enumerate(study.runs, 1)}
    for run in runs:
        state = states[run.name]
        tag = {"complete": "done", "interrupted": f"resume@{run.epochs_done()}", "new": "new"}[state]
        opts = " ".join(f"{k}={_fmt(v)}" for k, v in run.options.items())
        lines.append(f"{number[run.name]:>4}  {tag:<10} {run.name:<{width}}  {opts}")
    for ref in study.references:
        lines.append(f"reference: {ref.label}: {ref.value:g}% {ref.metric} ({len(ref.runs)} run(s))"
                     + (f" [{ref.source}]" if ref.source else ""))
    for sel in study.selections:
        then = ", then its refit on train+val, tested once" if sel.refit else f", reporting its {sel.report}"
        lines.append(f"select {sel.name}: the best of {len(sel.runs)} runs by {sel.by}{then}")
    lines += plan_refits(study)
    for run in study.refits:
        state = run.state()
        lines.append(f"refit {run.name}: {'done' if state == 'complete' else state}, epochs={run.config.epochs}")
    lines.append(f"dry run: {counts['new']} to start, {counts['interrupted']} to resume, {counts['complete']} "
                 f"complete; "
                 f"nothing was run")
    return lines


def _clock(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "?"


def status_lines(study: Study, shard: tuple[int, int] | None = None) -> list[str]:
    """What `study --status` prints: every run as done, running (where, since when), stale (its holder stopped
    heartbeating: the next worker takes it over) or pending (new, or interrupted and waiting to be resumed)."""
    stale_s, _ = claims.intervals()
    states = check_existing(study)
    runs = shard_runs(study.runs, shard)
    where = f" (shard {shard[0]}/{shard[1]}: {len(runs)} of {len(study.runs)} runs)" if shard else ""
    lines = [f"study {study.name} ({study.path}): {len(study.runs)} runs{where} -> {study.dir}"]
    waiting = plan_refits(study)
    runs += study.refits  # numbered R
    width = max((len(r.name) for r in runs), default=0)
    number = {r.name: str(i) for i, r in enumerate(study.runs, 1)}
    counts = dict.fromkeys(("done", "running", "stale", "pending"), 0)
    for run in runs:
        info = claims.claim_state(run.dir, stale_s)
        epochs, done = planned_epochs(run), run.epochs_done()
        progress = f"epoch {done}/{epochs}" if epochs else "no epochs"
        if states.get(run.name) == "complete" or run.state() == "complete":
            tag = "done"
            try:
                acc = rundir.read_json(run.dir / rundir.SUMMARY).get("test_acc")
            except (OSError, ValueError):
                acc = None
            detail = f"test_acc {acc:.4f}" if isinstance(acc, (int, float)) else "complete"
        elif info is not None and not info["stale"]:
            tag = "running"
            detail = (f"{progress} on {_holder(info)} since {_clock(info.get('started'))}, heartbeat "
                      f"{format_duration(info['age_s'])} ago")
        elif info is not None:
            tag = "stale"
            detail = (f"{progress}; {_holder(info)} (since {_clock(info.get('started'))}) sent no heartbeat for "
                      f"{format_duration(info['age_s'])}: the next worker takes it over and resumes it")
        else:
            tag = "pending"
            detail = f"interrupted, resumes after epoch {done}/{epochs}" if run.state() == "interrupted" else "new"
        counts[tag] += 1
        lines.append(f"{number.get(run.name, 'R'):>4}  {tag:<8} {run.name:<{width}}  {detail}")
    lines.append(", ".join(f"{n} {tag}" for tag, n in counts.items())
                 + f" (a claim is stale after {format_duration(stale_s)} without heartbeat)")
    return lines + waiting
