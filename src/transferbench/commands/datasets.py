"""`transferbench datasets`: the catalog of one-word dataset names, with their classes, official split sizes,
the metric the literature reports, where they come from, and whether they are already in the data directory."""
from __future__ import annotations

import json
from pathlib import Path

from ..catalog import describe, present
from ..config import default_data_dir

HELP = "list the catalog datasets (--dataset NAME) and whether each is in the data directory"


def add_arguments(parser) -> None:
    parser.add_argument("--data-dir", default=None, help="where catalog datasets live (default $TRANSFERBENCH_DATA or "
                                                         "~/.cache/transferbench/data)")
    parser.add_argument("--json", action="store_true", help="one JSON object per dataset instead of a table")


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def rows(data_dir: Path) -> list[dict]:
    return [{**row, "present": present(row["name"], data_dir)} for row in describe()]


def command(args) -> int:
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    table = rows(data_dir)
    if args.json:
        for row in table:
            print(json.dumps({**row, "data_dir": str(data_dir)}))
        return 0
    head = ("name", "classes", "train", "val", "test", "metric", "present", "source")
    lines = [head] + [(r["name"], str(r["classes"]), _count(r["train"]), _count(r["val"]), _count(r["test"]),
                       r["metric"], "yes" if r["present"] else "no", r["url"]) for r in table]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    numeric = {1, 2, 3, 4}
    for line in lines:
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        print("  ".join(cells + [line[-1]]))
    there = sum(r["present"] for r in table)
    print(f"\n{there} of {len(table)} present in {data_dir} (--data-dir or TRANSFERBENCH_DATA); a missing one is "
          f"downloaded on first use where it can be. Use: transferbench run --dataset NAME ...")
    return 0
