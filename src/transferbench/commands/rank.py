"""`transferbench rank`: which backbone? Score candidate models for a dataset before fine-tuning any, with
transferability estimators (LogME, H-score) on their frozen features of the training split.

The features are the linear probe's, from the same cache: `transferbench run --strategy linear-probe
--no-augment` with the same --dataset, --model, --weights, --image-size, --train-subset, --val-fraction and
--seed reuses them (and vice versa). Prints a table best first; writes rank.json and rank.csv to --out.
A model that cannot be built, loaded or scored is a failed row with its error; the others still rank.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .. import rank as ranking
from .. import rundir
from ..config import RunConfig, field_type, flag
from ..errors import UserError

HELP = "rank candidate backbones for a dataset by transferability scores (LogME, H-score), before fine-tuning"
# RunConfig fields that decide which features are scored (or where and how fast they are computed).
OPTIONS = ("dataset", "data_dir", "pretrained", "image_size", "train_subset", "val_fraction", "test_fraction",
           "image_column", "label_column", "seed", "device", "batch_size", "workers")
# Where rank's help says more than run's: the same option, seen from the features it decides.
HELP_TEXT = {
    "dataset": "the target data: a catalog name (cifar10, ...) or folder:PATH, csv:FILE, hf:NAME, as for run",
    "pretrained": "models without --weights load the library's ImageNet weights (download + cache); default on",
    "seed": "the seed of the validation split, the training subset and a carved test split, as for run (default: 0)",
    "batch_size": "features are extracted in batches of twice this, as run's linear probe does (default: 128)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    parser.add_argument("--models", required=True, action="append", metavar="A,B,...",
                        help="the candidates, comma-separated (repeatable): any name `run --model` takes")
    parser.add_argument("--weights", action="append", metavar="MODEL=FILE",
                        help="a local state dict for one of --models (repeatable); models without one load their "
                             "pretrained weights the library's standard way (download), unless --no-pretrained")
    parser.add_argument("--estimators", default=",".join(ranking.DEFAULT_ESTIMATORS), metavar="E1,E2",
                        help="transferability estimators, comma-separated; the first sorts the table (default: "
                             f"{','.join(ranking.DEFAULT_ESTIMATORS)}; available: "
                             f"{', '.join(ranking.ESTIMATORS)})")
    for name in OPTIONS:
        f = fields[name]
        kind, _ = field_type(name)
        text = HELP_TEXT.get(name) or (f.metadata["help"] + (f" (default: {f.default})" if f.default is not None
                                                              and kind is not bool else ""))
        if name == "dataset":
            parser.add_argument("--dataset", required=True, help=text)
        elif kind is bool:
            parser.add_argument("--" + flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=text)
        else:
            parser.add_argument("--" + flag(name), *f.metadata["short"], dest=name, type=kind, default=None,
                                choices=f.metadata["choices"], metavar=None if f.metadata["choices"] else name.upper(),
                                help=text)
    parser.add_argument("--out", metavar="DIR",
                        help="where rank.json and rank.csv go (default: runs/rank-<dataset>-<YYYYmmdd-HHMMSS>)")
    parser.add_argument("--overwrite", action="store_true", help="replace rank.json / rank.csv already in --out")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def command(args: argparse.Namespace) -> int:
    base = RunConfig(**{k: getattr(args, k) for k in OPTIONS if getattr(args, k) is not None})
    models = ranking.parse_models(args.models)
    weights = ranking.parse_weights(args.weights, models)
    estimators = ranking.parse_estimators(args.estimators)
    out = Path(args.out).expanduser() if args.out else ranking.default_out_dir(base.dataset)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    existing = [p.name for p in (out / rundir.RANK_JSON, out / rundir.RANK_CSV) if p.exists()]
    if existing and not args.overwrite:
        raise UserError(f"--out {out} already holds {' and '.join(existing)}: pass --overwrite to replace them, or "
                        f"choose another --out")
    result = ranking.rank(base, models, weights=weights, estimators=estimators, progress=args.progress)
    json_path, csv_path = result.write(out)
    print(result.table())
    print(result.summary_line())
    print(f"wrote {json_path} and {csv_path}")
    if not result.ranked:
        print("transferbench: no model could be scored (see the errors above)")
        return 1
    return 0
