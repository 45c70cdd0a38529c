"""Every figure transferbench draws: a run's learning curves, confusion matrix and per-class accuracy, and a
report's comparisons of runs.

One resolution (DPI) for every PNG; matplotlib's headless backend, so nothing needs a display.
"""
from __future__ import annotations

import io
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from . import rundir  # noqa: E402
from .errors import UserError  # noqa: E402
from .metrics import most_confused_pairs  # noqa: E402
from .results import Group, _key, group_label, varying_keys  # noqa: E402
from .strategies import HEAD_TENSORS  # noqa: E402

DPI = 100


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def save_png(fig, path: Path) -> None:
    rundir.atomic_write_bytes(path, png_bytes(fig))


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


# ------------------------------------------------------------------------------------ plots

def path_figure(curve: list[dict], title: str):
    """An evaluation protocol's validation curve: accuracy along the L2 penalty (logreg) or k (knn)."""
    key = "wd" if "wd" in curve[0] else "k"
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot([p[key] for p in curve], [100 * p["val_acc"] for p in curve], "o-", markersize=3)
    ax.set_xscale("log")
    ax.set_xlabel("L2 penalty (weight decay; C = 1/wd)" if key == "wd" else "k nearest neighbours")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    return fig


# ------------------------------------------------------------------------------------ one run's evaluation

LABELLED_MAX = 30  # up to this many classes the heatmap's axes carry class names
HEATMAP_MAX = 100  # beyond this a heatmap is an unreadable smear: show the most-confused pairs instead
ANNOTATE_MAX = 12  # up to this many classes each heatmap cell is printed as a number too
PAIRS_SHOWN = 20
PER_CLASS_ALL_MAX = 30  # up to this many classes the per-class chart shows them all
PER_CLASS_EACH_END = 15  # else the 15 worst and the 15 best


def _short(name: str, width: int = 28) -> str:
    """Long class names would squeeze the plot area to nothing; cut the middle, since names that share a long
    prefix (or suffix) would otherwise all shorten to the same label."""
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    return name[:head] + "…" + name[len(name) - (width - 1 - head):]


def _check(classes: Sequence[str], c: int, where: str) -> list[str]:
    if isinstance(classes, str) or len(classes) != c:
        got = "a string" if isinstance(classes, str) else f"{len(classes)} names"
        raise UserError(f"{where}: expected {c} class names (index i names class i), got {got}; pass the "
                        f"dataset's class list.")
    return [str(name) for name in classes]


def confusion_figure(cm: torch.Tensor, classes: Sequence[str], title: str) -> Figure:
    """Row-normalised confusion heatmap for up to 100 classes; above that, a bar chart of the most-confused pairs."""
    where = "confusion_figure"
    if not isinstance(cm, torch.Tensor) or cm.dim() != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        shape = tuple(cm.shape) if isinstance(cm, torch.Tensor) else type(cm).__name__
        raise UserError(f"{where}: expected a square (C, C) confusion-matrix tensor, got {shape}; build it with "
                        f"transferbench.metrics.confusion_matrix.")
    c = cm.shape[0]
    classes = _check(classes, c, where)
    if c > HEATMAP_MAX:
        return _pairs_figure(cm, classes, title)

    counts = cm.detach().cpu().to(torch.float64).numpy()
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        # Row-normalised so a rare class's errors are as visible as a common one's; a class with no test image
        # has no row to normalise and is masked (drawn grey) rather than shown as "never predicted correctly".
        norm = np.ma.masked_invalid(counts / totals)
    side = 3.5 + 0.25 * c if c <= LABELLED_MAX else 10.0
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="0.85")
    im = ax.imshow(norm, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if c <= LABELLED_MAX:
        size = 8 if c <= 15 else 6
        ticks = np.arange(c)
        ax.set_xticks(ticks, [_short(n) for n in classes], rotation=90, fontsize=size)
        ax.set_yticks(ticks, [_short(n) for n in classes], fontsize=size)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
    else:
        # Names at this density overlap into a black bar; class indices every 10 still let a reader find a cell.
        ticks = np.arange(0, c, 10)
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=6)
        ax.set_yticks(ticks, [str(t) for t in ticks], fontsize=6)
        ax.set_xlabel("predicted class (index)")
        ax.set_ylabel("true class (index)")
    if c <= ANNOTATE_MAX:
        for t in range(c):
            for p in range(c):
                if counts[t, p] and not np.ma.is_masked(norm[t, p]):
                    value = float(norm[t, p])
                    ax.text(p, t, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if value > 0.5 else "black")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _pairs_figure(cm: torch.Tensor, classes: list[str], title: str) -> Figure:
    pairs = most_confused_pairs(cm, PAIRS_SHOWN)
    totals = cm.sum(dim=1).tolist()
    fig = Figure(figsize=(8.0, 1.2 + 0.28 * max(len(pairs), 3)))
    ax = fig.add_subplot()
    if not pairs:
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        y = np.arange(len(pairs))
        ax.barh(y, [count for _, _, count in pairs], color="C3")
        ax.set_yticks(y, [f"{_short(classes[t], 22)} → {_short(classes[p], 22)}" for t, p, _ in pairs], fontsize=7)
        ax.invert_yaxis()  # the most-confused pair on top
        for i, (t, _, count) in enumerate(pairs):
            ax.text(count, i, f" {count} ({100 * count / totals[t]:.0f}% of true)", va="center", fontsize=6)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # counts of images: no 0.2-image ticks
        ax.set_xlabel("images (true → predicted)")
        ax.margins(x=0.25)  # room for the labels printed after each bar
    ax.set_title(f"{title}\n{len(pairs)} most-confused pairs of {len(classes)} classes", fontsize=10)
    fig.tight_layout()
    return fig


def per_class_figure(per_class_acc: Sequence[float | None], classes: Sequence[str], title: str) -> Figure:
    """Horizontal bars of per-class accuracy, worst on top; with many classes only the 15 worst and 15 best.

    Classes whose accuracy is None (no test image) are left out and counted in the subtitle.
    """
    where = "per_class_figure"
    classes = _check(classes, len(per_class_acc), where)
    for name, acc in zip(classes, per_class_acc):
        if acc is not None and not 0.0 <= float(acc) <= 1.0:
            raise UserError(f"{where}: accuracy of class {name!r} is {acc!r}, outside [0, 1]; pass "
                            f"classification_metrics(...)['per_class_acc'] (fractions, not percent).")
    present = sorted(((float(a), n) for a, n in zip(per_class_acc, classes) if a is not None))
    missing = len(classes) - len(present)
    if len(present) <= PER_CLASS_ALL_MAX:
        shown, gap_after = present, None
    else:
        shown = present[:PER_CLASS_EACH_END] + present[-PER_CLASS_EACH_END:]
        gap_after = PER_CLASS_EACH_END - 0.5  # a line between the worst and the best group
    fig = Figure(figsize=(7.0, 1.3 + 0.22 * max(len(shown), 3)))
    ax = fig.add_subplot()
    notes = [f"{len(present)} classes"]
    if gap_after is not None:
        notes.append(f"{PER_CLASS_EACH_END} worst and {PER_CLASS_EACH_END} best shown")
    if missing:
        notes.append(f"{missing} without test images left out")
    if not shown:
        ax.text(0.5, 0.5, "no class has a test image", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        y = np.arange(len(shown))
        ax.barh(y, [100 * a for a, _ in shown], color="C0")
        ax.set_yticks(y, [_short(n) for _, n in shown], fontsize=7)
        for i, (a, _) in enumerate(shown):  # a 0% class has no visible bar: the number says it is there
            ax.text(100 * a, i, f" {100 * a:.0f}%", va="center", fontsize=6)
        ax.invert_yaxis()  # worst on top: those are what a reader looks for
        mean = 100 * float(np.mean([a for a, _ in present]))
        ax.axvline(mean, color="0.3", linestyle="--", linewidth=1, label=f"mean per-class {mean:.1f}%")
        if gap_after is not None:
            ax.axhline(gap_after, color="0.5", linewidth=0.8, linestyle=":")
        ax.set_xlim(0, 112)  # room for the number printed after a 100% bar
        ax.set_xticks([0, 20, 40, 60, 80, 100])
        ax.set_xlabel("accuracy (%)")
        ax.legend(loc="lower right", fontsize=7)
    ax.set_title(f"{title}\n{'; '.join(notes)}", fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------ comparing runs

@dataclass
class Plot:
    kind: str
    title: str
    png: bytes
    file: str = ""  # under PLOTS_DIR, filled in when written


def _unfrozen(g: Group) -> float | None:
    return g.strategy.unfrozen_tensors


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
    "shots": (lambda g: g.settings.get("shots"), "training images per class (shots)",
              ("dataset", "model", "strategy", "image_size"), ("shots",)),
    "lr": (lambda g: g.settings.get("lr"), "peak learning rate", ("dataset", "model", "strategy", "image_size"),
           ("lr",)),
}
TITLES = {"curves": "learning curves", "unfrozen": "accuracy vs unfrozen layers",
          "train-size": "accuracy vs training-set size", "resolution": "accuracy vs input resolution",
          "time": "accuracy vs training time", "time-to-accuracy": "validation accuracy vs training time, per epoch",
          "shots": "few-shot accuracy vs shots (mean ± std over seeds)", "lr": "accuracy vs learning rate"}
def short_labels(groups: list[Group]) -> dict[int, str]:
    """Each group named by what sets it apart from the others shown with it."""
    keys = varying_keys(groups, declared=True) or ["model", "strategy"]
    return {id(g): group_label(g, keys) for g in groups}


def _lines(groups: list[Group], kind: str) -> tuple[dict[str, list[tuple[float, Group]]], list[str]]:
    """Groups with a value on the axis, as lines of groups that agree on what identifies a line. Where
    that leaves two groups at one x on a line, the variant, then every other difference, splits it."""
    x_of, _, identity, axis_keys = AXES[kind]
    points = [(x_of(g), g) for g in groups if x_of(g) is not None]
    others = [k for k in varying_keys([g for _, g in points]) if k not in (*identity, *axis_keys, "variant")]
    for keys in (list(identity), ["variant", *identity], ["variant", *identity, *others]):
        lines: dict[str, list[tuple[float, Group]]] = {}
        for x, g in points:
            lines.setdefault(_key([g.get(k) for k in keys]), []).append((x, g))
        if all(len({x for x, _ in line}) == len(line) for line in lines.values()):
            break
    return {k: sorted(v, key=lambda p: p[0]) for k, v in lines.items()}, keys


def _height(entries: int) -> float:
    """A figure's height in inches, tall enough for a legend of this many entries beside it (a 66-run sweep)."""
    return max(4.2, 0.8 + 0.14 * entries)


def _legend(ax) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def _one_axes_plot(fig, ax, kind: str, title: str, xlabel: str, ylabel: str) -> Plot:
    """Labels, grid, legend and title of a one-axes report figure, as a Plot."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    _legend(ax)
    ax.set_title(f"{title}: {TITLES[kind]}", fontsize=10)
    return Plot(kind, f"{title}: {TITLES[kind]}", png_bytes(fig))


def axis_plot(groups: list[Group], kind: str, title: str) -> Plot | None:
    """Test accuracy (and best validation accuracy, dashed) along one axis; None unless a line has two points."""
    lines, keys = _lines(groups, kind)
    if not any(len(line) >= 2 for line in lines.values()):
        return None
    firsts = [line[0][1] for line in lines.values()]
    label_keys = [k for k in keys if len({_key(g.get(k)) for g in firsts}) > 1] or ["model"]
    fig, ax = plt.subplots(figsize=(7.5, _height(len(lines) + 2)))
    for i, line in enumerate(lines.values()):
        color, xs = f"C{i % 10}", [x for x, _ in line]
        ax.errorbar(xs, [100 * g.mean("test_acc") for _, g in line],
                    yerr=[100 * (g.std("test_acc") or 0) for _, g in line],
                    fmt="o-", color=color, capsize=3, label=group_label(line[0][1], label_keys))
        ax.plot(xs, [100 * g.mean("best_val_acc") for _, g in line], "x--", color=color, alpha=0.5)
    ax.plot([], [], "ko-", label="test")
    ax.plot([], [], "kx--", alpha=0.5, label="best validation")
    xs = [x for line in lines.values() for x, _ in line]
    if kind == "lr" or (kind == "train-size" and max(xs) > 20 * min(xs)):
        ax.set_xscale("log")
    return _one_axes_plot(fig, ax, kind, title, AXES[kind][1], "accuracy (%)")


def curves_plot(groups: list[Group], title: str) -> Plot | None:
    """Validation accuracy and training loss per epoch, every trained configuration overlaid (seeds averaged)."""
    trained = [g for g in groups if g.trained]
    if not any(len([m for m in r.metrics if m.get("train_loss") is not None]) >= 2 for g in trained for r in g.runs):
        return None
    labels = short_labels(trained)
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, _height(len(trained))))
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
    return Plot("curves", f"{title}: {TITLES['curves']}", png_bytes(fig))


def time_to_accuracy_plot(groups: list[Group], title: str) -> Plot | None:
    """Time to accuracy: each configuration's validation accuracy after every epoch against the training time spent
    so far (seeds averaged), its test accuracy marked at the end. Drawn where the configurations spend different
    budgets (epochs or training-set size), the question this plot answers."""
    trained = [g for g in groups if g.trained and all(m.get("epoch_time_s") is not None for r in g.runs
                                                      for m in r.metrics)]
    budgets = {_key([g.get("epochs"), g.get("train_subset")]) for g in trained}
    if len(trained) < 2 or len(budgets) < 2:
        return None
    labels = short_labels(trained)
    fig, ax = plt.subplots(figsize=(7.5, _height(len(trained) + 2)))
    for i, g in enumerate(trained):
        elapsed = [np.cumsum([m["epoch_time_s"] for m in r.metrics]) for r in g.runs]
        n = min(len(e) for e in elapsed)
        minutes = [statistics.fmean(e[k] for e in elapsed) / 60 for k in range(n)]
        val = [100 * statistics.fmean(r.metrics[k]["val_acc"] for r in g.runs) for k in range(n)]
        ax.plot(minutes, val, "o-", color=f"C{i % 10}", markersize=3, label=labels[id(g)])
        ax.plot([minutes[-1]], [100 * g.mean("test_acc")], "*", color=f"C{i % 10}", markersize=11)
    ax.plot([], [], "ko-", markersize=3, label="validation, per epoch")
    ax.plot([], [], "k*", markersize=9, label="test (selected epoch)")
    return _one_axes_plot(fig, ax, "time-to-accuracy", title, "training time (minutes)", "accuracy (%)")


def time_plot(groups: list[Group], title: str) -> Plot | None:
    """Test accuracy against training time, one point per trained configuration."""
    points = [(g.mean("train_time_s"), g) for g in groups if g.trained and g.mean("train_time_s")]
    if len(points) < 2:
        return None
    labels = short_labels([g for _, g in points])
    fig, ax = plt.subplots(figsize=(7.5, _height(len(points))))
    for i, (t, g) in enumerate(points):
        ax.errorbar([t], [100 * g.mean("test_acc")], yerr=[100 * (g.std("test_acc") or 0)], color=f"C{i % 10}",
                    fmt="osD^v<>"[i // 10 % 7], capsize=3, label=labels[id(g)])
    times = [t for t, _ in points]
    if max(times) > 20 * min(times):
        ax.set_xscale("log")
    return _one_axes_plot(fig, ax, "time", title, "training time (s, all epochs)", "test accuracy (%)")

def transferability_plot(result: dict, title: str, dataset: str, kind: str) -> Plot | None:
    """Per estimator, each model's transferability score against its measured test accuracy, with τ_w."""
    points = result["points"]
    if len(points) < 2:
        return None
    estimators = result["estimators"]
    fig, axes = plt.subplots(1, len(estimators), figsize=(4.6 * len(estimators), 3.8), squeeze=False)
    for ax, name in zip(axes[0], estimators):
        for i, p in enumerate(points):
            ax.errorbar([p["scores"][name]], [100 * p["test_acc"]], yerr=[100 * (p["test_std"] or 0)],
                        fmt="o", color=f"C{i % 10}", capsize=3)
            ax.annotate(_short(p["model"], 22), (p["scores"][name], 100 * p["test_acc"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel(f"{name} (before fine-tuning)")
        ax.set_ylabel(f"test accuracy (%), {result['strategy']}")
        ax.set_title(f"{name}: τ_w = {result['tau'][name]:.2f}", fontsize=10)
        ax.margins(x=0.3, y=0.12)  # room for the names beside the points
        ax.grid(alpha=0.3)
    caption = f"{title}: transferability vs fine-tuned accuracy ({dataset})"
    fig.suptitle(caption, fontsize=10)
    fig.tight_layout()
    return Plot(kind, caption, png_bytes(fig))
