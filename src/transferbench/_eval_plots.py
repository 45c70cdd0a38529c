"""Figures of one run's evaluation: the confusion matrix and per-class accuracy (to be merged into the plots module).

Both functions return a matplotlib Figure built without pyplot, so nothing accumulates in pyplot's figure registry
over many runs and no display is ever needed; the caller saves it (e.g. `rundir.atomic_savefig`) at its own dpi.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .errors import UserError
from .metrics import most_confused_pairs

# Headless by default, but never switch the backend of a session that already imported pyplot (a notebook's
# interactive backend): the figures below do not go through pyplot, so they render either way. Importing
# matplotlib.figure does not pick a backend, so doing this after the imports is still in time.
if "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")

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
