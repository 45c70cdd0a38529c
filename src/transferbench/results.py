"""Finished runs as data: finding them, grouping seeds of one configuration, naming them, and the
studies' "select on validation, then test" answers. What `report`, `study` and the plots read."""
from __future__ import annotations

import json
import logging
import math
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from . import rundir
from .config import NEUTRAL, DatasetSpec, canonical_dataset
from .errors import UserError
from .strategies import parse_strategy
from .transferability import weighted_kendall_tau

log = logging.getLogger(__name__)
# What tells runs apart in a report: every option that changes a result, except the seed (seeds of one
# configuration are averaged).
NOT_SETTINGS = NEUTRAL | {"seed"}
KNOWN_DATASETS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
COLUMN_NAMES = {"image_size": "px", "train_subset": "train subset", "batch_size": "batch", "weight_decay": "wd",
                "label_smoothing": "label smoothing", "warmup_epochs": "warmup", "head_epochs": "head epochs",
                "unfreeze_lr_scale": "unfreeze lr x", "val_fraction": "val fraction", "feature_cache": "feature cache"}
TRAINING_ONLY = ("lr", "optimizer", "weight_decay", "warmup_epochs", "label_smoothing", "augment", "train_subset",
                 "batch_size", "head_epochs", "unfreeze_lr_scale", "feature_cache")


# ------------------------------------------------------------------------------------ reading runs

@dataclass(eq=False)
class StudyInfo:
    """A study.json: the study's runs in the file's order, its references and selection rules."""

    name: str
    dir: Path
    description: str
    variants: dict[str, str | None]  # run name in the study -> its variant
    options: dict[str, dict]  # run name in the study -> the options the study file sets for it
    references: list[dict]
    selections: list[dict]
    dataset_labels: dict[str, str]
    refits: dict[str, str]  # refit run name in the study -> the selection it answers

    @property
    def order(self) -> list[str]:
        return list(self.variants)


@dataclass(eq=False)
class Run:
    dir: Path
    name: str  # path relative to the report's root
    config: dict
    summary: dict
    metrics: list[dict]
    study: StudyInfo | None = None
    in_study: str | None = None  # its name in the study: "VARIANT/RUN" or "RUN"

    @property
    def variant(self) -> str | None:
        return self.study.variants.get(self.in_study) if self.study else None

    @property
    def settings(self) -> dict:
        return {k: v for k, v in self.config.items() if k not in NOT_SETTINGS}


def _read_study(path: Path) -> StudyInfo | None:
    try:
        doc = rundir.read_json(path)
        refits = list(doc.get("refit_runs") or [])
        runs = [*doc["runs"], *refits]
        return StudyInfo(name=str(doc["name"]), dir=path.parent, description=doc.get("description") or "",
                         variants={r["name"]: r.get("variant") for r in runs},
                         options={r["name"]: dict(r.get("options") or {}) for r in runs},
                         references=list(doc.get("references") or []), selections=list(doc.get("select") or []),
                         dataset_labels=dict(doc.get("dataset_labels") or {}),
                         refits={r["name"]: r["selection"] for r in refits})
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning(f"{path} is not a readable study record ({type(err).__name__}: {err}); its runs are reported "
                    f"without it")
        return None


def _find_study(run_dir: Path, cache: dict[Path, StudyInfo | None]) -> tuple[StudyInfo | None, str | None]:
    """The nearest study.json above a run that lists it."""
    for parent in run_dir.parents:
        record = parent / rundir.STUDY_RECORD
        if record.is_file():
            if parent not in cache:
                cache[parent] = _read_study(record)
            study = cache[parent]
            name = run_dir.relative_to(parent).as_posix()
            if study is not None and name in study.variants:
                return study, name
            return None, None
    return None, None


def load_runs(root: str | Path) -> list[Run]:
    """Every finished run under root (recursively), each attached to its study where it has one."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"{root} is not a directory")
    runs, studies = [], {}
    for summary_path in sorted(root.rglob(rundir.SUMMARY)):
        run_dir = summary_path.parent
        try:
            config = rundir.read_json(run_dir / rundir.CONFIG)
            summary = rundir.read_json(summary_path)
            metrics = rundir.read_jsonl(run_dir / rundir.METRICS)
            missing = [k for k in ("test_acc", "best_val_acc") if not isinstance(summary.get(k), (int, float))]
            if missing:
                raise ValueError(f"{rundir.SUMMARY} has no {missing[0]}")
        except (OSError, ValueError, AttributeError) as err:
            log.warning(f"skipping {run_dir}: not a complete run record ({type(err).__name__}: {err})")
            continue
        study, in_study = _find_study(run_dir, studies)
        name = run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.name
        runs.append(Run(run_dir, name, config, summary, metrics, study, in_study))
    return runs


def unfinished_runs(root: str | Path) -> list[Path]:
    """Run directories that were started and have not finished (no summary.json yet)."""
    root = Path(root).expanduser().resolve()
    return sorted(p.parent for p in root.rglob(rundir.CONFIG) if not (p.parent / rundir.SUMMARY).exists())


# ------------------------------------------------------------------------------------ grouping

@dataclass(eq=False)
class Group:
    """Runs of one study (and variant) that differ only in their seed."""

    study: StudyInfo | None
    variant: str | None
    settings: dict
    runs: list[Run]

    def values(self, metric: str) -> list[float]:
        return [r.summary[metric] for r in self.runs if r.summary.get(metric) is not None]

    def mean(self, metric: str) -> float | None:
        v = self.values(metric)
        return statistics.fmean(v) if v else None

    def std(self, metric: str) -> float | None:
        v = self.values(metric)
        return statistics.stdev(v) if len(v) >= 2 else None

    def get(self, key: str) -> Any:
        return self.variant if key == "variant" else self.settings.get(key)

    @property
    def key(self) -> str:
        return _group_key(self.runs[0])

    @property
    def declared(self) -> dict:
        """The options its study file sets for it (all its settings outside a study)."""
        run = self.runs[0]
        return run.study.options.get(run.in_study, self.settings) if run.study else self.settings

    @property
    def strategy(self):
        return parse_strategy(str(self.settings.get("strategy")))

    @property
    def trained(self) -> bool:
        """Trained or fitted on the training split (zero-shot is not; logreg / knn are, without epochs)."""
        return self.strategy.trains and (bool(self.settings.get("epochs")) or self.strategy.fits_features)


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _group_key(run: Run) -> str:
    return _key([id(run.study), run.variant, run.settings])


def group_runs(runs: list[Run]) -> list[Group]:
    """Seeds of one configuration together; in the study file's order, else by model and strategy."""
    groups: dict[str, Group] = {}
    for run in runs:
        key = _group_key(run)
        if key not in groups:
            groups[key] = Group(run.study, run.variant, run.settings, [])
        twin = next((r for r in groups[key].runs if r.config.get("seed") == run.config.get("seed")), None)
        if twin is not None:  # a copied run directory is not a second seed: it would fake a tiny spread
            log.warning(f"{run.dir} repeats {twin.dir} (same configuration, same seed {run.config.get('seed')}); "
                        f"counted once")
            continue
        groups[key].runs.append(run)

    def order(g: Group):
        if g.study is not None:
            index = {n: i for i, n in enumerate(g.study.order)}
            return (0, min(index.get(r.in_study, len(index)) for r in g.runs), "")
        s = g.settings
        return (1, 0, _key([s.get("dataset"), s.get("model"), s.get("strategy"), s]))
    return sorted(groups.values(), key=order)


def varying_keys(groups: list[Group], declared: bool = False) -> list[str]:
    """Settings that differ between groups (in RunConfig order), plus 'variant' where there are several.
    declared: only the options a study file sets, compared as it sets them: what tells its runs apart,
    not the defaults that follow from them (a linear probe's learning rate)."""
    of = (lambda g: g.declared) if declared else (lambda g: g.settings)  # noqa: E731
    keys: list[str] = []
    for g in groups:
        keys += [k for k in of(g) if k not in keys and k not in NOT_SETTINGS]
    out = [k for k in keys if len({_key(of(g).get(k)) for g in groups}) > 1]
    if len({g.variant for g in groups}) > 1:
        out.insert(0, "variant")
    return out


def fmt_setting(key: str, value: Any) -> str:
    if value is None:
        return {"train_subset": "all", "weights": "none", "ema": "none", "layer_decay": "none"}.get(key, "default")
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if key == "weights":
        return Path(str(value)).name
    return str(value)


LABEL_FORMATS = {"image_size": "{} px", "epochs": "{} epochs", "train_subset": "{} train images"}


def group_label(g: Group, keys: Iterable[str]) -> str:
    """'last-n:12 128 px lr 0.001': the group's values of the given settings, for legends and answers."""
    parts = []
    keys = list(keys)
    for k in keys:
        v = g.get(k)
        if k == "variant" and "strategy" in keys and str(g.get("strategy")).startswith(str(v)):
            continue  # variants named after their strategy ('last-n' for last-n:14) say nothing more
        if k in ("variant", "model", "strategy"):
            parts.append(str(v))
        elif k == "dataset":
            parts.append(dataset_label(str(v), g.study))
        elif not (not g.strategy.trains and k in TRAINING_ONLY):
            fmt = LABEL_FORMATS.get(k, COLUMN_NAMES.get(k, k.replace("_", " ")) + " {}")
            parts.append(fmt.format(fmt_setting(k, v)))
    return " ".join(parts)


def dataset_label(spec: str, study: StudyInfo | None = None, labels: dict[str, str] | None = None) -> str:
    """A dataset's name for people: what the user or the study calls it, else CIFAR-10 / the folder's name."""
    for source in (labels or {}, study.dataset_labels if study else {}):
        for key, label in source.items():
            if canonical_dataset(key) == canonical_dataset(spec):  # study files may give relative paths
                return label
    return KNOWN_DATASETS.get(spec) or DatasetSpec.parse(spec).short_name()


# ------------------------------------------------------------------------------------ references, selections

def references_for(g: Group) -> list[dict]:
    if g.study is None:
        return []
    names = {r.in_study for r in g.runs}
    return [ref for ref in g.study.references if names & set(ref.get("runs") or [])]


def pct(x: float | None, std: float | None = None) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def selection_results(runs: list[Run]) -> list[dict]:
    """Each study's "select on validation, then test" answer: among the rule's candidates (seeds of one
    configuration averaged), the configuration with the best mean `by` figure, and its `report` figure: that of
    its refit runs (retrained on train+val, tested once) where the rule says `refit: true` and they finished, else
    its own runs'. `protocol` says which."""
    results = []
    studies = list(dict.fromkeys(r.study for r in runs if r.study is not None))
    for study in studies:
        study_runs = [r for r in runs if r.study is study]
        for sel in study.selections:
            planned = list(sel.get("runs") or [])
            by, report = sel.get("by", "best_val_acc"), sel.get("report", "test_acc")
            candidates = group_runs([r for r in study_runs if r.in_study in set(planned)])
            finished = sum(len(g.runs) for g in candidates)
            result = {"study": study.name, "study_info": study, "name": sel.get("name", "selection"), "by": by,
                      "report": report,
                      "planned": len(planned), "finished": finished, "configurations": len(candidates), "group": None}
            if not candidates:
                result["text"] = (f"{study.name}: {result['name']}: none of its {len(planned)} candidate runs "
                                  f"has finished")
                results.append(result)
                continue
            best = max(candidates, key=lambda g: g.mean(by))  # the first of equals: the study file's order
            label = group_label(best, varying_keys(candidates, declared=True) or ["model", "strategy"])
            n = len(best.runs)
            result.update(group=best, label=label, by_value=best.mean(by), value=best.mean(report),
                          std=best.std(report),
                          seeds=n)
            text = (f"{study.name}: {result['name']}: {label} has the best {by} ({pct(best.mean(by))}%) of "
                    f"{len(candidates)} configurations; its {report}: {pct(best.mean(report), best.std(report))}%"
                    + (f" (mean over {n} seeds)" if n > 1 else ""))
            result["protocol"] = "selected run"
            refits = group_runs([r for r in study_runs if study.refits.get(r.in_study) == result["name"]])
            if sel.get("refit") and refits:
                refit = refits[0]
                epochs = sorted({int(r.config.get("epochs", 0)) for r in refit.runs})  # per seed: its own
                span = str(epochs[0]) if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}"
                result.update(protocol="refit", value=refit.mean(report), std=refit.std(report), refit_group=refit)
                text += (f" with the weights selected on validation; refit on train+val for "
                         f"{span} epochs and tested once: "
                         f"{pct(refit.mean(report), refit.std(report))}%"
                         + (f" (mean over {len(refit.runs)} seeds)" if len(refit.runs) > 1 else "")
                         + " [protocol: select on validation, then refit on train+val]")
            elif sel.get("refit"):
                text += (" [protocol: the selected run's own weights; its refit on train+val has not finished: "
                         "run the study again]")
            else:
                text += " [protocol: select on validation, test the selected run's weights]"
            for ref in references_for(best):
                if ref.get("metric", "test_acc") == report:
                    text += f"; published {ref['value']:.2f}% ({ref['label']})"
            if finished < len(planned):
                text += f" [only {finished} of {len(planned)} candidate runs have finished]"
            result["text"] = text
            results.append(result)
    return results


# ------------------------------------------------------------------------------------ transferability

def tau_reading(tau: float, n: int) -> str:
    """One line on what a weighted Kendall's tau between a score and fine-tuned accuracy says."""
    if math.isnan(tau):
        text = "undefined (the score or the accuracy is the same for every model)"
    elif tau >= 0.8:
        text = "the score orders these models almost as fine-tuning does"
    elif tau >= 0.5:
        text = "the score gets most of the order right, not all of it"
    elif tau > 0.0:
        text = "barely better than a random order: do not choose a backbone by this score alone here"
    else:
        text = "the score orders these models against fine-tuning: do not choose a backbone by it here"
    if n < 6:
        text += f"; with {n} models τ_w can take only a few values: a hint, not a validation"
    return text


def transferability_results(study: StudyInfo, groups: list[Group], selections: list[dict]) -> list[dict]:
    """Per dataset the study scored (STUDY_DIR/transferability/*/rank.json): each model's scores beside its measured
    test accuracy, and weighted Kendall's tau between each score and that accuracy (and between parameter count and
    it: model size alone is the baseline a score has to beat). The accuracy is that of the strategy the study's
    selection chose for the dataset (else the strategy most models ran), each model's configuration of it with
    the best validation accuracy, never a refit run."""
    results = []
    for path in sorted((study.dir / rundir.TRANSFERABILITY_DIR).glob(f"*/{rundir.RANK_JSON}")):
        try:
            doc = rundir.read_json(path)
            dataset, estimators, rows = doc["dataset"], list(doc["estimators"]), list(doc["rows"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning(f"skipping {path}: not a readable ranking ({type(err).__name__}: {err})")
            continue
        mine = [g for g in groups if canonical_dataset(str(g.settings.get("dataset"))) == canonical_dataset(dataset)
                and not g.settings.get("refit")]
        if not mine:
            continue
        chosen = [s["group"] for s in selections if s.get("group") is not None and s["group"] in mine]
        strategy = (str(chosen[0].get("strategy")) if chosen else
                    Counter(str(g.get("strategy")) for g in mine).most_common(1)[0][0])
        points = []
        for row in rows:
            candidates = [g for g in mine if g.get("model") == row.get("model") and str(g.get("strategy")) == strategy]
            if row.get("status") != "ok" or not candidates:
                continue
            best = max(candidates, key=lambda g: g.mean("best_val_acc") or 0.0)  # chosen on validation
            points.append({"model": row["model"], "scores": row["scores"], "params": row.get("params"),
                           "test_acc": best.mean("test_acc"), "test_std": best.std("test_acc")})
        accs = [p["test_acc"] for p in points]
        taus = {e: weighted_kendall_tau([p["scores"][e] for p in points], accs) if len(points) > 1 else math.nan
                for e in estimators}
        if len(points) > 1 and all(p["params"] for p in points):
            taus["params"] = weighted_kendall_tau([p["params"] for p in points], accs)
        lines = [f"weighted Kendall's τ between {name} and test accuracy ({strategy}, {len(points)} models): "
                 f"{tau:.2f}: {tau_reading(tau, len(points))}" for name, tau in taus.items() if name != "params"]
        if "params" in taus:
            lines.append(f"the parameter count alone: τ_w {taus['params']:.2f}")
        results.append({"dataset": dataset, "strategy": strategy, "estimators": estimators, "points": points,
                        "tau": taus, "lines": lines, "path": path})
    return results
