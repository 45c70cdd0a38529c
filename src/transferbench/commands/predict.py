"""`transferbench predict RUN_DIR PATH...`: top-k classes with probabilities for images, folders or globs."""
from __future__ import annotations

import csv
import io
import sys

from .. import rundir
from ..config import DEVICES
from ..predict import predict_images

HELP = "classify images with a finished run's model (its own preprocessing)"


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory (with model.pt)")
    parser.add_argument("paths", metavar="PATH", nargs="+", help="image files, folders (recursively) or globs")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default: 5)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--out", metavar="FILE.csv", default=None, help="write the CSV here instead of stdout")


def command(args) -> int:
    rows = predict_images(args.run_dir, args.paths, top_k=args.top_k, batch_size=args.batch_size, device=args.device)
    k = max((len(r.classes) for r in rows), default=0)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", *[f"{name}{i}" for i in range(1, k + 1) for name in ("class", "prob")], "error"])
    for r in rows:
        cells = [c for pair in zip(r.classes, (f"{p:.6f}" for p in r.probs)) for c in pair]
        writer.writerow([r.path, *cells, *[""] * (2 * k - len(cells)), r.error or ""])
    if args.out:
        rundir.atomic_write_text(args.out, buf.getvalue())
    else:
        sys.stdout.write(buf.getvalue())
    failed = sum(r.error is not None for r in rows)
    if failed:
        print(f"transferbench: {failed} of {len(rows)} images could not be read (see the error column)",
              file=sys.stderr)
    return 1 if failed == len(rows) else 0
