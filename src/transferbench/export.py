"""Placeholder until this command lands."""
from __future__ import annotations

from .errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("args", nargs="*")


def command(args) -> int:
    raise UserError("'export' is not implemented yet")
