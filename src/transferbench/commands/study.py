"""`transferbench study FILE.yaml`: plan, check and run a grid of runs (see `study` for the file format)."""
from __future__ import annotations

from ..study import load_study, plan_lines, run_study

HELP = "run every experiment of a study file (a grid of runs)"


def add_arguments(parser) -> None:
    parser.add_argument("file", metavar="FILE.yaml", help="the study file (see studies/ for examples)")
    parser.add_argument("--dry-run", action="store_true", help="print one line per planned run and run nothing")
    parser.add_argument("--output-dir", default="runs", help="runs go to OUTPUT_DIR/STUDY_NAME/ (default: runs)")
    parser.add_argument("--keep-going", action="store_true",
                        help="when a run fails, go on with the others (exit status 1)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def command(args) -> int:
    study = load_study(args.file, args.output_dir)
    if args.dry_run:
        print("\n".join(plan_lines(study)))
        return 0
    outcome = run_study(study, progress=args.progress, keep_going=args.keep_going)
    return 1 if outcome["failed"] else 0


INTERRUPTED = ("study interrupted; run the same command again to resume it (complete runs are skipped, the "
               "interrupted one continues from its last completed epoch)")
