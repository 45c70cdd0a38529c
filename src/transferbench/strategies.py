"""Transfer strategies: which parameters train, in which phase, at which learning rate.

A strategy is a list of phases. Each phase names the parameters that train and a learning-rate scale;
the training loop rebuilds its optimizer (and any compiled graph) at every phase boundary.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import UserError, did_you_mean

KINDS = ("zero-shot", "linear-probe", "full", "last-n", "two-phase", "scratch")


@dataclass(frozen=True)
class Strategy:
    kind: str
    k: int | None = None  # for last-n

    @property
    def name(self) -> str:
        return f"last-n:{self.k}" if self.kind == "last-n" else self.kind


@dataclass(frozen=True)
class Phase:
    index: int
    first_epoch: int
    end_epoch: int  # exclusive
    trainable: frozenset[str]
    lr_scale: float = 1.0


def parse_strategy(text: str) -> Strategy:
    kind, _, arg = text.partition(":")
    if kind not in KINDS:
        raise UserError(f"unknown strategy '{text}'; choose one of {', '.join(KINDS)} (last-n as last-n:K).{did_you_mean(kind, KINDS)}")
    if kind != "last-n":
        if arg:
            raise UserError(f"strategy '{kind}' takes no ':' argument, got '{text}'")
        return Strategy(kind)
    try:
        k = int(arg)
    except ValueError:
        raise UserError(f"strategy last-n needs a number of parameter tensors, as last-n:K (e.g. last-n:25), got '{text}'") from None
    if k < 1:
        raise UserError(f"last-n:K needs K >= 1, got K = {k}")
    return Strategy("last-n", k)


def trainable_names(model: nn.Module, head: str, strategy: Strategy, *, phase: int = 0) -> frozenset[str]:
    """Names of the parameters that train. `head` is the classifier module's name in the model."""
    names = [n for n, _ in model.named_parameters()]
    head_names = [n for n in names if n.startswith(head + ".")]
    kind = strategy.kind
    if kind == "zero-shot":
        return frozenset()
    if kind == "linear-probe" or (kind == "two-phase" and phase == 0):
        return frozenset(head_names)
    if kind == "last-n":
        if strategy.k > len(names):
            raise UserError(
                f"last-n:{strategy.k} asks for more parameter tensors than the model has ({len(names)}); "
                f"use K between 1 and {len(names)}"
            )
        # The last K tensors in named_parameters() order, head included: the meaning used by the
        # published layer-wise studies this tool reproduces.
        return frozenset(names[-strategy.k:])
    return frozenset(names)


def phases(model: nn.Module, head: str, strategy: Strategy, epochs: int, head_epochs: int, unfreeze_lr_scale: float) -> list[Phase]:
    if strategy.kind == "two-phase":
        return [
            Phase(0, 0, head_epochs, trainable_names(model, head, strategy, phase=0)),
            Phase(1, head_epochs, epochs, trainable_names(model, head, strategy, phase=1), unfreeze_lr_scale),
        ]
    return [Phase(0, 0, epochs, trainable_names(model, head, strategy))]


def apply_trainable(model: nn.Module, trainable: frozenset[str]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)


def set_train_mode(model: nn.Module, bn_frozen: bool = False) -> None:
    """model.train(), except that every submodule without a trainable parameter runs in eval mode.

    A frozen part must not change in any way: eval mode keeps BatchNorm running statistics fixed and
    turns off dropout / stochastic depth inside it, so a frozen backbone computes exactly the features
    it computes at evaluation (which is also what the feature cache stores).
    With `bn_frozen`, every BatchNorm layer keeps its pretrained statistics even while its affine
    parameters train: on small datasets, small batches or images unlike the pretraining ones, batch
    statistics shift every feature the head was trained on.
    """
    model.train()
    for module in model.modules():
        if module is model:
            continue
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()
        elif bn_frozen and isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def count_params(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
