"""Studies beyond one process: worker processes, independent processes sharing a study directory, a SIGKILLed
worker's run taken over and resumed, submitit job arrays (local executor, and the sbatch file SLURM would get),
shards, `--status`, and `--log tensorboard`.

Subprocesses are watched through a sitecustomize module put on their PYTHONPATH (HOOK): it appends every
training.run call to a ledger file, can hold every process at a barrier at its first run (so they really run at
once), and can hang one run after an epoch (so the test can kill or preempt it there)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from transferbench import claims, training
from transferbench.study import load_study

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = """\
options:
  dataset: folder:{folder}
  model: simple_cnn
  strategy: scratch
  image_size: 8
  batch_size: 8
  workers: 1
  val_fraction: 0.25
  epochs: {epochs}
grid:
  seed: {seeds}
"""

HOOK = r'''
import importlib.abc, importlib.util, json, os, sys, time


class _Patch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "transferbench.training":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


def _patch(training):
    real_run, real_after = training.run, training.after_epoch
    current = {}

    def run(cfg, **kw):
        current["name"] = cfg.name
        resumed = os.path.exists(os.path.join(cfg.output_dir, cfg.name, "checkpoint.pt"))
        with open(os.environ["TB_LEDGER"], "a") as f:
            f.write(json.dumps({"run": cfg.name, "pid": os.getpid(), "resumed": resumed}) + "\n")
        barrier = os.environ.get("TB_BARRIER")
        if barrier and not current.get("waited"):
            current["waited"] = True
            open(os.path.join(barrier, str(os.getpid())), "w").close()
            deadline = time.time() + 90
            while len(os.listdir(barrier)) < int(os.environ["TB_BARRIER_N"]) and time.time() < deadline:
                time.sleep(0.05)
        return real_run(cfg, **kw)

    def after_epoch(epoch):
        real_after(epoch)
        marker = os.environ.get("TB_HANG_MARKER")
        if marker and current.get("name") == os.environ["TB_HANG_RUN"] and epoch == int(os.environ["TB_HANG_EPOCH"]):
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return  # hang once only: a resumed attempt goes on
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            while True:
                time.sleep(0.05)

    training.run, training.after_epoch = run, after_epoch


if os.environ.get("TB_LEDGER"):
    sys.meta_path.insert(0, _Patch())
'''


class Hooked:
    """The environment subprocesses inherit: the hook on PYTHONPATH, one thread each, a ledger of their runs."""

    def __init__(self, tmp_path: Path, monkeypatch):
        hook_dir = tmp_path / "hook"
        hook_dir.mkdir()
        (hook_dir / "sitecustomize.py").write_text(HOOK)
        self.tmp, self.monkeypatch = tmp_path, monkeypatch
        self.ledger_path = tmp_path / "ledger.jsonl"
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook_dir), os.environ.get("PYTHONPATH", "")]))
        monkeypatch.setenv("TB_LEDGER", str(self.ledger_path))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            monkeypatch.setenv(var, "1")

    def barrier(self, n: int) -> None:
        (self.tmp / "barrier").mkdir()
        self.monkeypatch.setenv("TB_BARRIER", str(self.tmp / "barrier"))
        self.monkeypatch.setenv("TB_BARRIER_N", str(n))

    def hang(self, run: str, epoch: int) -> Path:
        marker = self.tmp / "hanging"
        self.monkeypatch.setenv("TB_HANG_RUN", run)
        self.monkeypatch.setenv("TB_HANG_EPOCH", str(epoch))
        self.monkeypatch.setenv("TB_HANG_MARKER", str(marker))
        return marker

    def ledger(self) -> list[dict]:
        if not self.ledger_path.exists():
            return []
        return [json.loads(line) for line in self.ledger_path.read_text().splitlines()]


@pytest.fixture
def hooked(tmp_path, monkeypatch):
    return Hooked(tmp_path, monkeypatch)


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("nothing may run here")
    monkeypatch.setattr(training, "run", refuse)


def study_file(tmp_path, folder, seeds, epochs=1, name="s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(TINY.format(folder=folder, seeds=list(seeds), epochs=epochs))
    return path


def names(seeds) -> list[str]:
    return [f"imgs-simple_cnn-scratch-s{s}" for s in seeds]


def wait_for(path: Path, seconds: float = 150) -> str:
    deadline = time.time() + seconds
    while not path.exists() or not path.read_text():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.1)
    return path.read_text()


def read(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [{k: v for k, v in json.loads(line).items() if k not in ("epoch_time_s", "images_per_s")}
               for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, metrics


def same_as_uninterrupted(path, run_dir, tmp_path, run=training.run) -> None:
    """The run's metrics (without times) and results equal those of the same run trained in one go."""
    straight = next(r for r in load_study(path, tmp_path / "straight").runs if r.name == run_dir.name)
    run(straight.config, progress=False)
    a, ma = read(run_dir)
    b, mb = read(straight.dir)
    assert ma == mb and a["test_acc"] == b["test_acc"] and a["best_val_acc"] == b["best_val_acc"]


def assert_complete_and_released(study_dir: Path, run_names) -> None:
    for name in run_names:
        assert (study_dir / name / "summary.json").exists(), name
        assert not (study_dir / name / claims.CLAIM_FILE).exists(), name


# ------------------------------------------------------------------------------------------------ workers

def test_workers_run_each_run_exactly_once(folder, tmp_path, hooked, cli_run):
    path = study_file(tmp_path, folder, range(6))
    hooked.barrier(3)  # all three workers hold a run at once before any trains
    code, out, err = cli_run("study", path, "--output-dir", tmp_path / "runs", "--workers", 3, "--no-progress")
    assert code == 0, out + err
    ledger = hooked.ledger()
    assert sorted(r["run"] for r in ledger) == sorted(names(range(6)))  # each run once, none twice
    assert len({r["pid"] for r in ledger}) == 3
    assert_complete_and_released(tmp_path / "runs" / "s", names(range(6)))
    assert "worker 2 (cpu x1)" in out and "6/6 runs complete (0 skipped, 0 failed)" in out
    assert re.search(r"worker \d \(cpu x1\): imgs-simple_cnn-scratch-s\d done, test acc", out)
    logs = sorted((tmp_path / "runs" / "s" / "logs").glob("*-worker*.log"))
    assert len(logs) == 3 and all("starting imgs-simple_cnn-scratch" in p.read_text() for p in logs)


def test_independent_processes_share_one_study_directory(folder, tmp_path, hooked, cli_run, monkeypatch):
    """As three machines would: three `study` commands on one directory at once (two subprocesses and this one)."""
    path = study_file(tmp_path, folder, range(6))
    hooked.barrier(3)
    cmd = [sys.executable, "-m", "transferbench", "study", str(path), "--output-dir", str(tmp_path / "runs"),
           "--no-progress"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        real_run, waited = training.run, []

        def run_here(cfg, **kw):  # what HOOK does in the subprocesses: the ledger, and the barrier once
            with open(hooked.ledger_path, "a") as f:
                f.write(json.dumps({"run": cfg.name, "pid": os.getpid()}) + "\n")
            if not waited:
                waited.append(True)
                (tmp_path / "barrier" / str(os.getpid())).touch()
                deadline = time.time() + 120
                while len(list((tmp_path / "barrier").iterdir())) < 3 and time.time() < deadline:
                    time.sleep(0.05)
            return real_run(cfg, **kw)

        monkeypatch.setattr(training, "run", run_here)
        code, out, err = cli_run("study", path, "--output-dir", tmp_path / "runs", "--no-progress")
    finally:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    assert code == 0 and [p.returncode for p in procs] == [0, 0], (out, err, outs)
    ledger = hooked.ledger()
    assert sorted(r["run"] for r in ledger) == sorted(names(range(6)))  # each run once, none twice
    assert len({r["pid"] for r in ledger}) == 3
    assert_complete_and_released(tmp_path / "runs" / "s", names(range(6)))
    assert sum("finished by other workers" in o or "completed by another worker" in o for o in [out, *outs]) >= 1


def test_sigkilled_worker_goes_stale_and_its_run_is_resumed_elsewhere(folder, tmp_path, hooked, cli_run,
                                                                       monkeypatch):
    path = study_file(tmp_path, folder, [0], epochs=2)
    out_dir, name = tmp_path / "runs", names([0])[0]
    run_dir = out_dir / "s" / name
    monkeypatch.setenv(claims.STALE_ENV, "2")  # heartbeat every 0.5 s; silent for 2 s = dead
    marker = hooked.hang(name, epoch=1)
    victim = subprocess.Popen([sys.executable, "-m", "transferbench", "study", str(path), "--output-dir",
                               str(out_dir), "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pid = int(wait_for(marker))
        assert pid == victim.pid
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    assert (run_dir / claims.CLAIM_FILE).exists() and (run_dir / "checkpoint.pt").exists()
    assert not (run_dir / "summary.json").exists()

    started, epochs = [], []
    real_run = training.run
    monkeypatch.setattr(training, "run", lambda cfg, **kw: started.append((cfg.name, kw["resume"])) or real_run(cfg,
                                                                                                                **kw))
    monkeypatch.setattr(training, "after_epoch", epochs.append)
    code, out, err = cli_run("study", path, "--output-dir", out_dir, "--no-progress")
    assert code == 0, out + err
    assert "waiting for 1 run(s) other workers hold" in out and f"pid {pid}" in out
    assert f"pid {pid} sent no heartbeat" in err and "taking the run over" in err
    assert started == [(name, True)] and epochs == [2]  # resumed after epoch 1, not started over
    assert "resuming imgs-simple_cnn-scratch-s0 after epoch 1" in out
    assert_complete_and_released(out_dir / "s", [name])
    same_as_uninterrupted(path, run_dir, tmp_path, real_run)


# ------------------------------------------------------------------------------------------------ submitit

def test_submitit_task_preempted_is_requeued_and_resumes_from_its_checkpoint(folder, tmp_path, hooked):
    pytest.importorskip("submitit")
    from transferbench import executors

    path = study_file(tmp_path, folder, [0], epochs=2)
    out_dir = tmp_path / "runs"
    preempted = names([0])[0]
    marker = hooked.hang(preempted, epoch=1)
    study = load_study(path, out_dir)
    sub = executors.submit(study, executor="local")
    assert sub.runs == [preempted] and len(sub.jobs) == 1
    os.kill(int(wait_for(marker)), signal.SIGUSR2)  # what SLURM sends on preemption or before the time limit
    result = sub.jobs[0].result()
    assert result["run"] == preempted and result["trained_here"] and isinstance(result["test_acc"], float)
    ledger = hooked.ledger()  # the first attempt stopped after epoch 1; the requeued one resumed from there
    assert [(r["run"], r["resumed"]) for r in ledger] == [(preempted, False), (preempted, True)]
    assert_complete_and_released(out_dir / "s", [preempted])
    same_as_uninterrupted(path, out_dir / "s" / preempted, tmp_path)


def test_slurm_submission_is_one_job_array_with_the_options(folder, tmp_path, cli_run, monkeypatch, no_training):
    pytest.importorskip("submitit")
    from submitit.core.utils import DelayedSubmission

    from transferbench.executors import RunTask

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {tmp_path}/submitted.sh\necho 'Submitted batch job 4242'\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    path = study_file(tmp_path, folder, range(3))
    out_dir = tmp_path / "runs"
    code, out, err = cli_run("study", path, "--output-dir", out_dir, "--executor", "slurm")
    assert code == 2 and "needs --time" in err
    code, out, err = cli_run("study", path, "--output-dir", out_dir, "--executor", "slurm", "--partition", "gpu",
                             "--time", "1:30:00", "--account", "proj", "--cpus-per-run", 8, "--mem", "32G",
                             "--slurm-array-parallelism", 2, "--slurm-option", "qos=high")
    assert code == 0, err
    assert "submitted 3 run(s)" in out and "job array 4242" in out and "--status" in out
    sbatch = (tmp_path / "submitted.sh").read_text()
    for flag in ("--partition=gpu", "--time=90", "--account=proj", "--gpus-per-node=1", "--ntasks-per-node=1",
                 "--cpus-per-task=8", "--mem=32G", "--array=0-2%2", "--qos=high", "--signal=USR2@90",
                 "--job-name=transferbench-s"):
        assert f"#SBATCH {flag}\n" in sbatch, flag
    tasks = [DelayedSubmission.load(p).function for p in sorted((out_dir / "s" / "slurm").glob("4242_*_submitted.pkl"))]
    assert [t.run_name for t in tasks] == names(range(3)) and all(isinstance(t, RunTask) for t in tasks)
    requeued = tasks[0].checkpoint()  # on preemption / time-out: the same task, which resumes its run
    assert requeued.function is tasks[0] and requeued.args == () and requeued.kwargs == {}
    code, out, err = cli_run("study", path, "--output-dir", out_dir, "--partition", "gpu")
    assert code == 2 and "--partition applies to --executor slurm only" in err


# ------------------------------------------------------------------------------------------ shards, status

def test_shards_are_disjoint_and_cover_the_grid(folder, tmp_path, cli_run, no_training):
    path = study_file(tmp_path, folder, range(7))
    every = set(names(range(7)))
    for n in (1, 3, 4, 9):
        slices = []
        for k in range(n):
            code, out, err = cli_run("study", path, "--dry-run", "--shard", f"{k}/{n}", "--output-dir",
                                     tmp_path / "runs")
            assert code == 0, err
            slices.append({m[1] for m in re.finditer(r"^\s+\d+\s+new\s+(\S+)", out, re.M)})
        assert set().union(*slices) == every and sum(map(len, slices)) == len(every)  # cover, and disjoint
        assert max(map(len, slices)) - min(map(len, slices)) <= 1
    code, out, err = cli_run("study", path, "--dry-run", "--shard", "1/3", "--output-dir", tmp_path / "runs")
    assert "(shard 1/3: 2 of 7 runs)" in out
    code, _, err = cli_run("study", path, "--shard", "3/3", "--output-dir", tmp_path / "runs")
    assert code == 2 and "numbered from 0 to 2" in err and "SLURM_ARRAY_TASK_MIN" in err
    code, _, err = cli_run("study", path, "--shard", "first", "--output-dir", tmp_path / "runs")
    assert code == 2 and "expected K/N" in err


def test_status_shows_done_running_stale_and_pending(folder, tmp_path, cli_run, no_training):
    path = study_file(tmp_path, folder, range(4), epochs=3)
    study = load_study(path, tmp_path / "runs")
    done, running, stale, pending = study.runs
    for run in (done, running, stale):
        run.dir.mkdir(parents=True)
        (run.dir / "config.json").write_text(json.dumps(run.config.resolved().to_dict()))
    (done.dir / "summary.json").write_text(json.dumps({"test_acc": 0.5, "best_val_acc": 0.5}))
    (running.dir / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (stale.dir / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    assert claims.try_claim(running.dir) is not None  # held by this (live) process
    assert claims.try_claim(stale.dir) is not None
    old = time.time() - 600
    os.utime(stale.dir / claims.CLAIM_FILE, (old, old))  # its holder stopped heartbeating 10 minutes ago
    code, out, err = cli_run("study", path, "--status", "--output-dir", tmp_path / "runs")
    assert code == 0, err
    host = claims.claim_state(running.dir)["host"]
    assert re.search(rf"1\s+done\s+{done.name}\s+test_acc 0.5000", out)
    assert re.search(rf"2\s+running\s+{running.name}\s+epoch 1/3 on {re.escape(host)} pid {os.getpid()} since "
                     rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d, heartbeat \d+s ago", out)
    assert re.search(rf"3\s+stale\s+{stale.name}\s+epoch 2/3; .*pid {os.getpid()} .*sent no heartbeat for "
                     rf"10m00s: the next worker takes it over and resumes it", out)
    assert re.search(rf"4\s+pending\s+{pending.name}\s+new", out)
    assert "1 done, 1 running, 1 stale, 1 pending" in out


# ----------------------------------------------------------------------------------------------- trackers

def test_log_tensorboard_for_every_run_and_it_never_makes_a_run_differ(folder, tmp_path, cli_run):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    path = study_file(tmp_path, folder, [0], epochs=2)
    out_dir = tmp_path / "runs"
    code, out, err = cli_run("study", path, "--output-dir", out_dir, "--log", "tensorboard", "--no-progress")
    assert code == 0, err
    run_dir = out_dir / "s" / names([0])[0]
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    _, metrics = read(run_dir)
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("val/acc")] == [
        (m["epoch"], round(m["val_acc"], 6)) for m in metrics]
    assert json.loads((run_dir / "config.json").read_text())["log"] == "tensorboard"
    code, out, err = cli_run("study", path, "--output-dir", out_dir, "--no-progress")  # without --log: same run
    assert code == 0 and "1 of 1 runs already complete, skipped" in out
    code, out, err = cli_run("study", path, "--output-dir", out_dir, "--log", "tensorbored")
    assert code == 2 and "tensorbored" in err
