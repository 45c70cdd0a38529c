"""Where a study's runs execute beyond one process: worker processes on this machine, or a SLURM job array.

Both rest on `study.run_study`, which claims each run before training it (see `claims`), so they mix freely with
each other and with plain `transferbench study` processes on one study directory.

Workers on one machine (`study FILE --workers N [--gpus 0,1,2,3]`)
    The parent starts N worker processes, ``python -m transferbench study FILE --worker-dir DIR --worker-id K`` with
    the same options, each pinned to its own GPU (``CUDA_VISIBLE_DEVICES``; round robin when there are more workers
    than GPUs) and given cores // N threads (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``). Each worker claims and trains
    runs until none is left and publishes its state in DIR/worker-K.json; the parent only shows them: one line per
    worker and the overall count, redrawn in place on a terminal, one line per event otherwise. A worker's own output
    goes to STUDY_DIR/logs/HOST-PID-workerK.log. When a run fails (without --keep-going) the parent tells the other
    workers to finish their current run and start no other; a worker that dies leaves a claim that goes stale, and
    a sibling still waiting for the study to finish takes its run over and resumes it.

A SLURM job array (`study FILE --executor slurm --partition gpu --time 4:00:00 ...`, needs submitit)
    One array task per run that is not complete (and not running elsewhere), each with --gpus-per-run GPUs. A task
    is a `RunTask`: it claims its run and trains it, resuming from checkpoint.pt if it was started. submitit sends
    SIGUSR2 before the time limit and on preemption; the task then returns itself from `checkpoint` and is requeued,
    and the next attempt resumes the run from its last completed epoch. With --gpus-per-run K > 1 the task has K
    processes, one per GPU, training the run with DDP (rank 0 claims). `--executor local` submits the same tasks to
    submitit's LocalExecutor, every task at once on this machine: a way to try the set-up, not to run a study.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import claims, distributed, rundir, training
from .errors import UserError
from .study import (
    Hooks,
    Overall,
    PlannedRun,
    Study,
    check_existing,
    format_duration,
    run_study,
    shard_runs,
    summarize,
    write_record,
)

log = logging.getLogger(__name__)

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
STOP_FILE = "STOP"
POLL_S = 0.5


# --------------------------------------------------------------------------------- workers on one machine

def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (indices, or UUIDs)."""
    import torch

    count = torch.cuda.device_count()
    if not count:
        return []
    listed = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


def worker_devices(workers: int | None, gpus: str | None) -> list[tuple[str, dict[str, str]]]:
    """(label, environment) per worker: its GPU (round robin over `gpus`, else the visible ones) and its threads,
    the usable cores split evenly (at least one each)."""
    if gpus is not None:
        ids = [g.strip() for g in gpus.split(",") if g.strip()]
        if not ids or not all(re.fullmatch(r"[A-Za-z0-9:-]+", g) for g in ids):
            raise UserError(f"--gpus {gpus!r}: give GPU indices separated by commas, e.g. --gpus 0,1,2,3")
    else:
        ids = visible_gpus()
    n = workers or len(ids) or 1
    if n < 1:
        raise UserError(f"--workers {n}: must be at least 1")
    cores = usable_cores()
    threads = max(1, cores // n)
    if not ids and n > cores:
        log.warning(f"{n} workers on {cores} CPU cores: each gets one thread, and they compete for the cores")
    if ids and n > len(ids):
        log.info(f"{n} workers share {len(ids)} GPU(s), round robin")
    out = []
    for k in range(n):
        env = dict.fromkeys(THREAD_VARS, str(threads))
        if ids:
            env["CUDA_VISIBLE_DEVICES"] = ids[k % len(ids)]
            label = f"gpu {ids[k % len(ids)]}"
        else:
            label = f"cpu x{threads}"
        out.append((label, env))
    return out


class WorkerHooks(Hooks):
    """A worker's side: its state in SESSION/worker-K.json (written atomically) for the parent to show, the parent's
    STOP file, and the runs its siblings failed (not retried here)."""

    def __init__(self, session: Path, worker_id: int):
        self.session = Path(session)
        self.path = self.session / f"worker-{worker_id}.json"
        self.state: dict[str, Any] = {"id": worker_id, "pid": os.getpid(), "state": "idle", "run": None, "done": [],
                                      "elsewhere": [], "failed": {}}
        self.update()

    def update(self, **state: Any) -> None:
        self.state.update(state)
        try:
            rundir.atomic_write_json(self.path, self.state)
        except UserError as err:  # the display is lost, not the run
            log.warning(f"cannot publish this worker's state: {err}")

    def stop(self) -> bool:
        return (self.session / STOP_FILE).exists()

    def failed_elsewhere(self) -> set[str]:
        failed: set[str] = set()
        for path in self.session.glob("worker-*.json"):
            if path != self.path:
                failed.update((claims.read_json_object(path) or {}).get("failed", {}))
        return failed


def worker_main(study: Study, session: str | Path, worker_id: int, *, keep_going: bool,
                shard: tuple[int, int] | None) -> int:
    """A worker process of `study --workers N`: run the study under claims, publishing its state."""
    hooks = WorkerHooks(Path(session), worker_id)
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        import torch

        torch.set_num_threads(int(threads))
    try:
        outcome = run_study(study, progress=False, keep_going=keep_going, shard=shard, hooks=hooks)
    except UserError as err:
        hooks.update(state="failed", run=None, error=str(err))
        raise
    except KeyboardInterrupt:
        hooks.update(state="interrupted", run=None)
        raise
    hooks.update(state="finished", run=None)
    return 1 if outcome["failed"] else 0


class _Board:
    """The parent's view: the overall count, then one line per worker. On a terminal the lines are redrawn in place;
    elsewhere (a log file, --no-progress) only the events are printed, one line each."""

    def __init__(self, overall: Overall, labels: list[str], live: bool):
        self.overall, self.labels = overall, labels
        self.lines = [tqdm(total=0, position=k + 1, leave=False, bar_format="{desc}", dynamic_ncols=True,
                           disable=not live) for k in range(len(labels))]
        self.text = [""] * len(labels)

    def show(self, k: int, text: str) -> None:
        if text != self.text[k]:
            self.text[k] = text
            self.lines[k].set_description_str(f"  worker {k} ({self.labels[k]}): {text}", refresh=True)

    def close(self) -> None:
        for line in self.lines:
            line.close()


def _worker_line(status: dict | None, proc: subprocess.Popen) -> str:
    rc = proc.poll()
    if rc is not None:
        if rc == 0:
            return f"finished ({len((status or {}).get('done', []))} run(s))"
        return f"exited with status {rc}"
    if not status:
        return "starting"
    if status.get("state") == "running" and status.get("run"):
        epochs = status.get("epochs") or 0
        epoch = f"  epoch {status.get('epoch', 0)}/{epochs}" if epochs else ""
        since = format_duration(time.time() - status["since"]) if status.get("since") else "?"
        return f"{status['run']}{epoch}  ({since})"
    if status.get("state") == "waiting":
        return f"waiting for {len(status.get('waiting', []))} run(s) held elsewhere"
    return "looking for the next run"


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def run_workers(study: Study, *, child_args: list[str], workers: int | None, gpus: str | None, progress: bool,
                keep_going: bool, shard: tuple[int, int] | None) -> dict[str, Any]:
    """Run the study with worker processes on this machine (see the module docstring); returns the outcome as
    `run_study` does. `child_args` are the `study` arguments every worker gets (file, --output-dir, ...)."""
    states = check_existing(study)
    write_record(study)
    runs = shard_runs(study.runs, shard)
    by_name = {r.name: r for r in runs}
    devices = worker_devices(workers, gpus)
    labels = [label for label, _ in devices]
    where = f" (shard {shard[0]}/{shard[1]}: {len(runs)} of {len(study.runs)} runs)" if shard else ""
    skipped = [r.name for r in runs if states[r.name] == "complete"]
    if skipped:
        log.info(f"study {study.name}{where}: {len(skipped)} of {len(runs)} runs already complete, skipped")
    logs = study.dir / "logs"
    rundir.writable_dir(logs, "the study's log directory")
    session = Path(tempfile.mkdtemp(prefix="transferbench-workers-"))
    host = socket.gethostname().split(".")[0]
    log_paths = [logs / f"{host}-{os.getpid()}-worker{k}.log" for k in range(len(devices))]
    log.info(f"study {study.name}{where}: {len(runs) - len(skipped)} runs to go on {len(devices)} workers "
             f"({', '.join(labels)}); their output: {logs}/{host}-{os.getpid()}-worker*.log")
    overall = Overall(study.name, runs, states, progress)
    board = _Board(overall, labels, progress and sys.stderr.isatty())
    procs: list[subprocess.Popen] = []
    previous_sigterm = None
    if hasattr(signal, "SIGTERM") and _in_main_thread():
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill` stops the workers too
    try:
        for k, (label, env) in enumerate(devices):
            cmd = [sys.executable, "-m", "transferbench", "study", *child_args, "--worker-dir", str(session),
                   "--worker-id", str(k)]
            with open(log_paths[k], "ab") as out:
                out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} worker {k} ({label}) of pid {os.getpid()}: "
                          f"{' '.join(cmd)}\n".encode())
                out.flush()
                procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                              env={**os.environ, **env}, start_new_session=True))
        outcome = _watch(study, by_name, procs, session, board, overall, labels, log_paths, keep_going)
    except KeyboardInterrupt:
        _interrupt(procs)
        raise
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        board.close()
        overall.close()
        shutil.rmtree(session, ignore_errors=True)
    failed, first_failure = outcome["failed"], outcome["first_failure"]
    if first_failure and not keep_going:
        name, err, k = first_failure
        raise UserError(f"study {study.name}: run '{name}' failed: {err}\n(worker {k}'s log: {log_paths[k]})\n"
                        f"Completed runs are kept: fix the problem and run the study again to continue (--keep-going "
                        f"runs the others first).")
    complete = [r.name for r in runs if r.state() == "complete"]
    missing = [r.name for r in runs if r.name not in complete and r.name not in failed]
    elapsed = time.perf_counter() - overall.start
    log.info(f"study {study.name}{where}: {len(complete)}/{len(runs)} runs complete ({len(skipped)} skipped, "
             f"{len(failed)} failed) in {format_duration(elapsed)} with {len(procs)} workers -> {study.dir}")
    if missing:
        codes = ", ".join(f"worker {k}: {p.returncode}" for k, p in enumerate(procs))
        raise UserError(f"study {study.name}: {len(missing)} run(s) not complete ({', '.join(missing[:3])}"
                        f"{', ...' if len(missing) > 3 else ''}) after every worker stopped (exit status {codes}); "
                        f"see {logs}/. Run the same command again to continue.")
    selections = summarize(study)
    return {"complete": len(complete), "skipped": skipped, "ran": outcome["ran"], "elsewhere": [], "failed": failed,
            "elapsed_s": elapsed, "selections": selections}


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _interrupt(procs: list[subprocess.Popen]) -> None:
    """Ctrl-C: each worker stops its run (resumable, its claim released); a second Ctrl-C kills them."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        p.send_signal(signal.SIGINT)
    try:
        for p in live:
            p.wait()
    except KeyboardInterrupt:
        for p in live:
            if p.poll() is None:
                p.kill()
        raise


def _watch(study: Study, by_name: dict[str, PlannedRun], procs: list[subprocess.Popen], session: Path, board: _Board,
           overall: Overall, labels: list[str], log_paths: list[Path], keep_going: bool) -> dict[str, Any]:
    """Poll the workers' state files until every worker has exited; log each event once."""
    name = study.name
    seen: list[dict] = [{} for _ in procs]
    exited: set[int] = set()
    counted: set[str] = set()
    failed: dict[str, str] = {}
    first_failure: tuple[str, str, int] | None = None
    ran: list[str] = []
    while True:
        running = [p.poll() is None for p in procs]
        statuses = [claims.read_json_object(session / f"worker-{k}.json") or {} for k in range(len(procs))]
        tags = [f"[study {name}] worker {k} ({labels[k]})" for k in range(len(procs))]
        for k, status in enumerate(statuses):  # runs trained: before any worker's "completed elsewhere"
            for run_name in status.get("done", []):
                if run_name not in counted and run_name in by_name:
                    counted.add(run_name)
                    ran.append(run_name)
                    overall.finished(by_name[run_name], completed=True)
                    last = status.get("last") or {}
                    acc = last.get("test_acc") if last.get("run") == run_name else None
                    acc_text = f", test acc {acc:.4f}" if isinstance(acc, (int, float)) else ""
                    log.info(f"{tags[k]}: {run_name} done{acc_text} ({overall.status()})")
            for run_name, err in status.get("failed", {}).items():
                if run_name not in failed:
                    failed[run_name] = err
                    if run_name in by_name:
                        overall.finished(by_name[run_name], completed=False)
                    log.warning(f"{tags[k]}: run {run_name} failed: {err}")
                    if first_failure is None:
                        first_failure = (run_name, err, k)
                    if not keep_going:
                        (session / STOP_FILE).touch()
        for k, (status, proc) in enumerate(zip(statuses, procs)):
            old = seen[k]
            for run_name in status.get("elsewhere", []):  # finished by a process outside this command
                if run_name not in counted and run_name in by_name:
                    counted.add(run_name)
                    overall.done_elsewhere(by_name[run_name])
            if status.get("run") and status.get("state") == "running" and (
                    status.get("run"), status.get("since")) != (old.get("run"), old.get("since")):
                epoch = status.get("resumed_at") or 0
                how = f"resuming {status['run']} after epoch {epoch}" if epoch else f"starting {status['run']}"
                log.info(f"{tags[k]}: {how}")
            if status.get("state") == "waiting" and old.get("state") != "waiting":
                log.info(f"{tags[k]}: waiting for {len(status.get('waiting', []))} run(s) other workers hold")
            seen[k] = status
            if not running[k] and k not in exited:
                exited.add(k)
                rc = proc.returncode
                if rc == 0:
                    log.info(f"{tags[k]}: finished ({len(status.get('done', []))} run(s))")
                elif not status.get("failed"):
                    detail = status.get("error") or _last_line(log_paths[k])
                    log.warning(f"{tags[k]}: exited with status {rc} ({detail}); see {log_paths[k]}. A run it held is "
                                f"taken over by a worker still running once its claim goes stale")
            board.show(k, _worker_line(status, proc))
        overall.refresh()
        if not any(running):
            return {"failed": failed, "first_failure": first_failure, "ran": ran}
        time.sleep(POLL_S)


# --------------------------------------------------------------------------------------------- SLURM

@dataclass
class SlurmOptions:
    """What `study --executor slurm` asks SLURM for, per array task (= per run)."""
    partition: str | None = None
    time: str | None = None  # SLURM's format: MINUTES, H:MM:SS, D-HH[:MM[:SS]]
    account: str | None = None
    gpus_per_run: int = 1
    cpus_per_run: int | None = None
    mem: str | None = None  # per run, SLURM's --mem (e.g. 32G)
    array_parallelism: int | None = None  # at most this many tasks at once
    extra: dict[str, str] = field(default_factory=dict)  # any other sbatch option: qos=high, constraint=a100


def parse_time(text: str) -> int:
    """SLURM's --time formats -> whole minutes (rounded up)."""
    text = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m or not text:
        raise UserError(f"--time {text!r}: give minutes or SLURM's format (e.g. 90, 4:00:00, 1-12:00:00)")
    days, a, b, c = m.groups()
    days = int(days or 0)
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = int(a), int(b or 0), int(c or 0)
    elif c is not None:  # HH:MM:SS
        hours, minutes, seconds = int(a), int(b), int(c)
    elif b is not None:  # MM:SS
        hours, minutes, seconds = 0, int(a), int(b)
    else:  # MM
        hours, minutes, seconds = 0, int(a), 0
    total = days * 1440 + hours * 60 + minutes + (1 if seconds else 0)
    if total < 1:
        raise UserError(f"--time {text!r}: must be at least one minute")
    return total


def parse_extra(items: list[str] | None) -> dict[str, str]:
    """--slurm-option KEY=VALUE (repeated) -> {KEY: VALUE}, for sbatch options without their own flag."""
    extra = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not re.fullmatch(r"[a-z][a-z0-9_-]*", key):
            raise UserError(f"--slurm-option {item!r}: expected KEY=VALUE, an sbatch option without its dashes "
                            f"(e.g. --slurm-option qos=high --slurm-option constraint=a100)")
        extra[key.replace("-", "_")] = value
    return extra


def slurm_parameters(study_name: str, opts: SlurmOptions) -> dict[str, Any]:
    """submitit SlurmExecutor parameters: one node per task, one process per GPU (DDP when there are several)."""
    if opts.time is None:
        raise UserError("--executor slurm needs --time (e.g. --time 4:00:00): the job's limit, which also tells a "
                        "time-out (requeued at most 3 times) from a preemption (always requeued)")
    if opts.gpus_per_run < 0:
        raise UserError(f"--gpus-per-run {opts.gpus_per_run}: must be 0 (CPU only) or more")
    procs = max(1, opts.gpus_per_run)
    params: dict[str, Any] = {"job_name": f"transferbench-{study_name}", "nodes": 1, "ntasks_per_node": procs,
                              "time": parse_time(opts.time)}
    if opts.gpus_per_run:
        params["gpus_per_node"] = opts.gpus_per_run
    if opts.cpus_per_run:
        if opts.cpus_per_run < procs:
            raise UserError(f"--cpus-per-run {opts.cpus_per_run}: at least one per GPU ({procs})")
        params["cpus_per_task"] = opts.cpus_per_run // procs
    for key, value in (("partition", opts.partition), ("account", opts.account), ("mem", opts.mem)):
        if value:
            params[key] = value
    if opts.array_parallelism is not None:
        if opts.array_parallelism < 1:
            raise UserError(f"--slurm-array-parallelism {opts.array_parallelism}: must be at least 1")
        params["array_parallelism"] = opts.array_parallelism
    if opts.extra:
        params["additional_parameters"] = dict(opts.extra)
    return params


class RunTask:
    """One array task: claim one run of the study, train it (resuming it if it was started), return its outcome.

    submitit calls `checkpoint` on preemption or shortly before the time limit; returning this same task requeues
    it, and the next attempt resumes the run from checkpoint.pt (its last completed epoch)."""

    def __init__(self, study: Study, run_name: str, cwd: str, env: dict[str, str]):
        self.study, self.run_name, self.cwd, self.env = study, run_name, cwd, env

    def __repr__(self) -> str:
        return f"RunTask({self.study.name}/{self.run_name})"

    def __call__(self) -> dict[str, Any]:
        os.chdir(self.cwd)  # the study's relative paths (output dir, folder: datasets, weights) as at submission
        os.environ.update(self.env)
        _log_to_stdout()
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus and cpus.isdigit():
            import torch

            torch.set_num_threads(int(cpus))
        ranks = _ddp_setup(self.study, self.run_name)
        if not distributed.is_main():
            _follow(self.study, self.run_name)
            return {"run": self.run_name, "rank": distributed.rank()}
        hooks = _LeaderHooks() if ranks > 1 else Hooks()
        try:
            outcome = run_study(self.study, progress=False, only=[self.run_name], hooks=hooks)
        finally:
            if ranks > 1:
                distributed.broadcast_object("end")
        run = next(r for r in self.study.runs if r.name == self.run_name)
        summary = rundir.read_json(run.dir / rundir.SUMMARY) if run.state() == "complete" else {}
        return {"run": self.run_name, "trained_here": self.run_name in outcome["ran"],
                "test_acc": summary.get("test_acc"), "dir": str(run.dir)}

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Requeue this same task: training.run(resume=True) continues the run from its checkpoint."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def _log_to_stdout() -> None:
    """In a task, the package's messages go to stdout, which submitit keeps in the task's log file."""
    logger = logging.getLogger("transferbench")
    if not any(getattr(h, "_transferbench_task", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler._transferbench_task = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _ddp_setup(study: Study, run_name: str) -> int:
    """With several tasks in the job (--gpus-per-run K > 1): the torch.distributed environment, one rank per GPU."""
    import submitit

    ranks = submitit.JobEnvironment().num_tasks
    if ranks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        run = next(r for r in study.runs if r.name == run_name)
        distributed.setup(run.config.device)
    return ranks


class _LeaderHooks(Hooks):
    """Rank 0 claims; the other ranks train with it when it says so."""

    def before_training(self, run: PlannedRun) -> None:
        distributed.broadcast_object("train")


def _follow(study: Study, run_name: str) -> None:
    run = next(r for r in study.runs if r.name == run_name)
    while distributed.broadcast_object(None) == "train":
        training.run(run.config, resume=True, progress=False, tags={"study": study.name})


@dataclass
class Submission:
    jobs: list  # submitit jobs, one per run
    runs: list[str]  # the runs submitted, in job order
    running: list[str]  # runs not submitted because a live worker holds them
    complete: int  # runs already complete
    folder: Path  # submitit's folder: the tasks' logs and pickles


def submit(study: Study, *, executor: str = "slurm", options: SlurmOptions | None = None,
           shard: tuple[int, int] | None = None) -> Submission:
    """Submit every run of the study (or of shard K/N) that is not complete and not held by a live worker, as one
    job array (executor 'slurm') or as local processes (executor 'local', submitit's LocalExecutor)."""
    try:
        import submitit
    except ImportError:
        raise UserError(f"--executor {executor} needs submitit: pip install 'transferbench[slurm]'") from None
    options = options or SlurmOptions()
    params = slurm_parameters(study.name, options) if executor == "slurm" else None
    states = check_existing(study)
    write_record(study)
    stale_s, heartbeat_s = claims.intervals()
    todo, running, complete = [], [], 0
    for run in shard_runs(study.runs, shard):
        if states[run.name] == "complete":
            complete += 1
            continue
        info = claims.claim_state(run.dir, stale_s)
        (running if info is not None and not info["stale"] else todo).append(run)
    folder = study.dir / "slurm"
    if not todo:
        return Submission([], [], [r.name for r in running], complete, folder)
    if executor == "slurm":
        try:
            ex = submitit.SlurmExecutor(folder=folder)
        except RuntimeError as err:
            raise UserError(f"--executor slurm: {err} (submit from a machine of the cluster)") from None
        ex.update_parameters(**params)
    elif executor == "local":
        ex = submitit.LocalExecutor(folder=folder)
        minutes = parse_time(options.time) if options.time else 7 * 24 * 60
        gpus = options.gpus_per_run if visible_gpus() else 0
        ex.update_parameters(timeout_min=minutes, gpus_per_node=gpus, tasks_per_node=max(1, gpus))
    else:
        raise UserError(f"--executor {executor!r}: choose slurm or local")
    env = {claims.STALE_ENV: repr(stale_s), claims.HEARTBEAT_ENV: repr(heartbeat_s)}  # every task judges alike
    cwd = os.getcwd()
    with ex.batch():
        jobs = [ex.submit(RunTask(study, run.name, cwd, env)) for run in todo]
    return Submission(jobs, [r.name for r in todo], [r.name for r in running], complete, folder)
