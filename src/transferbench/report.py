"""Reports from run records: `transferbench report DIR [--out DIR]`.

Every finished run under DIR (a directory with config.json, summary.json and metrics.jsonl), at any
depth, goes into three files written atomically to the output directory:

- ``results.csv``: one row per run, its configuration and its summary figures;
- ``report.md``: per study, a table of test accuracy per model x strategy (mean +- std over seeds),
  with training time, images/s, the published reference figure and our difference from it, the
  study's "select on validation, then test" answer, and plots (PNG files in ``report-plots/``);
- ``report.html``: the same, self-contained (plots embedded as base64 PNG).

Runs that belong to a study (a parent directory holds the study.json `transferbench study` writes)
are grouped by study; runs that differ only in their seed form one table row. A plot is drawn only
when the runs vary along its axis (see `plots`).
"""
from __future__ import annotations

import base64
import csv
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

from . import plots, rundir
from .config import slug
from .errors import UserError
from .results import (
    COLUMN_NAMES,
    TRAINING_ONLY,
    Group,
    Run,
    StudyInfo,
    dataset_label,
    fmt_setting,
    group_label,
    group_runs,
    load_runs,
    pct,
    references_for,
    selection_results,
    transferability_results,
    unfinished_runs,
    varying_keys,
)

PLOTS_DIR = "report-plots"
# Recorded beside top-1 by every run (see training.finish): summary key, column, format (mean, std)
EXTRA_METRICS = [("test_top5", "top-5 (%)", pct), ("test_mean_per_class_acc", "mean per-class (%)", pct),
                 ("test_ece", "ECE (%)", pct)]
# results.csv: summary.json's figures; what summary.json says about how the run ran, beside the options asked for
SUMMARY_COLUMNS = ("test_acc", "test_loss", "best_val_acc", "best_epoch", "train_time_s", "images_per_s",
                   "peak_memory_mb", "trainable_params", "total_params", "num_classes", "train_images",
                   "val_images", "test_images", "world_size", "primary_metric", "primary_value", "test_top5",
                   "test_mean_per_class_acc", "test_nll", "test_ece", "chosen_wd", "chosen_k", "protocol")
SUMMARY_RENAMED = {"device": "device_used", "feature_cache": "feature_cache_used", "augment": "augmented"}


# ------------------------------------------------------------------------------------ the report

@dataclass
class Section:
    """One study (or the runs outside any study): its table, its selections, its plots."""

    title: str
    study: StudyInfo | None
    groups: list[Group]
    labels: dict[str, str] = field(default_factory=dict)  # user's dataset labels
    selections: list[dict] = field(default_factory=list)
    plots: list[plots.Plot] = field(default_factory=list)
    transferability: list[dict] = field(default_factory=list)  # per dataset scored (results.transferability_results)

    def transferability_tables(self) -> list[tuple[str, list[str], list[list[str]], list[str]]]:
        """Per scored dataset: its label, a table of each model's scores beside its test accuracy, the τ_w lines."""
        tables = []
        for t in self.transferability:
            header = ["model", *t["estimators"], "params", f"test acc (%), {t['strategy']}"]
            rows = [[p["model"], *(f"{p['scores'][e]:.4g}" for e in t["estimators"]),
                     f"{p['params'] / 1e6:.2f}M" if p["params"] else "—", pct(p["test_acc"], p["test_std"])]
                    for p in t["points"]]
            tables.append((dataset_label(t["dataset"], self.study, self.labels), header, rows, t["lines"]))
        return tables

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
        cols += [name for key, name, _ in EXTRA_METRICS if key in self.extra_metrics]
        return cols + ["best val acc (%)", "train time (s)", "images/s"]

    @property
    def extra_metrics(self) -> list[str]:
        """The evaluation metrics beyond top-1 that the runs recorded (older runs have none)."""
        return [key for key, _, _ in EXTRA_METRICS if any(r.summary.get(key) is not None
                                                          for g in self.groups for r in g.runs)]

    @staticmethod
    def cell(g: Group, key: str) -> str:
        no_training = not g.strategy.trains or g.strategy.fits_features  # nothing learned with a learning rate
        return "—" if no_training and key in TRAINING_ONLY else fmt_setting(key, g.get(key))

    def rows(self) -> list[list[str]]:
        chosen = {s["group"].key: s["name"] for s in self.selections if s.get("group") is not None}
        rows = []
        for g in self.groups:
            several = len(self.datasets) > 1
            row = [dataset_label(str(g.settings.get("dataset")), g.study, self.labels)] if several else []
            strategy = str(g.get("strategy")) + (f" ★ {chosen[g.key]}" if g.key in chosen else "")
            row += [str(g.get("model")), strategy] + [self.cell(g, k) for k in self.columns]
            row += [pct(g.mean("test_acc"), g.std("test_acc"))]
            if any(len(x.runs) > 1 for x in self.groups):
                row += [str(len(g.runs))]
            if self.study and self.study.references:
                refs = references_for(g)
                row += [" / ".join(f"{r['value']:.2f}" + (" (val)" if r.get("metric") == "best_val_acc" else "")
                                   for r in refs) or "",
                        " / ".join(f"{100 * g.mean(r.get('metric', 'test_acc')) - r['value']:+.2f}"
                                   for r in refs) or ""]
            row += [fmt(g.mean(key), g.std(key)) for key, _, fmt in EXTRA_METRICS if key in self.extra_metrics]
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
        primary = sorted({(str(r.summary.get("dataset")), r.summary["primary_metric"]) for g in self.groups
                          for r in g.runs if r.summary.get("primary_metric") not in (None, "top1")})
        for dataset, metric in primary:
            lines.append(f"{dataset_label(dataset, self.study, self.labels)}: the literature reports "
                         f"{metric.replace('_', ' ')} (column beside test acc)")
        return lines


def run_figures(section: Section) -> list[plots.Plot]:
    """Per dataset, the confusion matrix and per-class accuracy of the run a reader should look at: the
    study's selected configuration, else the one with the best validation accuracy (never chosen on test)."""
    figures = []
    chosen = [s["group"] for s in section.selections if s.get("group") is not None]
    for dataset in section.datasets:
        groups = [g for g in chosen if g.settings.get("dataset") == dataset] or [
            g for g in section.groups if g.settings.get("dataset") == dataset]
        best = max(groups, key=lambda g: g.mean("best_val_acc") or 0.0)
        run = best.runs[0]
        label = dataset_label(dataset, section.study, section.labels)
        for kind, name, what in (("confusion", rundir.CONFUSION_PNG, "confusion matrix"),
                                 ("per-class", rundir.PER_CLASS_PNG, "per-class accuracy")):
            if (run.dir / name).is_file():
                figures.append(plots.Plot(f"{kind}-{slug(label)}", f"{section.title}: {what} of {run.name} ({label})",
                                          (run.dir / name).read_bytes()))
    return figures


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
        if study is not None:
            section.transferability = transferability_results(study, groups, section.selections)
        scatters = [plots.transferability_plot(t, title, label, f"transferability-{slug(label)}")
                    for t in section.transferability for label in [dataset_label(t["dataset"], study, labels)]]
        for plot in (plots.curves_plot(groups, title), plots.axis_plot(groups, "unfrozen", title),
                     plots.axis_plot(groups, "train-size", title), plots.axis_plot(groups, "shots", title),
                     plots.axis_plot(groups, "resolution", title), plots.axis_plot(groups, "lr", title),
                     plots.time_plot(groups, title),
                     plots.time_to_accuracy_plot(groups, title),
                     *run_figures(section), *scatters):
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
           f"{len(runs)} finished runs under `{root}`"
           + (f" ({unfinished} unfinished, not shown)" if unfinished else "") + ".",
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
        for label, header, rows, lines in section.transferability_tables():
            out += [f"**Transferability before fine-tuning, and the accuracy measured after** ({label})", "",
                    _md_table(header, rows), ""] + [line + "  " for line in lines] + [""]
        for plot in section.plots:
            out += [f"![{plot.title}]({PLOTS_DIR}/{plot.file})", ""]
    return "\n".join(out)


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; }
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
        for label, header, rows, lines in section.transferability_tables():
            out.append(f"<p><b>Transferability before fine-tuning, and the accuracy measured after</b> ({e(label)})"
                       f"</p>")
            out.append(_html_table(header, rows, "transferability"))
            out.append('<p class="note">' + "<br>".join(e(line) for line in lines) + "</p>")
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

