"""Every figure transferbench draws: a run's learning curves, and a report's comparisons of runs.

One resolution (DPI) for every PNG; matplotlib's headless backend, so nothing needs a display.
"""
from __future__ import annotations

import io
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from . import rundir  # noqa: E402
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
}
TITLES = {"curves": "learning curves", "unfrozen": "accuracy vs unfrozen layers",
          "train-size": "accuracy vs training-set size", "resolution": "accuracy vs input resolution",
          "time": "accuracy vs training time"}
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
        ax.errorbar(xs, [100 * g.mean("test_acc") for _, g in line],
                    yerr=[100 * (g.std("test_acc") or 0) for _, g in line],
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
    return Plot(kind, f"{title}: {TITLES[kind]}", png_bytes(fig))


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
    return Plot("curves", f"{title}: {TITLES['curves']}", png_bytes(fig))


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
    return Plot("time", f"{title}: {TITLES['time']}", png_bytes(fig))

