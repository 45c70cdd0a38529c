"""The `transferbench` command: parses arguments, sets up logging, runs one subcommand (see `commands`),
and turns a UserError into one clear line and exit status 2."""
from __future__ import annotations

import argparse
import logging
import sys

from tqdm import tqdm

from . import distributed
from .commands import COMMANDS
from .errors import UserError
from .host import tune_host_allocator


class _Handler(logging.Handler):
    """Library messages for people: information on stdout, warnings on stderr as 'warning: ...'. Written
    through tqdm so a message never tears a progress bar; only rank 0 of a distributed run speaks."""

    def emit(self, record: logging.LogRecord) -> None:
        if not distributed.is_main() and record.levelno < logging.ERROR:
            return
        try:
            message = self.format(record)
            if record.levelno >= logging.WARNING:
                tqdm.write(f"warning: {message}", file=sys.stderr)
            else:
                tqdm.write(message, file=sys.stdout)
            (sys.stderr if record.levelno >= logging.WARNING else sys.stdout).flush()
        except Exception:
            self.handleError(record)


def setup_logging(verbosity: int) -> None:
    logger = logging.getLogger("transferbench")
    for handler in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(handler)
    logger.addHandler(_Handler())
    logger.setLevel({-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transferbench", description="Benchmark transfer learning for image "
                                                                       "classification.")
    parser.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, default=0,
                        help="only warnings and errors")
    parser.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1, help="debug messages too")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.__doc__))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbosity)
    tune_host_allocator()  # the CLI owns the process; see bench/allocator.py
    module = COMMANDS[args.command]
    try:
        return module.command(args)
    except UserError as err:
        print(f"transferbench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"transferbench: {getattr(module, 'INTERRUPTED', 'interrupted')}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
