"""Transfer strategies: which parameters train, in which phase, at which learning rate.

A strategy is a list of phases. Each phase names the parameters that train and a learning-rate scale;
the training loop rebuilds its optimizer (and any compiled graph) at every phase boundary. Everything
else that depends on the strategy (its default learning rate, whether it can train on cached features,
how a report places it) is a property of `Strategy`, so a new strategy is one row of `KINDS`.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import UserError, did_you_mean

HEAD_TENSORS = 2  # a linear classifier's weight and bias: what linear-probe unfreezes


@dataclass(frozen=True)
class Kind:
    trains: bool = True  # False: evaluated as built (zero-shot)
    lr_tier: str = "backbone"  # default learning rate: "head" (a new layer, or from scratch) or "backbone"
    from_scratch: bool = False  # random initialisation; pretrained weights are refused
    head_only: bool = False  # only the new head ever trains: the backbone's features can be cached
    phased: bool = False  # head alone for --head-epochs, then everything at --unfreeze-lr-scale
    takes_k: bool = False  # written KIND:K
    fit: str = "sgd"  # how the trainable part is fitted: epochs of SGD/Adam, or a closed protocol on cached features


KINDS: dict[str, Kind] = {
    "zero-shot": Kind(trains=False, lr_tier="head", head_only=True),
    "linear-probe": Kind(lr_tier="head", head_only=True),
    "full": Kind(),
    "last-n": Kind(takes_k=True),
    "two-phase": Kind(lr_tier="head", phased=True),
    "scratch": Kind(lr_tier="head", from_scratch=True),
    # The field's evaluation protocols on frozen features (see `probes`): no epochs, no learning rate.
    "logreg": Kind(head_only=True, fit="logreg"),
    "knn": Kind(head_only=True, fit="knn"),
}


@dataclass(frozen=True)
class Strategy:
    kind: str
    k: int | None = None  # for last-n

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.k}" if self.k is not None else self.kind

    @property
    def spec(self) -> Kind:
        return KINDS[self.kind]

    trains = property(lambda self: self.spec.trains)
    lr_tier = property(lambda self: self.spec.lr_tier)
    from_scratch = property(lambda self: self.spec.from_scratch)
    phased = property(lambda self: self.spec.phased)

    @property
    def fits_features(self) -> bool:
        """Fitted in closed form on cached features (logreg, knn), not trained for epochs."""
        return self.spec.fit != "sgd"

    @property
    def trains_backbone(self) -> bool:
        """Layers other than the new head train at some point (full, last-n, two-phase, scratch)."""
        return self.trains and not self.spec.head_only

    @property
    def can_cache_features(self) -> bool:
        return self.spec.head_only and self.spec.trains

    @property
    def unfrozen_tensors(self) -> int | None:
        """Parameter tensors that train, where that is one number whatever the model (the report's axis)."""
        if not self.trains:
            return 0
        if self.k is not None:
            return self.k
        return HEAD_TENSORS if self.spec.head_only else None

    def trainable(self, model: nn.Module, head: str, phase: int = 0) -> frozenset[str]:
        """Names of the parameters that train. `head` is the classifier module's name in the model."""
        names = [n for n, _ in model.named_parameters()]
        if not self.trains:
            return frozenset()
        if self.spec.head_only or (self.phased and phase == 0):
            return frozenset(n for n in names if n.startswith(head + "."))
        if self.k is not None:
            if self.k > len(names):
                raise UserError(f"{self.name} asks for more parameter tensors than the model has ({len(names)}); "
                                f"use K between 1 and {len(names)}")
            # The last K tensors in named_parameters() order, head included: the meaning used by the
            # published layer-wise studies this tool reproduces.
            return frozenset(names[-self.k:])
        return frozenset(names)

    def phases(self, model: nn.Module, head: str, epochs: int, head_epochs: int,
               unfreeze_lr_scale: float) -> list[Phase]:
        if self.phased:
            return [Phase(0, 0, head_epochs, self.trainable(model, head, 0)),
                    Phase(1, head_epochs, epochs, self.trainable(model, head, 1), unfreeze_lr_scale)]
        return [Phase(0, 0, epochs, self.trainable(model, head))]


@dataclass(frozen=True)
class Phase:
    index: int
    first_epoch: int
    end_epoch: int  # exclusive
    trainable: frozenset[str]
    lr_scale: float = 1.0

    def head_only(self, head: str) -> bool:
        """Whether only the head's parameters train in this phase."""
        return bool(self.trainable) and all(n.startswith(head + ".") for n in self.trainable)


def parse_strategy(text: str) -> Strategy:
    kind, sep, arg = text.partition(":")
    if kind not in KINDS:
        raise UserError(f"unknown strategy '{text}'; choose one of {', '.join(KINDS)} (last-n as last-n:K)."
                        f"{did_you_mean(kind, KINDS)}")
    if not KINDS[kind].takes_k:
        if sep:
            raise UserError(f"strategy '{kind}' takes no ':' argument, got '{text}'")
        return Strategy(kind)
    try:
        k = int(arg)
    except ValueError:
        raise UserError(f"strategy {kind} needs a number of parameter tensors, as {kind}:K (e.g. {kind}:25), "
                        f"got '{text}'") from None
    if k < 1:
        raise UserError(f"{kind}:K needs K >= 1, got K = {k}")
    return Strategy(kind, k)


def apply_trainable(model: nn.Module, trainable: frozenset[str]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)


def set_train_mode(model: nn.Module, bn_frozen: bool = False, head_only: str | None = None) -> None:
    """model.train(), except that every submodule without a trainable parameter runs in eval mode.

    A frozen part must not change in any way: eval mode keeps BatchNorm running statistics fixed and
    turns off dropout / stochastic depth inside it.
    `head_only` (the head's module name) when nothing but the head trains: then everything else runs in
    eval mode, parameterless modules (a Dropout before the head, as in MobileNetV2 and VGG) and the model's
    own functional dropout (timm's drop_rate, applied by the top-level module) included, so the head
    trains on exactly the features the backbone computes at evaluation, which is also what the feature
    cache stores: a linear probe is the same with and without the cache.
    With `bn_frozen`, every BatchNorm layer keeps its pretrained statistics even while its affine
    parameters train: on small datasets, small batches or images unlike the pretraining ones, batch
    statistics shift every feature the head was trained on.
    """
    if head_only is not None:
        model.eval()
        model.get_submodule(head_only).train()
        return
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
