"""`transferbench run`: one experiment. One flag per `RunConfig` field, so the CLI never drifts from the
configuration it fills."""
from __future__ import annotations

import argparse
import dataclasses

from .. import training
from ..config import FIELDS, RunConfig, field_type, flag

HELP = "train and evaluate one experiment"
INTERRUPTED = "interrupted; `transferbench run ... --resume` continues from the last completed epoch"


def add_config_options(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(RunConfig):
        kind, _ = field_type(f.name)
        meta = f.metadata
        flags = ["--" + flag(f.name), *meta["short"]]
        default_text = f" (default: {f.default})" if f.default is not None and kind is not bool else ""
        help_text = meta["help"] + default_text
        if kind is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        elif meta["bool_alias"]:  # --augment [POLICY] and --no-augment
            off, on = meta["bool_alias"]
            parser.add_argument(*flags, dest=f.name, nargs="?", const=on, default=None, choices=meta["choices"],
                                help=help_text + f" (bare {flags[0]}: {on})")
            parser.add_argument("--no-" + flag(f.name), dest=f.name, action="store_const", const=off,
                                help=f"{flags[0]} {off}")
        else:
            parser.add_argument(*flags, dest=f.name, type=kind, default=None, choices=meta["choices"],
                                metavar=None if meta["choices"] else f.name.upper(), help=help_text)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return RunConfig(**{k: v for k, v in vars(args).items() if k in FIELDS and v is not None})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser)
    parser.add_argument("--resume", action="store_true", help="continue a killed run from its last completed epoch")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run directory of the same name")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def command(args: argparse.Namespace) -> int:
    training.run(config_from_args(args), resume=args.resume, overwrite=args.overwrite, progress=args.progress)
    return 0
