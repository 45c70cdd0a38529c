"""The `transferbench` command: a thin layer over the Python API."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import types
import typing

from .config import OPTIMIZERS, DEVICES, RunConfig
from .errors import UserError

HELP = {
    "dataset": "cifar10, cifar100, or folder:PATH with PATH/train/<class>/* and PATH/test/<class>/*",
    "data_dir": "where CIFAR pickles live / are downloaded (default $TRANSFERBENCH_DATA or ~/.cache/transferbench/data)",
    "model": "simple_cnn, a torchvision or timm model name; tv:NAME / timm:NAME force one library",
    "pretrained": "load ImageNet weights the library's standard way (download + cache); default on except for scratch",
    "weights": "local state dict for the backbone (classifier keys are dropped, every other key must match)",
    "strategy": "zero-shot, linear-probe, full, last-n:K, two-phase or scratch",
    "head_epochs": "two-phase: epochs that train the head alone",
    "unfreeze_lr_scale": "two-phase: learning-rate scale once everything trains",
    "lr": "peak learning rate (default: by optimizer and strategy, recorded in config.json)",
    "weight_decay": "default 0.05 adamw, 5e-4 sgd, 0 adam; never on biases and norm parameters",
    "warmup_epochs": "linear warmup before the cosine decay, per phase (default 1 when epochs >= 5, else 0)",
    "image_size": "input resolution (default: the weights' own, e.g. 224)",
    "bn_frozen": "BatchNorm layers keep their pretrained running statistics while they train (small data, small batches)",
    "augment": "random crop with padding + horizontal flip, in batches on the device",
    "val_fraction": "stratified validation split carved from train, used for model selection",
    "train_subset": "train on a stratified subset of N images",
    "workers": "threads for decoding image folders",
    "amp": "mixed precision (CUDA only; never on CPU)",
    "compile": "torch.compile the model (rebuilt at each phase boundary)",
    "feature_cache": "linear-probe: train the head on cached backbone features (default when augmentation is off)",
    "output_dir": "parent of the run directory",
    "name": "run directory name (default <dataset>-<model>-<strategy>-s<seed>)",
}
SHORT = {"batch_size": ["-b"], "workers": ["-j"], "weight_decay": ["--wd"]}
CHOICES = {"optimizer": OPTIMIZERS, "device": DEVICES}
# Commands that live in their own module: each has add_arguments(parser) and command(args) -> exit code.
PLUGGED = {
    "study": ("transferbench.study", "run every experiment of a study file (a grid of runs)"),
    "report": ("transferbench.report", "tables and plots comparing every run under a directory"),
    "export": ("transferbench.export", "export a finished run to ONNX (optionally int8-quantized), verified"),
}


def _base_type(hint) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else hint


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field, so the CLI can never drift from the configuration it fills."""
    hints = typing.get_type_hints(RunConfig)
    for field in dataclasses.fields(RunConfig):
        flags = ["--" + field.name.replace("_", "-"), *SHORT.get(field.name, [])]
        kind = _base_type(hints[field.name])
        default_text = f" (default: {field.default})" if field.default is not None and kind is not bool else ""
        help_text = HELP.get(field.name, "") + default_text
        if kind is bool:
            parser.add_argument(*flags, dest=field.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(*flags, dest=field.name, type=kind, default=None, choices=CHOICES.get(field.name),
                                metavar=None if field.name in CHOICES else field.name.upper(), help=help_text)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    names = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transferbench", description="Benchmark transfer learning for image classification.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train and evaluate one experiment")
    add_run_options(p)
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last completed epoch")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory of the same name")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    p = sub.add_parser("evaluate", help="re-evaluate a finished run's test split from its model.pt")
    p.add_argument("run_dir")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--data-dir", default=None)

    for name, (module, help_text) in PLUGGED.items():
        p = sub.add_parser(name, help=help_text)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .training import tune_host_allocator

    tune_host_allocator()  # the CLI owns the process; see bench/allocator.py
    try:
        if args.command == "run":
            from .training import run

            run(config_from_args(args), resume=args.resume, overwrite=args.overwrite, progress=args.progress)
        elif args.command == "evaluate":
            from .training import evaluate_run

            result = evaluate_run(args.run_dir, device=args.device, data_dir=args.data_dir)
            print(json.dumps(result))
            if result["test_acc"] != result["recorded_test_acc"]:
                print(f"warning: test accuracy {result['test_acc']:.6f} differs from the recorded "
                      f"{result['recorded_test_acc']:.6f}", file=sys.stderr)
        else:
            return importlib.import_module(PLUGGED[args.command][0]).command(args)
    except UserError as err:
        print(f"transferbench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = "; `transferbench run ... --resume` continues from the last completed epoch" if args.command == "run" else ""
        print(f"transferbench: interrupted{hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
