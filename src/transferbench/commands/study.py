"""`transferbench study FILE.yaml`: plan, check and run a grid of runs (see `study` for the file format).

One process by default; `--workers N` (or `--gpus 0,1,2,3`) runs N runs at once on this machine, `--shard K/N` runs
the K-th of N slices (K from 0, for scheduler job arrays), `--executor slurm` submits a SLURM job array. Any of these
may share one study directory at once, on any number of machines: every run is claimed before it starts, so none
is trained twice, and a run whose worker died is taken over and resumed. `--status` shows where every run stands.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging

from ..errors import UserError
from ..study import load_study, parse_shard, plan_lines, run_study, status_lines

HELP = "run every experiment of a study file (a grid of runs)"
log = logging.getLogger(__name__)

SLURM_FLAGS = ("partition", "time", "account", "cpus_per_run", "mem", "slurm_array_parallelism", "slurm_option")


def add_arguments(parser) -> None:
    parser.add_argument("file", metavar="FILE.yaml", help="the study file (see studies/ for examples)")
    parser.add_argument("--dry-run", action="store_true", help="print one line per planned run and run nothing")
    parser.add_argument("--status", action="store_true",
                        help="show every run as done, running (where, since when), stale or pending, and run nothing")
    parser.add_argument("--output-dir", default="runs", help="runs go to OUTPUT_DIR/STUDY_NAME/ (default: runs)")
    parser.add_argument("--keep-going", action="store_true",
                        help="when a run fails, go on with the others (exit status 1)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--log", metavar="KINDS",
                        help="experiment trackers for every run, comma-separated: tensorboard, mlflow (none: no "
                             "tracker); never makes a finished run differ")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="run N runs at once on this machine, each in its own process on its own GPU (or on CPU "
                             "with cores // N threads each)")
    parser.add_argument("--gpus", metavar="LIST",
                        help="the GPUs the workers use, e.g. 0,1,2,3 (default: every visible one); --workers defaults "
                             "to one per GPU")
    parser.add_argument("--shard", metavar="K/N",
                        help="run only the K-th of N slices of the grid (runs K, K+N, ...), K from 0: "
                             "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --array=0-(N-1)")
    parser.add_argument("--executor", choices=("slurm", "local"),
                        help="submit the runs instead of running them: slurm (a job array, one task per run; needs "
                             "transferbench[slurm]) or local (submitit's local executor: to try the set-up)")
    slurm = parser.add_argument_group("with --executor slurm")
    slurm.add_argument("--partition", help="SLURM partition")
    slurm.add_argument("--time", help="time limit per run: minutes or [D-]HH:MM:SS (required); a run that needs "
                                      "longer is requeued and resumes from its checkpoint")
    slurm.add_argument("--account", help="SLURM account to charge")
    slurm.add_argument("--gpus-per-run", type=int, default=None, metavar="K",
                       help="GPUs per run (default 1; K > 1 trains with DDP, one process per GPU; 0: CPU only)")
    slurm.add_argument("--cpus-per-run", type=int, metavar="C", help="CPU cores per run")
    slurm.add_argument("--mem", help="memory per run, SLURM's format (e.g. 64G)")
    slurm.add_argument("--slurm-array-parallelism", type=int, metavar="M", help="at most M runs at once")
    slurm.add_argument("--slurm-option", action="append", metavar="KEY=VALUE",
                       help="any other sbatch option, e.g. qos=high or constraint=a100 (repeatable)")
    # A worker of --workers N: the parent passes these (see executors).
    parser.add_argument("--worker-dir", help=argparse.SUPPRESS)
    parser.add_argument("--worker-id", type=int, default=0, help=argparse.SUPPRESS)


def _check_flags(args) -> None:
    given = [f for f in SLURM_FLAGS if getattr(args, f) is not None]
    if args.gpus_per_run is not None:
        given.append("gpus_per_run")
    if given and not args.executor:
        raise UserError(f"--{given[0].replace('_', '-')} applies to --executor slurm only")
    if args.executor and (args.workers is not None or args.gpus is not None):
        raise UserError("--workers/--gpus run on this machine, --executor submits to a scheduler: choose one")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be at least 1")


def _with_trackers(study, kinds: str) -> None:
    """--log: every run reports to these trackers (a neutral option: finished runs are still 'the same')."""
    from .. import trackers

    value = None if kinds.strip().lower() in ("", "none") else kinds
    for run in study.runs:
        run.config = dataclasses.replace(run.config, log=value)
        run.config.validate()  # unknown tracker names
    for kind in study.runs[0].config.trackers() if study.runs else []:
        trackers._require(kind)  # installed? Checked once here rather than at every run's start


def _child_args(args) -> list[str]:
    """What every worker of --workers N is told: the same study, directory and options."""
    out = [args.file, "--output-dir", args.output_dir, "--no-progress"]
    if args.keep_going:
        out.append("--keep-going")
    if args.shard:
        out += ["--shard", args.shard]
    if args.log is not None:
        out += ["--log", args.log]
    return out


def command(args) -> int:
    _check_flags(args)
    shard = parse_shard(args.shard) if args.shard else None
    study = load_study(args.file, args.output_dir)
    if args.log is not None:
        _with_trackers(study, args.log)
    if args.status:
        print("\n".join(status_lines(study, shard)))
        return 0
    if args.dry_run:
        print("\n".join(plan_lines(study, shard)))
        return 0
    if args.worker_dir:
        from ..executors import worker_main

        return worker_main(study, args.worker_dir, args.worker_id, keep_going=args.keep_going, shard=shard)
    if args.executor:
        return _submit(study, args, shard)
    if args.workers not in (None, 1) or args.gpus is not None:
        from ..executors import run_workers

        outcome = run_workers(study, child_args=_child_args(args), workers=args.workers, gpus=args.gpus,
                              progress=args.progress, keep_going=args.keep_going, shard=shard)
    else:
        outcome = run_study(study, progress=args.progress, keep_going=args.keep_going, shard=shard)
    return 1 if outcome["failed"] else 0


def _submit(study, args, shard) -> int:
    from ..executors import SlurmOptions, parse_extra, submit

    options = SlurmOptions(partition=args.partition, time=args.time, account=args.account,
                           gpus_per_run=1 if args.gpus_per_run is None else args.gpus_per_run,
                           cpus_per_run=args.cpus_per_run, mem=args.mem,
                           array_parallelism=args.slurm_array_parallelism, extra=parse_extra(args.slurm_option))
    sub = submit(study, executor=args.executor, options=options, shard=shard)
    running = f"; {len(sub.running)} running elsewhere, not submitted" if sub.running else ""
    if not sub.jobs:
        print(f"study {study.name}: nothing to submit ({sub.complete} complete{running})")
        return 0
    first = sub.jobs[0].job_id
    array = first.split("_")[0] if "_" in str(first) else first
    print(f"study {study.name}: submitted {len(sub.jobs)} run(s) ({sub.complete} already complete{running}) "
          f"as {'job array ' + str(array) if args.executor == 'slurm' else 'local jobs'}; task logs in {sub.folder}/")
    print(f"where they stand: transferbench study {args.file} --output-dir {args.output_dir} --status")
    if args.executor == "slurm":
        return 0
    failed = 0
    for name, job in zip(sub.runs, sub.jobs):  # local: wait, so the jobs finish before this command returns
        try:
            result = job.result()
            acc = result.get("test_acc")
            print(f"  {name}: " + (f"test acc {acc:.4f}" if isinstance(acc, (int, float)) else "done"))
        except Exception as err:
            failed += 1
            print(f"  {name}: failed: {str(err).strip().splitlines()[-1] if str(err).strip() else err}")
    return 1 if failed else 0


INTERRUPTED = ("study interrupted; run the same command again to resume it (complete runs are skipped, the "
               "interrupted one continues from its last completed epoch)")
