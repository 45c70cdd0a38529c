"""`transferbench report DIR`: results.csv, report.md and report.html for every run under DIR (see `report`)."""
from __future__ import annotations

from ..errors import UserError
from ..report import write_report

HELP = "tables and plots comparing every run under a directory"


def _label_option(text: str) -> tuple[str, str]:
    spec, sep, label = text.rpartition("=")
    if not sep or not spec or not label.strip():
        raise UserError(f"--dataset-label: expected DATASET=LABEL (e.g. folder:data/c10=\"CIFAR-10 (JPEG copy)\"), "
                        f"got {text!r}")
    return spec, label.strip()


def add_arguments(parser) -> None:
    parser.add_argument("dir", metavar="DIR", help="directory holding run directories, at any depth (e.g. runs)")
    parser.add_argument("--out", metavar="DIR", default=None, help="where to write results.csv, report.md and "
                        "report.html (default: DIR)")
    parser.add_argument("--dataset-label", metavar="DATASET=LABEL", action="append", default=[],
                        help="how to name a dataset in the report, e.g. folder:../data/c10=\"CIFAR-10 (JPEG copy)\" "
                             "(default: a study's dataset_labels, CIFAR-10 / CIFAR-100, or the folder's name)")


def command(args) -> int:
    labels = dict(_label_option(t) for t in args.dataset_label)
    result = write_report(args.dir, args.out, labels=labels)
    for sel in result["selections"]:
        print(sel["text"])
    out = result["out"]
    print(f"report: {result['runs']} runs ({result['studies']} studies, {result['plots']} plots"
          + (f", {result['unfinished']} unfinished runs not shown" if result["unfinished"] else "")
          + f") -> {out / 'report.html'}, {out / 'report.md'}, {out / 'results.csv'}")
    return 0
