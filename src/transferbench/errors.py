"""The one exception type the CLI turns into a clean message instead of a traceback."""
from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """Bad input or environment: the message says what was wrong, where, and how to fix it."""


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""
