"""Figures and reports from run records: `transferbench report DIR [--out DIR]`.

Every finished run under DIR (a directory with config.json, summary.json and metrics.jsonl), at any
depth, goes into three files written atomically to the output directory:

- ``results.csv``: one row per run, its configuration and its summary figures;
- ``report.md``: per study, a table of test accuracy per model x strategy (mean +- std over seeds),
  with training time, images/s, the published reference figure and our difference from it, the
  study's "select on validation, then test" answer, and plots (PNG files in ``report-plots/``);
- ``report.html``: the same, self-contained (plots embedded as base64 PNG).

Runs that belong to a study (a parent directory holds the study.json `transferbench study` writes)
are grouped by study; runs that differ only in their seed form one table row. A plot is drawn only
when the runs vary along its axis: learning curves (at least one run of two or more epochs), accuracy
vs unfrozen parameter tensors (last-n:K; linear-probe counts as the head's 2 tensors, zero-shot as 0),
vs training-set size, vs input resolution (each only where one configuration was run at two or more
values), and vs training time (two or more trained configurations).
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from . import rundir  # noqa: E402
from .config import slug  # noqa: E402
from .errors import UserError  # noqa: E402
from .study import STUDY_RECORD  # noqa: E402  (what `transferbench study` writes in a study's directory)

PLOTS_DIR = "report-plots"
# Options that say where or how fast a run ran, not what it computed: never a reason to tell runs apart.
NOT_SETTINGS = ("seed", "name", "output_dir", "device", "workers", "data_dir", "compile", "channels_last")
KNOWN_DATASETS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
COLUMN_NAMES = {"image_size": "px", "train_subset": "train subset", "batch_size": "batch", "weight_decay": "wd",
                "label_smoothing": "label smoothing", "warmup_epochs": "warmup", "head_epochs": "head epochs",
                "unfreeze_lr_scale": "unfreeze lr x", "val_fraction": "val fraction", "feature_cache": "feature cache"}
# results.csv: summary.json's figures; what summary.json says about how the run ran, beside the options asked for
SUMMARY_COLUMNS = ("test_acc", "test_loss", "best_val_acc", "best_epoch", "train_time_s", "images_per_s",
                   "peak_memory_mb", "trainable_params", "total_params", "num_classes", "train_images",
                   "val_images", "test_images", "world_size")
SUMMARY_RENAMED = {"device": "device_used", "feature_cache": "feature_cache_used", "augment": "augmented"}
HEAD_TENSORS = 2  # a linear classifier's weight and bias: what linear-probe unfreezes


def curves_figure(history: list[dict], title: str):
    """Loss and accuracy per epoch, train and validation, side by side."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    trained = [h for h in history if h.get("train_loss") is not None]
    epochs = [h["epoch"] for h in history]
    if trained:
        ax_loss.plot([h["epoch"] for h in trained], [h["train_loss"] for h in trained], "o-", label="train")
        ax_acc.plot([h["epoch"] for h in trained], [h["train_acc"] for h in trained], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "s-", label="validation")
    ax_acc.plot(epochs, [h["val_acc"] for h in history], "s-", label="validation")
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


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
        runs = doc["runs"]
        return StudyInfo(name=str(doc["name"]), dir=path.parent, description=doc.get("description") or "",
                         variants={r["name"]: r.get("variant") for r in runs},
                         options={r["name"]: dict(r.get("options") or {}) for r in runs},
                         references=list(doc.get("references") or []), selections=list(doc.get("select") or []),
                         dataset_labels=dict(doc.get("dataset_labels") or {}))
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"warning: {path} is not a readable study record ({type(err).__name__}: {err}); its runs are reported "
              f"without it", file=sys.stderr)
        return None


def _find_study(run_dir: Path, cache: dict[Path, StudyInfo | None]) -> tuple[StudyInfo | None, str | None]:
    """The nearest study.json above a run that lists it."""
    for parent in run_dir.parents:
        record = parent / STUDY_RECORD
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
            print(f"warning: skipping {run_dir}: not a complete run record ({type(err).__name__}: {err})", file=sys.stderr)
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
    def kind(self) -> str:
        return str(self.settings.get("strategy", "")).partition(":")[0]

    @property
    def trained(self) -> bool:
        return self.kind != "zero-shot" and bool(self.settings.get("epochs"))


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
        groups[key].runs.append(run)

    def order(g: Group):
        if g.study is not None:
            index = {n: i for i, n in enumerate(g.study.order)}
            return (0, min(index.get(r.in_study, len(index)) for r in g.runs), "")
        return (1, 0, _key([g.settings.get("dataset"), g.settings.get("model"), g.settings.get("strategy"), g.settings]))
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
        return {"train_subset": "all", "weights": "none"}.get(key, "default")
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
        elif not (g.kind == "zero-shot" and k in TRAINING_ONLY):
            fmt = LABEL_FORMATS.get(k, COLUMN_NAMES.get(k, k.replace("_", " ")) + " {}")
            parts.append(fmt.format(fmt_setting(k, v)))
    return " ".join(parts)


def dataset_label(spec: str, study: StudyInfo | None = None, labels: dict[str, str] | None = None) -> str:
    """A dataset's name for people: what the user or the study calls it, else CIFAR-10 / the folder's name."""
    from .config import canonical_dataset

    for source in (labels or {}, study.dataset_labels if study else {}):
        for key, label in source.items():
            if canonical_dataset(key) == canonical_dataset(spec):  # study files may give relative paths
                return label
    if spec in KNOWN_DATASETS:
        return KNOWN_DATASETS[spec]
    if spec.startswith("folder:"):
        return Path(spec[len("folder:"):].rstrip("/")).name or spec
    return spec


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
    configuration averaged), the configuration with the best mean `by` figure, and its `report` figure."""
    results = []
    studies = list(dict.fromkeys(r.study for r in runs if r.study is not None))
    for study in studies:
        study_runs = [r for r in runs if r.study is study]
        for sel in study.selections:
            planned = list(sel.get("runs") or [])
            by, report = sel.get("by", "best_val_acc"), sel.get("report", "test_acc")
            candidates = group_runs([r for r in study_runs if r.in_study in set(planned)])
            finished = sum(len(g.runs) for g in candidates)
            result = {"study": study.name, "study_info": study, "name": sel.get("name", "selection"), "by": by, "report": report,
                      "planned": len(planned), "finished": finished, "configurations": len(candidates), "group": None}
            if not candidates:
                result["text"] = f"{study.name}: {result['name']}: none of its {len(planned)} candidate runs has finished"
                results.append(result)
                continue
            best = max(candidates, key=lambda g: g.mean(by))  # the first of equals: the study file's order
            label = group_label(best, varying_keys(candidates, declared=True) or ["model", "strategy"])
            n = len(best.runs)
            result.update(group=best, label=label, by_value=best.mean(by), value=best.mean(report), std=best.std(report),
                          seeds=n)
            text = (f"{study.name}: {result['name']}: {label} has the best {by} ({pct(best.mean(by))}%) of "
                    f"{len(candidates)} configurations; its {report}: {pct(best.mean(report), best.std(report))}%"
                    + (f" (mean over {n} seeds)" if n > 1 else ""))
            for ref in references_for(best):
                if ref.get("metric", "test_acc") == report:
                    text += f"; published {ref['value']:.2f}% ({ref['label']})"
            if finished < len(planned):
                text += f" [only {finished} of {len(planned)} candidate runs have finished]"
            result["text"] = text
            results.append(result)
    return results


# ------------------------------------------------------------------------------------ plots

@dataclass
class Plot:
    kind: str
    title: str
    png: bytes
    file: str = ""  # under PLOTS_DIR, filled in when written


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _unfrozen(g: Group) -> float | None:
    strategy = str(g.settings.get("strategy", ""))
    if strategy.startswith("last-n:"):
        return int(strategy.partition(":")[2])
    return {"linear-probe": HEAD_TENSORS, "zero-shot": 0}.get(strategy)


def _train_size(g: Group) -> float | None:
    return g.mean("train_images") if g.trained else None


def _resolution(g: Group) -> float | None:
    return g.settings.get("image_size")


# kind -> (x of a group, x-axis label, settings that identify a line, settings the axis itself stands for)
AXES: dict[str, tuple[Callable[[Group], float | None], str, tuple[str, ...], tuple[str, ...]]] = {
    "unfrozen": (_unfrozen, f"unfrozen parameter tensors K (last-n:K; linear-probe = {HEAD_TENSORS}, zero-shot = 0)",
                 ("dataset", "model", "image_size"), ("strategy",)),
    "train-size": (_train_size, "training images", ("dataset", "model", "strategy", "image_size"), ("train_subset",)),
    "resolution": (_resolution, "input resolution (px)", ("dataset", "model", "strategy"), ("image_size",)),
}
TITLES = {"curves": "learning curves", "unfrozen": "accuracy vs unfrozen layers",
          "train-size": "accuracy vs training-set size", "resolution": "accuracy vs input resolution",
          "time": "accuracy vs training time"}
TRAINING_ONLY = ("lr", "optimizer", "weight_decay", "warmup_epochs", "label_smoothing", "augment", "train_subset",
                 "batch_size", "head_epochs", "unfreeze_lr_scale", "feature_cache")


def short_labels(groups: list[Group]) -> dict[int, str]:
    """Each group named by what sets it apart from the others shown with it."""
    keys = varying_keys(groups, declared=True) or ["model", "strategy"]
    return {id(g): group_label(g, keys) for g in groups}


def _lines(groups: list[Group], kind: str) -> tuple[dict[str, list[tuple[float, Group]]], list[str]]:
    """Groups with a value on the axis, as lines of groups that agree on what identifies a line. Where
    that leaves two groups at one x on a line, the variant, then every other difference, splits it."""
    x_of, _, identity, axis_keys = AXES[kind]
    points = [(x_of(g), g) for g in groups if x_of(g) is not None]
    others = [k for k in varying_keys([g for _, g in points]) if k not in identity and k not in axis_keys]
    for keys in (list(identity), ["variant", *identity], ["variant", *identity, *others]):
        lines: dict[str, list[tuple[float, Group]]] = {}
        for x, g in points:
            lines.setdefault(_key([g.get(k) for k in keys]), []).append((x, g))
        if all(len({x for x, _ in line}) == len(line) for line in lines.values()):
            break
    return {k: sorted(v, key=lambda p: p[0]) for k, v in lines.items()}, keys


def _legend(ax) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def axis_plot(groups: list[Group], kind: str, title: str) -> Plot | None:
    """Test accuracy (and best validation accuracy, dashed) along one axis; None unless a line has two points."""
    lines, keys = _lines(groups, kind)
    if not any(len(line) >= 2 for line in lines.values()):
        return None
    firsts = [line[0][1] for line in lines.values()]
    label_keys = [k for k in keys if len({_key(g.get(k)) for g in firsts}) > 1] or ["model"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, line in enumerate(lines.values()):
        color, xs = f"C{i % 10}", [x for x, _ in line]
        ax.errorbar(xs, [100 * g.mean("test_acc") for _, g in line], yerr=[100 * (g.std("test_acc") or 0) for _, g in line],
                    fmt="o-", color=color, capsize=3, label=group_label(line[0][1], label_keys))
        ax.plot(xs, [100 * g.mean("best_val_acc") for _, g in line], "x--", color=color, alpha=0.5)
    ax.plot([], [], "ko-", label="test")
    ax.plot([], [], "kx--", alpha=0.5, label="best validation")
    xs = [x for line in lines.values() for x, _ in line]
    if kind == "train-size" and max(xs) > 20 * min(xs):
        ax.set_xscale("log")
    ax.set_xlabel(AXES[kind][1])
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    _legend(ax)
    ax.set_title(f"{title}: {TITLES[kind]}", fontsize=10)
    return Plot(kind, f"{title}: {TITLES[kind]}", _png(fig))


def curves_plot(groups: list[Group], title: str) -> Plot | None:
    """Validation accuracy and training loss per epoch, every trained configuration overlaid (seeds averaged)."""
    trained = [g for g in groups if g.trained]
    if not any(len([m for m in r.metrics if m.get("train_loss") is not None]) >= 2 for g in trained for r in g.runs):
        return None
    labels = short_labels(trained)
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, g in enumerate(trained):
        by_epoch: dict[int, list[dict]] = {}
        for r in g.runs:
            for m in r.metrics:
                if m.get("train_loss") is not None:
                    by_epoch.setdefault(m["epoch"], []).append(m)
        epochs = sorted(by_epoch)
        style = dict(color=f"C{i % 10}", linestyle=("-", "--", ":", "-.")[i // 10 % 4], marker="o", markersize=3)
        ax_acc.plot(epochs, [100 * statistics.fmean(m["val_acc"] for m in by_epoch[e]) for e in epochs], **style)
        ax_loss.plot(epochs, [statistics.fmean(m["train_loss"] for m in by_epoch[e]) for e in epochs],
                     label=labels[id(g)], **style)
    ax_acc.set_ylabel("validation accuracy (%)")
    ax_loss.set_ylabel("training loss")
    for ax in (ax_acc, ax_loss):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    _legend(ax_loss)
    fig.suptitle(f"{title}: {TITLES['curves']}", fontsize=10)
    fig.tight_layout()
    return Plot("curves", f"{title}: {TITLES['curves']}", _png(fig))


def time_plot(groups: list[Group], title: str) -> Plot | None:
    """Test accuracy against training time, one point per trained configuration."""
    points = [(g.mean("train_time_s"), g) for g in groups if g.trained and g.mean("train_time_s")]
    if len(points) < 2:
        return None
    labels = short_labels([g for _, g in points])
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, (t, g) in enumerate(points):
        ax.errorbar([t], [100 * g.mean("test_acc")], yerr=[100 * (g.std("test_acc") or 0)], color=f"C{i % 10}",
                    fmt="osD^v<>"[i // 10 % 7], capsize=3, label=labels[id(g)])
    times = [t for t, _ in points]
    if max(times) > 20 * min(times):
        ax.set_xscale("log")
    ax.set_xlabel("training time (s, all epochs)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    _legend(ax)
    ax.set_title(f"{title}: {TITLES['time']}", fontsize=10)
    return Plot("time", f"{title}: {TITLES['time']}", _png(fig))


# ------------------------------------------------------------------------------------ the report

@dataclass
class Section:
    """One study (or the runs outside any study): its table, its selections, its plots."""

    title: str
    study: StudyInfo | None
    groups: list[Group]
    labels: dict[str, str] = field(default_factory=dict)  # user's dataset labels
    selections: list[dict] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)

    @property
    def columns(self) -> list[str]:
        keys = [k for k in varying_keys(self.groups) if k not in ("model", "strategy", "dataset")]
        if all(str(g.get("strategy")).startswith(str(g.variant)) for g in self.groups):
            keys = [k for k in keys if k != "variant"]  # variants named after their strategies
        return keys

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(str(g.settings.get("dataset")) for g in self.groups))

    def label(self, g: Group) -> str:
        keys = [k for k in varying_keys(self.groups, declared=True) if k not in ("model", "strategy")]
        return " ".join(p for p in (str(g.get("model")), str(g.get("strategy")), group_label(g, keys)) if p)

    def header(self) -> list[str]:
        cols = ["dataset"] if len(self.datasets) > 1 else []
        cols += ["model", "strategy"] + [COLUMN_NAMES.get(k, k.replace("_", " ")) for k in self.columns]
        cols += ["test acc (%)"]
        if any(len(g.runs) > 1 for g in self.groups):
            cols += ["seeds"]
        if self.study and self.study.references:
            cols += ["published (%)", "Δ (pp)"]
        return cols + ["best val acc (%)", "train time (s)", "images/s"]

    @staticmethod
    def cell(g: Group, key: str) -> str:
        return "—" if g.kind == "zero-shot" and key in TRAINING_ONLY else fmt_setting(key, g.get(key))

    def rows(self) -> list[list[str]]:
        chosen = {s["group"].key: s["name"] for s in self.selections if s.get("group") is not None}
        rows = []
        for g in self.groups:
            row = [dataset_label(str(g.settings.get("dataset")), g.study, self.labels)] if len(self.datasets) > 1 else []
            strategy = str(g.get("strategy")) + (f" ★ {chosen[g.key]}" if g.key in chosen else "")
            row += [str(g.get("model")), strategy] + [self.cell(g, k) for k in self.columns]
            row += [pct(g.mean("test_acc"), g.std("test_acc"))]
            if any(len(x.runs) > 1 for x in self.groups):
                row += [str(len(g.runs))]
            if self.study and self.study.references:
                refs = references_for(g)
                row += [" / ".join(f"{r['value']:.2f}" + (" (val)" if r.get("metric") == "best_val_acc" else "")
                                   for r in refs) or "",
                        " / ".join(f"{100 * g.mean(r.get('metric', 'test_acc')) - r['value']:+.2f}" for r in refs) or ""]
            t, ips = g.mean("train_time_s"), g.mean("images_per_s")
            row += [pct(g.mean("best_val_acc")), "—" if not t else f"{t:.1f}" if t < 100 else f"{t:.0f}",
                    "—" if ips is None else f"{ips:.0f}"]
            rows.append(row)
        return rows

    def context(self) -> list[str]:
        """Lines that say what was measured where: datasets (honestly named), device, library versions."""
        lines = []
        names = [f"{dataset_label(d, self.study, self.labels)} (`{d}`)" for d in self.datasets]
        lines.append(("Dataset: " if len(names) == 1 else "Datasets: ") + ", ".join(names))
        devices = sorted({str(r.summary.get("device")) for g in self.groups for r in g.runs})
        versions = sorted({", ".join(f"{k} {v}" for k, v in (r.summary.get("versions") or {}).items() if k != "python")
                           for g in self.groups for r in g.runs} - {""})
        lines.append(f"Device: {', '.join(devices)}" + (f"; {'; '.join(versions)}" if versions else ""))
        return lines


def build_sections(runs: list[Run], labels: dict[str, str] | None = None) -> list[Section]:
    labels = labels or {}
    studies = list(dict.fromkeys(r.study for r in runs))
    studies.sort(key=lambda s: (s is None, s.name if s else ""))
    names = [s.name for s in studies if s is not None]
    selections = selection_results(runs)
    sections = []
    for study in studies:
        groups = group_runs([r for r in runs if r.study is study])
        if study is None:
            title = "runs outside any study"
        else:
            title = study.name if names.count(study.name) == 1 else f"{study.name} ({study.dir})"
        section = Section(title, study, groups, labels, [s for s in selections if s["study_info"] is study])
        for plot in (curves_plot(groups, title), axis_plot(groups, "unfrozen", title),
                     axis_plot(groups, "train-size", title), axis_plot(groups, "resolution", title),
                     time_plot(groups, title)):
            if plot is not None:
                section.plots.append(plot)
        sections.append(section)
    return sections


def reference_rows(sections: list[Section]) -> list[list[str]]:
    """Published figure beside every configuration it applies to, across studies (faithful next to improved)."""
    entries = []
    for si, section in enumerate(sections):
        for gi, g in enumerate(section.groups):
            for ref in references_for(g):
                metric = ref.get("metric", "test_acc")
                ours = g.mean(metric)
                entries.append(((ref["label"], ref["value"], metric, si, gi), [
                    ref["label"], f"{ref['value']:.2f}" + (" (val)" if metric == "best_val_acc" else ""),
                    section.title, section.label(g), pct(ours, g.std(metric)), f"{100 * ours - ref['value']:+.2f}",
                    ref.get("source") or ""]))
    order = list(dict.fromkeys(k[0] for k, _ in entries))  # references in the order they first appear
    entries.sort(key=lambda e: (order.index(e[0][0]), e[0][1:]))
    return [row for _, row in entries]


REFERENCE_HEADER = ["reference", "published (%)", "study", "our configuration", "ours (%)", "Δ (pp)", "source"]


def results_rows(runs: list[Run], labels: dict[str, str]) -> tuple[list[str], list[dict]]:
    config_keys: list[str] = []
    for r in runs:
        config_keys += [k for k in r.config if k not in config_keys]
    header = ["run", "study", "variant", "dataset_label", *config_keys, *SUMMARY_COLUMNS, *SUMMARY_RENAMED.values()]
    rows = []
    for r in runs:
        row = {"run": r.name, "study": r.study.name if r.study else "", "variant": r.variant or "",
               "dataset_label": dataset_label(str(r.config.get("dataset")), r.study, labels)}
        row.update({k: r.config.get(k) for k in config_keys})
        row.update({k: r.summary.get(k) for k in SUMMARY_COLUMNS})
        row.update({column: r.summary.get(k) for k, column in SUMMARY_RENAMED.items()})
        rows.append(row)
    return header, rows


def _csv_text(header: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]], css: str) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>\n" for row in rows)
    return f'<table class="{css}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>'


INTRO = ("Accuracies in percent: test accuracy of the epoch selected on validation, the test split evaluated once; "
         "mean ± sample standard deviation over seeds where a configuration ran with several. "
         "Δ = ours − published, in percentage points. Training time is the sum of the epochs' times; "
         "images/s is the training throughput.")


def render_markdown(root: Path, runs: list[Run], sections: list[Section], unfinished: int) -> str:
    out = ["# transferbench report", "",
           f"{len(runs)} finished runs under `{root}`" + (f" ({unfinished} unfinished, not shown)" if unfinished else "") + ".",
           "", INTRO, ""]
    refs = reference_rows(sections)
    if refs:
        out += ["## Published figures and ours", "", _md_table(REFERENCE_HEADER, refs), ""]
    for section in sections:
        out += [f"## {section.title}", ""]
        if section.study and section.study.description:
            out += [section.study.description.strip(), ""]
        out += [line + "  " for line in section.context()] + [""]
        out += [_md_table(section.header(), section.rows()), ""]
        for sel in section.selections:
            out += [f"**Selected on validation, then tested** ({sel['by']} → {sel['report']}): {sel['text']}", ""]
        for plot in section.plots:
            out += [f"![{plot.title}]({PLOTS_DIR}/{plot.file})", ""]
    return "\n".join(out)


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f0f0f0; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
.note { color: #555; font-size: 0.9em; }
.selection { background: #eef6ee; padding: 0.4em 0.8em; border-left: 4px solid #4a4; }
"""


def render_html(root: Path, runs: list[Run], sections: list[Section], unfinished: int) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', "<title>transferbench report</title>",
           f"<style>{CSS}</style></head><body>", "<h1>transferbench report</h1>",
           f"<p>{len(runs)} finished runs under <code>{e(str(root))}</code>"
           + (f" ({unfinished} unfinished, not shown)" if unfinished else "") + ".</p>",
           f'<p class="note">{e(INTRO)}</p>']
    refs = reference_rows(sections)
    if refs:
        out += ["<h2>Published figures and ours</h2>", _html_table(REFERENCE_HEADER, refs, "references")]
    for section in sections:
        out.append(f"<h2>{e(section.title)}</h2>")
        if section.study and section.study.description:
            out.append(f"<p>{e(section.study.description.strip())}</p>")
        out.append('<p class="note">' + "<br>".join(e(line).replace("`", "") for line in section.context()) + "</p>")
        out.append(_html_table(section.header(), section.rows(), "results"))
        for sel in section.selections:
            out.append(f'<p class="selection"><b>Selected on validation, then tested</b> ({e(sel["by"])} → '
                       f'{e(sel["report"])}): {e(sel["text"])}</p>')
        for plot in section.plots:
            data = base64.b64encode(plot.png).decode("ascii")
            out.append(f'<figure><img alt="{e(plot.title)}" data-kind="{plot.kind}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{e(plot.title)}</figcaption></figure>")
    out.append("</body></html>\n")
    return "\n".join(out)


def write_report(root: str | Path, out: str | Path | None = None, *, labels: dict[str, str] | None = None) -> dict:
    """Read every finished run under root and write results.csv, report.md and report.html to out
    (default: root), each atomically. Returns what was written and the selection answers."""
    root = Path(root).expanduser().resolve()
    runs = load_runs(root)
    if not runs:
        raise UserError(f"no finished runs under {root}: a run directory holds {rundir.CONFIG}, {rundir.SUMMARY} "
                        f"and {rundir.METRICS} (`transferbench run` or `transferbench study` write them)")
    labels = labels or {}
    out_dir = Path(out).expanduser().resolve() if out else root
    sections = build_sections(runs, labels)
    plot_dir = out_dir / PLOTS_DIR
    written = set()
    for i, section in enumerate(sections):
        for plot in section.plots:
            plot.file = f"{i + 1:02d}-{slug(section.title, 'runs')}-{plot.kind}.png"
            rundir.atomic_write_bytes(plot_dir / plot.file, plot.png)
            written.add(plot.file)
    if plot_dir.is_dir():  # plots of an earlier report that this one no longer has
        for stale in plot_dir.glob("*.png"):
            if stale.name not in written:
                stale.unlink()
    unfinished = len(unfinished_runs(root))
    header, rows = results_rows(runs, labels)
    rundir.atomic_write_text(out_dir / "results.csv", _csv_text(header, rows))
    rundir.atomic_write_text(out_dir / "report.md", render_markdown(root, runs, sections, unfinished) + "\n")
    rundir.atomic_write_text(out_dir / "report.html", render_html(root, runs, sections, unfinished))
    return {"runs": len(runs), "studies": sum(s.study is not None for s in sections), "out": out_dir,
            "plots": sum(len(s.plots) for s in sections), "unfinished": unfinished,
            "selections": [s for section in sections for s in section.selections]}


# ------------------------------------------------------------------------------------------- CLI

def _label_option(text: str) -> tuple[str, str]:
    spec, sep, label = text.rpartition("=")
    if not sep or not spec or not label.strip():
        raise UserError(f"--dataset-label: expected DATASET=LABEL (e.g. folder:data/c10=\"CIFAR-10 (JPEG copy)\"), got {text!r}")
    return spec, label.strip()


def add_arguments(parser) -> None:
    parser.add_argument("dir", metavar="DIR", help="directory holding run directories, at any depth (e.g. runs)")
    parser.add_argument("--out", metavar="DIR", default=None, help="where to write results.csv, report.md and "
                        "report.html (default: DIR)")
    parser.add_argument("--dataset-label", metavar="DATASET=LABEL", action="append", default=[],
                        help="how to name a dataset in the report, e.g. folder:../data/c10=\"CIFAR-10 (JPEG copy)\" "
                             "(default: a study's dataset_labels, CIFAR-10 / CIFAR-100, or the folder's name)")


def command(args) -> int:
    labels = dict(_label_option(t) for t in args.dataset_label)
    result = write_report(args.dir, args.out, labels=labels)
    for sel in result["selections"]:
        print(sel["text"])
    out = result["out"]
    print(f"report: {result['runs']} runs ({result['studies']} studies, {result['plots']} plots"
          + (f", {result['unfinished']} unfinished runs not shown" if result["unfinished"] else "")
          + f") -> {out / 'report.html'}, {out / 'report.md'}, {out / 'results.csv'}")
    return 0
