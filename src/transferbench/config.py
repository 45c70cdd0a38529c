"""Run configuration as typed data: what the CLI parses, what config.json records."""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError, did_you_mean

OPTIMIZERS = ("sgd", "adamw", "adam")
DEVICES = ("auto", "cpu", "cuda")


def cache_dir() -> Path:
    return Path(os.environ.get("TRANSFERBENCH_CACHE", Path.home() / ".cache" / "transferbench")).expanduser()


def default_data_dir() -> Path:
    return Path(os.environ.get("TRANSFERBENCH_DATA", cache_dir() / "data")).expanduser()


@dataclass
class RunConfig:
    dataset: str = "cifar10"
    data_dir: str | None = None
    model: str = "resnet50"
    pretrained: bool | None = None  # None: pretrained for transfer strategies, random for `scratch`
    weights: str | None = None
    strategy: str = "two-phase"
    head_epochs: int = 1
    unfreeze_lr_scale: float = 0.1
    epochs: int = 10
    batch_size: int = 128
    lr: float | None = None  # None: chosen from optimizer and strategy, recorded resolved
    optimizer: str = "adamw"
    weight_decay: float | None = None
    warmup_epochs: float | None = None
    label_smoothing: float = 0.1
    image_size: int | None = None  # None: the weights' own input resolution
    augment: bool = True
    bn_frozen: bool = False
    val_fraction: float = 0.1
    train_subset: int | None = None
    seed: int = 0
    device: str = "auto"
    workers: int = 4
    amp: bool | None = None  # None: on for CUDA, never on CPU
    channels_last: bool = True
    compile: bool = False
    feature_cache: bool | None = None  # None: on for linear-probe without augmentation
    output_dir: str = "runs"
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in names]
        if unknown:
            k = unknown[0]
            raise UserError(f"{source}: unknown option '{k}'.{did_you_mean(k, names)}")
        return cls(**d)

    def validate(self) -> None:
        from .strategies import parse_strategy

        parse_strategy(self.strategy)
        checks = [
            (self.epochs >= 0, f"--epochs must be >= 0, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (0.0 < self.val_fraction < 1.0, f"--val-fraction must be between 0 and 1 (exclusive), got {self.val_fraction}"),
            (self.train_subset is None or self.train_subset >= 1, f"--train-subset must be >= 1, got {self.train_subset}"),
            (self.image_size is None or self.image_size >= 8, f"--image-size must be >= 8, got {self.image_size}"),
            (self.lr is None or self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (0.0 <= self.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.head_epochs >= 1, f"--head-epochs must be >= 1, got {self.head_epochs}"),
            (self.unfreeze_lr_scale > 0, f"--unfreeze-lr-scale must be > 0, got {self.unfreeze_lr_scale}"),
            (self.optimizer in OPTIMIZERS, f"unknown --optimizer '{self.optimizer}'; choose one of {', '.join(OPTIMIZERS)}"),
            (self.device in DEVICES, f"unknown --device '{self.device}'; choose one of {', '.join(DEVICES)}"),
            (self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        if self.strategy == "two-phase" and self.epochs <= self.head_epochs:
            raise UserError(
                f"two-phase trains the head for --head-epochs {self.head_epochs}, then everything: "
                f"--epochs must be larger than that, got {self.epochs}"
            )
        if self.strategy == "scratch" and (self.pretrained or self.weights):
            raise UserError("strategy 'scratch' trains from random initialisation: drop --pretrained/--weights")
        if self.bn_frozen and self.strategy == "scratch":
            raise UserError("--bn-frozen keeps pretrained BatchNorm statistics; strategy 'scratch' has none to keep")
        if self.weights and self.pretrained:
            raise UserError("give either --pretrained (download) or --weights FILE (local), not both")
        if self.weights and not Path(self.weights).expanduser().is_file():
            raise UserError(f"--weights: no such file '{self.weights}'")

    def resolved(self) -> "RunConfig":
        """Fill every default that depends on other options, so config.json says what actually ran."""
        from .strategies import parse_strategy

        self.validate()
        c = dataclasses.replace(self)
        kind = parse_strategy(c.strategy).kind
        if c.weights:
            c.weights = str(Path(c.weights).expanduser().resolve())
        c.dataset = canonical_dataset(c.dataset)  # so evaluate / export work from any directory later
        if c.pretrained is None:
            c.pretrained = kind != "scratch" and not c.weights and c.model != "simple_cnn"
        if kind == "zero-shot":
            c.epochs = 0
        if c.lr is None:
            head_only = kind in ("linear-probe", "two-phase", "scratch")
            c.lr = {"sgd": 0.1 if head_only else 0.01}.get(c.optimizer, 1e-3 if head_only else 1e-4)
        if c.weight_decay is None:
            c.weight_decay = {"sgd": 5e-4, "adam": 0.0}.get(c.optimizer, 0.05)
        if c.warmup_epochs is None:
            c.warmup_epochs = 1.0 if c.epochs >= 5 else 0.0
        if c.name is None:
            c.name = default_run_name(c)
        return c


def canonical_dataset(spec: str) -> str:
    """`folder:` datasets by absolute path, so a run found from any directory names the same data."""
    if spec.startswith("folder:"):
        return "folder:" + str(Path(spec[len("folder:"):]).expanduser().resolve())
    return spec


def slug(text: str, empty: str = "run") -> str:
    """text as a file-name component."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-") or empty


def default_run_name(c: RunConfig) -> str:
    dataset = c.dataset
    if dataset.startswith("folder:"):
        dataset = Path(dataset[len("folder:"):].rstrip("/")).name or "folder"
    model = c.model.split(":", 1)[-1]
    strategy = c.strategy.replace(":", "")
    return f"{slug(dataset)}-{slug(model)}-{slug(strategy)}-s{c.seed}"
