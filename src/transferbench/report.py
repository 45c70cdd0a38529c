"""Figures and reports from run records."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402


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


def add_arguments(parser) -> None:
    parser.add_argument("args", nargs="*")


def command(args) -> int:
    from .errors import UserError

    raise UserError("'report' is not implemented yet")
