"""Classification metrics a run records on its test and validation splits, and the files that hold them.

This module owns the numbers (top-1/top-5, per-class and mean per-class accuracy, NLL, ECE), the confusion
matrix and its CSV, the most-confused class pairs, and the per-image top-k predictions file. Figures of these
live in `_eval_plots`. Everything returned by `classification_metrics` is a plain Python value, ready for JSON.
"""
from __future__ import annotations

import csv
import io
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError
from .rundir import atomic_write_bytes, atomic_write_text

ECE_BINS = 15  # Guo et al. 2017 use 15 equal-width bins; the number is part of the metric's definition


def _check_logits(logits: Any, where: str) -> torch.Tensor:
    """Float64 CPU copy of a (N, C) logits tensor, or a UserError saying what is wrong with it."""
    if not isinstance(logits, torch.Tensor):
        raise UserError(f"{where}: logits must be a torch.Tensor of shape (N, C), got {type(logits).__name__}; "
                        f"convert with torch.as_tensor(...).")
    if logits.dim() != 2:
        raise UserError(f"{where}: logits must have shape (N, C) (one row of class scores per image), got shape "
                        f"{tuple(logits.shape)}; reshape or stack the model outputs.")
    if not logits.is_floating_point():
        raise UserError(f"{where}: logits must be a floating-point tensor, got dtype {logits.dtype}; pass the raw "
                        f"model outputs, not predicted class indices.")
    n, c = logits.shape
    if n == 0 or c == 0:
        raise UserError(f"{where}: logits of shape {tuple(logits.shape)} are empty; the split has no images or the "
                        f"model has no classes, so there is nothing to measure.")
    logits = logits.detach().to("cpu", torch.float64)
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).any(dim=1).sum())
        raise UserError(f"{where}: {bad} of {n} rows of logits contain NaN or inf; the model's outputs are not "
                        f"usable (training probably diverged: lower the learning rate or check the inputs).")
    return logits


def _check_labels(labels: Any, n: int, num_classes: int, where: str, name: str = "labels") -> torch.Tensor:
    """Int64 CPU copy of a (N,) class-index tensor whose values lie in [0, num_classes)."""
    if not isinstance(labels, torch.Tensor):
        raise UserError(f"{where}: {name} must be a torch.Tensor of shape (N,), got {type(labels).__name__}; "
                        f"convert with torch.as_tensor(...).")
    if labels.dim() != 1:
        raise UserError(f"{where}: {name} must have shape (N,) (one class index per image), got shape "
                        f"{tuple(labels.shape)}; if these are one-hot or scores, take .argmax(1) first.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise UserError(f"{where}: {name} must hold integer class indices, got dtype {labels.dtype}; "
                        f"convert with .long().")
    if labels.numel() != n:
        raise UserError(f"{where}: {name} has {labels.numel()} entries but there are {n} images; the two must "
                        f"come from the same split in the same order.")
    labels = labels.detach().to("cpu", torch.int64)
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise UserError(f"{where}: {name} must lie in [0, {num_classes}) for {num_classes} classes, found "
                        f"{sorted(set(bad.tolist()))[:10]}; the dataset's classes and the model's outputs disagree.")
    return labels


def _check_classes(classes: Sequence[str], num_classes: int, where: str) -> list[str]:
    if isinstance(classes, str) or not all(isinstance(name, str) for name in classes):
        raise UserError(f"{where}: classes must be a list of class-name strings, got {classes!r:.80}.")
    classes = list(classes)
    if len(classes) != num_classes:
        raise UserError(f"{where}: {len(classes)} class names were given for {num_classes} classes; pass the "
                        f"dataset's class list (index i names class i).")
    return classes


def _check_cm(cm: Any, where: str) -> torch.Tensor:
    if not isinstance(cm, torch.Tensor) or cm.dim() != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        shape = tuple(cm.shape) if isinstance(cm, torch.Tensor) else type(cm).__name__
        raise UserError(f"{where}: expected a square (C, C) confusion-matrix tensor, got {shape}; build it with "
                        f"transferbench.metrics.confusion_matrix.")
    return cm.detach().to("cpu", torch.int64)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1/top-5, per-class and mean per-class accuracy, NLL and ECE of (N, C) logits against (N,) labels.

    `top5` is None when there are fewer than 5 classes (it would trivially be 1). `per_class_acc[c]` is None
    for a class with no image in `labels`, and `mean_per_class_acc` averages only the classes that occur.
    """
    where = "classification_metrics"
    logits = _check_logits(logits, where)
    n, c = logits.shape
    labels = _check_labels(labels, n, c, where)

    log_probs = torch.log_softmax(logits, dim=1)  # float64: stable NLL even for very confident rows
    # Rank of the true class, ties going to the lower class index exactly as argmax breaks them; top-1 and top-5
    # both read it, so top5 >= top1 even for tied (e.g. constant) logits, where topk's tie order is unspecified.
    target = logits.gather(1, labels[:, None])
    lower_index = torch.arange(c)[None, :] < labels[:, None]
    rank = (logits > target).sum(dim=1) + ((logits == target) & lower_index).sum(dim=1)
    correct = (rank == 0).to(torch.float64)
    top5 = float((rank < 5).to(torch.float64).mean()) if c >= 5 else None

    per_class_total = torch.bincount(labels, minlength=c).to(torch.float64)
    per_class_correct = torch.bincount(labels, weights=correct, minlength=c)
    per_class_acc: list[float | None] = [
        float(per_class_correct[i] / per_class_total[i]) if per_class_total[i] > 0 else None for i in range(c)
    ]
    present = [a for a in per_class_acc if a is not None]  # never empty: n >= 1 so some class occurs

    return {
        "top1": float(correct.mean()),
        "top5": top5,
        "mean_per_class_acc": float(np.mean(present)),
        "per_class_acc": per_class_acc,
        "nll": float(-log_probs.gather(1, labels[:, None]).mean()),
        "ece": _ece(log_probs.exp().max(dim=1).values, correct),
        "count": int(n),
    }


def _ece(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error (Guo et al. 2017): sum over bins of |acc - conf| weighted by the bin's share.

    Bins are (lo, hi] as in the reference implementation; the max softmax probability is >= 1/C > 0, so the
    open lower edge of the first bin never drops a sample.
    """
    edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
    n = confidence.numel()
    total = 0.0
    for lo, hi in itertools.pairwise(edges.tolist()):
        in_bin = (confidence > lo) & (confidence <= hi)
        count = int(in_bin.sum())
        if count:
            total += count / n * abs(float(correct[in_bin].mean()) - float(confidence[in_bin].mean()))
    return float(total)


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts: row = true class, column = predicted class."""
    where = "confusion_matrix"
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"{where}: num_classes must be a positive int, got {num_classes!r}.")
    if not isinstance(labels, torch.Tensor):
        raise UserError(f"{where}: labels must be a torch.Tensor of shape (N,), got {type(labels).__name__}.")
    labels = _check_labels(labels, labels.numel(), num_classes, where)  # the shape check inside comes first
    pred = _check_labels(pred, labels.numel(), num_classes, where, name="pred")
    # One bincount over the flattened (true, pred) index instead of a Python loop over images.
    flat = labels * num_classes + pred
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def top_k(logits: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most probable classes per row and their softmax probabilities, k clipped to the number of classes."""
    logits = _check_logits(logits, "top_k")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(f"top_k: k must be a positive int, got {k!r}.")
    # A stable sort puts tied classes in index order, so column 0 is always the argmax prediction.
    probs, classes = torch.softmax(logits, dim=1).sort(dim=1, descending=True, stable=True)
    k = min(k, logits.shape[1])
    probs, classes = probs[:, :k], classes[:, :k]
    return classes.to(torch.int64), probs.to(torch.float32)


def write_predictions(path: Path, logits: torch.Tensor, labels: torch.Tensor, classes: list[str], k: int = 5) -> None:
    """Atomically write an .npz of per-image `label`, `topk_classes`, `topk_probs` (float32) and `class_names`.

    Every array is a plain numeric/unicode dtype, so `np.load(path)` reads it without allow_pickle.
    """
    where = f"write_predictions({path})"
    checked = _check_logits(logits, where)
    n, c = checked.shape
    labels = _check_labels(labels, n, c, where)
    classes = _check_classes(classes, c, where)
    topk_classes, topk_probs = top_k(checked, k)
    buf = io.BytesIO()
    np.savez(buf, label=labels.numpy(), topk_classes=topk_classes.numpy(), topk_probs=topk_probs.numpy(),
             class_names=np.array(classes, dtype=str))
    atomic_write_bytes(Path(path), buf.getvalue())


def write_confusion_csv(path: Path, cm: torch.Tensor, classes: list[str]) -> None:
    """Atomically write the confusion matrix as CSV: header `true\\pred,<names>`, one row per true class."""
    where = f"write_confusion_csv({path})"
    cm = _check_cm(cm, where)
    classes = _check_classes(classes, cm.shape[0], where)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")  # the csv module quotes names that contain commas or quotes
    writer.writerow(["true\\pred", *classes])
    for name, row in zip(classes, cm.tolist()):
        writer.writerow([name, *row])
    atomic_write_text(Path(path), buf.getvalue())


def most_confused_pairs(cm: torch.Tensor, n: int = 20) -> list[tuple[int, int, int]]:
    """Up to n off-diagonal (true class index, predicted class index, count) with count > 0, largest first.

    Ties are broken by (true, pred) so the list is the same on every run.
    """
    cm = _check_cm(cm, "most_confused_pairs")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise UserError(f"most_confused_pairs: n must be a non-negative int, got {n!r}.")
    off = cm.clone()
    off.fill_diagonal_(0)
    nz = off.nonzero().tolist()
    pairs = sorted(((t, p, int(off[t, p])) for t, p in nz), key=lambda x: (-x[2], x[0], x[1]))
    return pairs[:n]
