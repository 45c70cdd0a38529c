"""Run configuration as typed data: what the CLI parses, what config.json records, what a study sweeps.

Every option is one `RunConfig` field; its help text and whether it changes a result live in the field's
metadata, so the CLI flags, the resume check, the study planner and the report all read one definition.
`DatasetSpec` is the one parser of `--dataset` values.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError, did_you_mean
from .strategies import parse_strategy
from .trackers import KINDS as TRACKERS

OPTIMIZERS = ("sgd", "adamw", "adam")
# The default peak learning rate per optimizer: (a new head alone, or from scratch; pretrained layers), chosen by the
# strategy's lr tier (strategies.Kind). AdamW's pair was chosen on validation by the sweep in
# studies/cpu-cifar10-defaults-sweep.yaml (README "Defaults"); Adam's and SGD's are the usual ones, not measured here.
DEFAULT_LR = {"adamw": (3e-3, 3e-4), "adam": (1e-3, 1e-4), "sgd": (0.1, 0.01)}
AUGMENTS = ("none", "crop-flip", "rrc", "trivialaugment", "randaugment")
HEAD_INITS = ("train", "logreg")
DEVICES = ("auto", "cpu", "cuda")
MAX_SEED = 2**32 - 1  # numpy's default_rng and torch.manual_seed both take it


def cache_dir() -> Path:
    return Path(os.environ.get("TRANSFERBENCH_CACHE", Path.home() / ".cache" / "transferbench")).expanduser()


def default_data_dir() -> Path:
    return Path(os.environ.get("TRANSFERBENCH_DATA", cache_dir() / "data")).expanduser()


def option(default: Any, help: str = "", *, neutral: bool = False, short: tuple[str, ...] = (),
           choices: tuple[str, ...] | None = None, bool_alias: tuple[str, str] | None = None) -> Any:
    """A RunConfig field. neutral: says where or how fast a run runs, never what it computes, so it may
    differ when a run is resumed and never tells two runs apart in a report. bool_alias: the values that
    false / true stand for (--no-augment, `augment: false` in a study file, configs of older versions)."""
    return dataclasses.field(default=default, metadata={"help": help, "neutral": neutral, "short": short,
                                                        "choices": choices, "bool_alias": bool_alias})


# ----------------------------------------------------------------------------------------- datasets

@dataclass(frozen=True)
class DatasetSpec:
    """A `--dataset` value: a catalog name (cifar10, ...) or PREFIX:PATH for data the user brings."""

    kind: str  # "catalog" or one of PREFIXES
    name: str  # the catalog name, or the path as given

    PREFIXES = ("folder", "csv", "hf")

    @classmethod
    def parse(cls, text: str) -> "DatasetSpec":
        prefix, sep, rest = text.partition(":")
        if sep and prefix in cls.PREFIXES:
            if not rest:
                raise UserError(f"--dataset {text}: give a path after '{prefix}:', e.g. {prefix}:~/data/flowers")
            return cls(prefix, rest)
        if sep and len(prefix) > 1:  # a Windows drive letter is no prefix, but nothing else is
            raise UserError(f"--dataset {text}: unknown prefix '{prefix}:'; use "
                            + ", ".join(f"{p}:PATH" for p in cls.PREFIXES) + " or a dataset name")
        if not text:
            raise UserError("--dataset is empty: give a dataset name (e.g. cifar10) or folder:PATH")
        return cls("catalog", text)

    @property
    def path(self) -> Path:
        return Path(self.name).expanduser()

    def canonical(self) -> str:
        """As config.json records it: user data by absolute path, so a run read from any directory names
        the same data."""
        if self.kind == "catalog" or (self.kind == "hf" and not self.is_local()):
            return f"hf:{self.name}" if self.kind == "hf" else self.name  # a hub name stays a name
        return f"{self.kind}:{self.path.resolve()}"

    def is_local(self) -> bool:
        """User data on this machine (folder:, csv:, or hf: naming a local dataset), not a name."""
        return self.kind in ("folder", "csv") or (self.kind == "hf" and self.path.exists())

    def short_name(self) -> str:
        """For run names and reports: the catalog name, or the data's own directory or file name."""
        if self.kind == "catalog":
            return self.name
        return Path(self.name.rstrip("/")).name or self.kind

    def moved_to(self, new_path: str) -> "DatasetSpec":
        """The same kind of dataset at another path (`--data-dir` for a run whose data moved)."""
        return self if self.kind == "catalog" else DatasetSpec(self.kind, new_path)


def canonical_dataset(text: str) -> str:
    return DatasetSpec.parse(text).canonical()


# ------------------------------------------------------------------------------------ the options

@dataclass
class RunConfig:
    dataset: str = option("cifar10", "a catalog name (transferbench datasets), folder:PATH (train/ and test/ of "
                                     "class folders, or class folders only), csv:FILE or hf:NAME[:CONFIG]")
    data_dir: str | None = option(None, "where catalog datasets live / are downloaded (default $TRANSFERBENCH_DATA "
                                        "or ~/.cache/transferbench/data)", neutral=True)
    model: str = option("resnet50", "simple_cnn, a torchvision or timm model name; tv:NAME / timm:NAME force one "
                                    "library")
    pretrained: bool | None = option(None, "load ImageNet weights the library's standard way (download + cache); "
                                           "default on except for scratch")
    weights: str | None = option(None, "local state dict for the backbone (classifier keys are dropped, every other "
                                       "key must match)")
    strategy: str = option("two-phase", "zero-shot, linear-probe, full, last-n:K, two-phase, scratch; the evaluation "
                                        "protocols logreg (L-BFGS, penalty chosen on val, refit) and knn (weighted)")
    head_epochs: int = option(1, "two-phase: epochs that train the head alone")
    unfreeze_lr_scale: float = option(0.1, "two-phase: learning-rate scale once everything trains")
    epochs: int = option(10)
    batch_size: int = option(128, short=("-b",))
    lr: float | None = option(None, "peak learning rate (default with adamw: 3e-3 for linear-probe, two-phase and "
                                    "scratch, 3e-4 for full and last-n; recorded in config.json)")
    optimizer: str = option("adamw", choices=OPTIMIZERS)
    weight_decay: float | None = option(None, "default 0.05 adamw, 5e-4 sgd, 0 adam; never on biases and norm "
                                              "parameters", short=("--wd",))
    warmup_epochs: float | None = option(None, "linear warmup before the cosine decay, per phase (default 1 when "
                                               "epochs >= 5, else 0)")
    label_smoothing: float = option(0.1)
    image_size: int | None = option(None, "input resolution (default: the weights' own, e.g. 224)")
    augment: str = option("crop-flip", "training augmentation, in batches on the device: none, crop-flip (random "
                                       "crop with reflect padding + flip), rrc (random-resized-crop + flip), "
                                       "trivialaugment, randaugment; --no-augment is none", choices=AUGMENTS,
                          bool_alias=("none", "crop-flip"))
    mixup: float = option(0.0, "mixup alpha (timm's Mixup; 0 = off)")
    cutmix: float = option(0.0, "cutmix alpha (timm's Mixup; 0 = off)")
    random_erasing: float = option(0.0, "probability of random erasing per image (timm's RandomErasing)")
    layer_decay: float | None = option(None, "layer-wise learning-rate decay: each block down from the head trains at "
                                             "this factor times the rate of the one above (timm's group_matcher; per "
                                             "stage for torchvision models)")
    head_lr_scale: float | None = option(None, "learning-rate factor of the new head when pretrained layers train too "
                                               "(default 10 for full and last-n, 1 otherwise)")
    ema: float | None = option(None, "exponential moving average of the weights with this decay (e.g. 0.999), "
                                     "evaluated and selected like the raw weights")
    drop_path: float | None = option(None, "stochastic depth rate, where the model has it")
    head_init: str = option("train", "two-phase: the head before everything trains: train (--head-epochs of "
                                     "training) or logreg (the validated logistic-regression head: LP-FT)",
                            choices=HEAD_INITS)
    bn_frozen: bool | None = option(None, "BatchNorm layers keep their pretrained running statistics while they "
                                           "train (default: on wherever pretrained layers train; --no-bn-frozen "
                                           "updates them from the batches)")
    val_fraction: float = option(0.1, "stratified validation split carved from train, used for model selection "
                                      "(datasets with an official validation split use that instead)")
    test_fraction: float = option(0.2, "data without a test split (a folder of class folders, a CSV without a split "
                                       "column): the stratified, seeded share held out for testing")
    train_subset: int | None = option(None, "train on a stratified subset of N images")
    shots: int | None = option(None, "few-shot: train on exactly K images per class (seeded)")
    refit: bool = option(False, "train on train+val for exactly --epochs and test the final weights, no selection "
                                "(the protocol of VTAB and Kornblith et al. once a configuration is chosen)")
    image_column: str | None = option(None, "hf: datasets: the image column (default: the one Image feature)")
    label_column: str | None = option(None, "hf: datasets: the label column (default: the one ClassLabel feature)")
    seed: int = option(0)
    device: str = option("auto", neutral=True, choices=DEVICES)
    workers: int = option(4, "threads for decoding images", neutral=True, short=("-j",))
    amp: bool | None = option(None, "mixed precision (CUDA only; never on CPU)")
    channels_last: bool = option(True, neutral=True)
    compile: bool = option(False, "torch.compile the model (rebuilt at each phase boundary)", neutral=True)
    feature_cache: bool | None = option(None, "linear-probe: train the head on cached backbone features (default when "
                                              "augmentation is off)")
    log: str | None = option(None, "experiment trackers, comma-separated: tensorboard, mlflow (optional extra "
                                   "transferbench[tracking])", neutral=True)
    output_dir: str = option("runs", "parent of the run directory", neutral=True)
    name: str | None = option(None, "run directory name (default <dataset>-<model>-<strategy>-s<seed>)", neutral=True)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) and f.metadata["bool_alias"]:
                setattr(self, f.name, f.metadata["bool_alias"][value])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "RunConfig":
        unknown = [k for k in d if k not in FIELDS]
        if unknown:
            k = unknown[0]
            raise UserError(f"{source}: unknown option '{k}'.{did_you_mean(k, FIELDS)}")
        return cls(**d)

    def validate(self) -> None:
        """Every value on its own and together: the one place a configuration is checked (run and study)."""
        strategy = parse_strategy(self.strategy)
        DatasetSpec.parse(self.dataset)
        for name in FIELDS:  # NaN and infinity pass every comparison below, so they go first
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--{flag(name)} must be a finite number, got {value}")
        checks = [
            (self.epochs >= 0, f"--epochs must be >= 0, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (0.0 < self.val_fraction < 1.0, f"--val-fraction must be between 0 and 1 (exclusive), got "
                                            f"{self.val_fraction}"),
            (0.0 < self.test_fraction < 1.0, f"--test-fraction must be between 0 and 1 (exclusive), got "
                                             f"{self.test_fraction}"),
            (self.shots is None or self.shots >= 1, f"--shots must be >= 1, got {self.shots}"),
            (self.shots is None or self.train_subset is None, "give --shots (images per class) or --train-subset "
                                                              "(images in all), not both"),
            (self.train_subset is None or self.train_subset >= 1, f"--train-subset must be >= 1, got "
                                                                  f"{self.train_subset}"),
            (self.image_size is None or self.image_size >= 8, f"--image-size must be >= 8, got {self.image_size}"),
            (self.lr is None or self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.weight_decay is None or self.weight_decay >= 0, f"--weight-decay must be >= 0, got "
                                                                  f"{self.weight_decay}"),
            (self.warmup_epochs is None or self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got "
                                                                    f"{self.warmup_epochs}"),
            (0.0 <= self.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.head_epochs >= 1, f"--head-epochs must be >= 1, got {self.head_epochs}"),
            (self.unfreeze_lr_scale > 0, f"--unfreeze-lr-scale must be > 0, got {self.unfreeze_lr_scale}"),
            (0 <= self.seed <= MAX_SEED, f"--seed must be an integer from 0 to {MAX_SEED}, got {self.seed}"),
            (self.augment in AUGMENTS, f"unknown --augment '{self.augment}'; choose one of {', '.join(AUGMENTS)}"),
            (self.head_init in HEAD_INITS, f"unknown --head-init '{self.head_init}'; choose {', '.join(HEAD_INITS)}"),
            (self.mixup >= 0 and self.cutmix >= 0, "--mixup and --cutmix are Beta-distribution alphas: >= 0"),
            (0 <= self.random_erasing <= 1, f"--random-erasing is a probability, got {self.random_erasing}"),
            (self.layer_decay is None or 0 < self.layer_decay <= 1, f"--layer-decay must be in (0, 1], got "
                                                                   f"{self.layer_decay}"),
            (self.head_lr_scale is None or self.head_lr_scale > 0, f"--head-lr-scale must be > 0, got "
                                                                  f"{self.head_lr_scale}"),
            (self.ema is None or 0 < self.ema < 1, f"--ema is a decay in (0, 1), e.g. 0.999, got {self.ema}"),
            (self.drop_path is None or 0 <= self.drop_path < 1, f"--drop-path must be in [0, 1), got {self.drop_path}"),
            (self.optimizer in OPTIMIZERS, f"unknown --optimizer '{self.optimizer}'; choose one of "
                                           f"{', '.join(OPTIMIZERS)}"),
            (self.device in DEVICES, f"unknown --device '{self.device}'; choose one of {', '.join(DEVICES)}"),
            (self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
            (self.name is None or bool(self.name.strip()), "--name is empty: give a directory name, or leave it out"),
            (self.name is None or "/" not in self.name and self.name not in (".", ".."),
             f"--name {self.name!r} must be a plain directory name (no '/'); choose --output-dir for the parent"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        if strategy.phased and self.head_init == "train" and self.epochs <= self.head_epochs:
            raise UserError(
                f"{strategy.name} trains the head for --head-epochs {self.head_epochs}, then everything: "
                f"--epochs must be larger than that, got {self.epochs}"
            )
        if strategy.from_scratch and (self.pretrained or self.weights):
            raise UserError(f"strategy '{strategy.name}' trains from random initialisation: drop "
                            f"--pretrained/--weights")
        if self.bn_frozen and strategy.from_scratch:
            raise UserError(f"--bn-frozen keeps pretrained BatchNorm statistics; strategy '{strategy.name}' has none "
                            f"to keep")
        for kind in self.trackers():
            if kind not in TRACKERS:
                raise UserError(f"--log: unknown tracker '{kind}'; choose from {', '.join(TRACKERS)} (comma-separated)."
                                f"{did_you_mean(kind, TRACKERS)}")
        if self.refit and (not strategy.trains or strategy.fits_features):
            raise UserError(f"--refit retrains for --epochs on train+val; strategy '{strategy.name}' has no epochs "
                            f"(logreg already refits on train+val once its penalty is chosen; knn and zero-shot train "
                            f"nothing): drop --refit")
        if self.head_init != "train" and not strategy.phased:
            raise UserError(f"--head-init {self.head_init} starts two-phase's fine-tuning from a fitted head; strategy "
                            f"'{strategy.name}' has no head phase")
        if (self.mixup or self.cutmix) and self.batch_size % 2:
            raise UserError(f"--mixup / --cutmix mix pairs of images: --batch-size must be even, got {self.batch_size}")
        if self.weights and self.pretrained:
            raise UserError("give either --pretrained (download) or --weights FILE (local), not both")
        if self.weights:
            path = Path(self.weights).expanduser()
            if not path.exists():
                raise UserError(f"--weights: no such file '{self.weights}'")
            if not path.is_file():
                raise UserError(f"--weights {self.weights} is a directory; give the state-dict file inside it "
                                f"(.pth/.pt)")

    def trackers(self) -> list[str]:
        return [k.strip() for k in (self.log or "").split(",") if k.strip()]

    def resolved(self) -> "RunConfig":
        """Fill every default that depends on other options, so config.json says what actually ran."""
        self.validate()
        c = dataclasses.replace(self)
        strategy = parse_strategy(c.strategy)
        if c.weights:
            c.weights = str(Path(c.weights).expanduser().resolve())
        c.dataset = canonical_dataset(c.dataset)  # so evaluate / export work from any directory later
        if c.pretrained is None:
            c.pretrained = not strategy.from_scratch and not c.weights and c.model != "simple_cnn"
        if not strategy.trains or strategy.fits_features:
            c.epochs = 0
        if strategy.fits_features:  # fitted on cached features of un-augmented images
            c.augment, c.feature_cache = "none", True
        if c.head_lr_scale is None:  # a new head trained beside pretrained layers learns at 10x (fastai, timm)
            c.head_lr_scale = 10.0 if strategy.lr_tier == "backbone" and strategy.trains else 1.0
        if c.lr is None:
            c.lr = DEFAULT_LR[c.optimizer][0 if strategy.lr_tier == "head" else 1]
        if c.bn_frozen is None:  # measured: frozen statistics won for every such strategy (README)
            c.bn_frozen = strategy.trains_backbone and bool(c.pretrained or c.weights)
        if c.weight_decay is None:
            c.weight_decay = {"sgd": 5e-4, "adam": 0.0}.get(c.optimizer, 0.05)
        if c.warmup_epochs is None:
            c.warmup_epochs = 1.0 if c.epochs >= 5 else 0.0
        if c.name is None:
            c.name = default_run_name(c)
        return c


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RunConfig))
NEUTRAL: frozenset[str] = frozenset(f.name for f in dataclasses.fields(RunConfig) if f.metadata["neutral"])
_HINTS = typing.get_type_hints(RunConfig)
_ALIASES = {f.name: f.metadata["bool_alias"] for f in dataclasses.fields(RunConfig) if f.metadata["bool_alias"]}


def flag(name: str) -> str:
    return name.replace("_", "-")


def field_type(name: str) -> tuple[type, bool]:
    """(the field's type, whether it may be None): `int | None` -> (int, True)."""
    hint = _HINTS[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = typing.get_args(hint)
        return next(a for a in args if a is not type(None)), type(None) in args
    return hint, False


def differences(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Options whose values change the result and differ between a recorded configuration and a new one.
    A value not decided yet (None in `new`) or not recorded (older files) is no difference."""
    saved = {k: _ALIASES[k][v] if k in _ALIASES and isinstance(v, bool) else v for k, v in saved.items()}
    return [k for k, v in new.items() if k not in NEUTRAL and v is not None and k in saved and saved[k] != v]


def slug(text: str, empty: str = "run") -> str:
    """text as a file-name component."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-") or empty


def default_run_name(c: RunConfig) -> str:
    model = c.model.split(":", 1)[-1]
    strategy = c.strategy.replace(":", "")
    return f"{slug(DatasetSpec.parse(c.dataset).short_name())}-{slug(model)}-{slug(strategy)}-s{c.seed}"
