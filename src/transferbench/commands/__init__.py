"""The subcommands of `transferbench`: each a module with HELP, add_arguments(parser) and command(args) -> exit
status, thin over the library. A new command is a module here and a line in COMMANDS."""
from __future__ import annotations

from . import datasets, evaluate, export, predict, rank, report, run, study

COMMANDS = {"run": run, "evaluate": evaluate, "study": study, "report": report, "export": export, "predict": predict,
            "datasets": datasets, "rank": rank}
