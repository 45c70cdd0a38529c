"""Run claims: exclusive among threads and processes, kept fresh by the heartbeat, taken over once when stale."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

# Racer processes need only claims.py (stdlib only), but the package __init__ imports torch: over a second per
# process. Register the package without running its __init__, in spawned children only (they import this file to
# find their target, already named by multiprocessing), never in pytest itself.
LIGHT_PACKAGE = ("import importlib.util, sys; spec = importlib.util.find_spec('transferbench'); "
                 "sys.modules['transferbench'] = importlib.util.module_from_spec(spec)")
if multiprocessing.current_process().name != "MainProcess" and "transferbench" not in sys.modules:
    exec(LIGHT_PACKAGE)

from transferbench import claims  # noqa: E402 (after the light package above)
from transferbench.claims import CLAIM_FILE, claim_state, try_claim  # noqa: E402
from transferbench.errors import UserError  # noqa: E402

# Tiny intervals keep the file fast; STALE leaves room for a heartbeat delayed by a busy shared machine.
BEAT, STALE = 0.05, 0.4


def _backdate(run_dir: Path, seconds: float = 60.0) -> None:
    """Make the claim look abandoned, as if its holder stopped heartbeating a minute ago."""
    old = time.time() - seconds
    os.utime(run_dir / CLAIM_FILE, (old, old))


def _race_threads(run_dir: Path, n: int = 12) -> list:
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def take(i: int) -> None:
        barrier.wait()
        results[i] = try_claim(run_dir, stale_after_s=STALE, heartbeat_s=BEAT)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _claim_in_process(run_dir: str, barrier, wins) -> None:
    """Spawned racer: claims and keeps its claim (no release), so a late racer cannot win a freed run."""
    barrier.wait()
    claim = try_claim(run_dir, stale_after_s=STALE, heartbeat_s=BEAT)
    if claim is not None:
        with wins.get_lock():
            wins.value += 1


def _race_processes(run_dir: Path, n: int = 4) -> int:
    ctx = multiprocessing.get_context("spawn")
    barrier, wins = ctx.Barrier(n), ctx.Value("i", 0)
    procs = [ctx.Process(target=_claim_in_process, args=(str(run_dir), barrier, wins)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return wins.value


def test_one_of_many_threads_wins(tmp_path):
    run_dir = tmp_path / "study" / "run-a"  # parents are created
    results = _race_threads(run_dir)
    winners = [c for c in results if c is not None]
    assert len(winners) == 1
    info = json.loads((run_dir / CLAIM_FILE).read_text())
    assert info["token"] == winners[0].token and info["pid"] == os.getpid()
    assert sorted(p.name for p in run_dir.iterdir()) == [CLAIM_FILE]  # no temp or stale files left behind


def test_one_of_many_processes_wins(tmp_path):
    assert _race_processes(tmp_path / "run") == 1


def test_heartbeat_keeps_claim_fresh(tmp_path):
    with try_claim(tmp_path, stale_after_s=STALE, heartbeat_s=BEAT) as claim:
        time.sleep(1.5 * STALE)  # several beats, and longer than stale_after_s
        state = claim_state(tmp_path, stale_after_s=STALE)
        assert not state["stale"] and state["age_s"] < STALE
        assert try_claim(tmp_path, stale_after_s=STALE, heartbeat_s=BEAT) is None
        assert not claim.lost
    assert claim_state(tmp_path) is None  # the with block released it


def test_without_heartbeat_claim_goes_stale_and_is_taken_over(tmp_path):
    claim = try_claim(tmp_path, stale_after_s=STALE, heartbeat_s=BEAT)
    assert try_claim(tmp_path, stale_after_s=STALE, heartbeat_s=BEAT) is None
    time.sleep(STALE + 0.05)
    assert claim_state(tmp_path, stale_after_s=STALE)["stale"]
    assert try_claim(tmp_path, stale_after_s=STALE, heartbeat_s=BEAT) is not None
    assert not claim.is_ours()


KILLED_HOLDER = LIGHT_PACKAGE + """
import time
from transferbench.claims import try_claim
claim = try_claim(sys.argv[1], stale_after_s=float(sys.argv[2]), heartbeat_s=float(sys.argv[3])).start_heartbeat()
print("claimed", flush=True)
time.sleep(60)
"""


def test_sigkilled_holder_is_taken_over_by_exactly_one(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", KILLED_HOLDER, str(run_dir), str(STALE), str(BEAT)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        time.sleep(STALE + 0.05)  # heartbeating: still fresh after stale_after_s
        assert not claim_state(run_dir, stale_after_s=STALE)["stale"]
        assert try_claim(run_dir, stale_after_s=STALE, heartbeat_s=BEAT) is None
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    state = claim_state(run_dir, stale_after_s=STALE)
    assert state["pid"] == holder.pid and state["host"] == socket.gethostname()
    time.sleep(STALE + 0.05)
    assert claim_state(run_dir, stale_after_s=STALE)["stale"]
    winners = [c for c in _race_threads(run_dir) if c is not None]
    assert len(winners) == 1 and winners[0].is_ours()
    assert sorted(p.name for p in run_dir.iterdir()) == [CLAIM_FILE]


def test_stale_claim_is_taken_over_by_exactly_one_process(tmp_path):
    assert try_claim(tmp_path, stale_after_s=STALE, heartbeat_s=BEAT) is not None
    _backdate(tmp_path)
    assert _race_processes(tmp_path) == 1
    assert claim_state(tmp_path, stale_after_s=STALE)["pid"] != os.getpid()


def test_taken_over_holder_notices_and_release_keeps_new_claim(tmp_path):
    old = try_claim(tmp_path, stale_after_s=STALE, heartbeat_s=BEAT)
    _backdate(tmp_path)  # as if `old` hung for a minute
    new = try_claim(tmp_path, stale_after_s=STALE, heartbeat_s=BEAT)
    assert new is not None and new.token != old.token
    old.start_heartbeat()
    deadline = time.time() + 2
    while not old.lost and time.time() < deadline:
        time.sleep(0.01)
    assert old.lost
    old.release()
    old.release()  # twice is fine
    assert claim_state(tmp_path)["token"] == new.token
    new.release()
    new.release()
    assert claim_state(tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_release_removes_only_own_claim(tmp_path):
    claim = try_claim(tmp_path, stale_after_s=STALE, heartbeat_s=BEAT)
    foreign = {"host": "elsewhere", "pid": 1, "started": 0, "heartbeat": 0, "token": "not-ours"}
    (tmp_path / CLAIM_FILE).write_text(json.dumps(foreign))
    claim.release()
    assert claim_state(tmp_path)["host"] == "elsewhere"


def test_claim_state_reports_host_pid_and_staleness(tmp_path):
    assert claim_state(tmp_path / "never-claimed") is None
    claim = try_claim(tmp_path, stale_after_s=STALE, heartbeat_s=BEAT)
    state = claim_state(tmp_path, stale_after_s=STALE)
    assert (state["host"], state["pid"], state["token"]) == (socket.gethostname(), os.getpid(), claim.token)
    assert state["stale"] is False and 0 <= state["age_s"] < STALE and state["started"] <= time.time()
    _backdate(tmp_path, 90)
    state = claim_state(tmp_path, stale_after_s=STALE)
    assert state["stale"] is True and state["age_s"] == pytest.approx(90, abs=5)


def test_unreadable_claim_is_judged_by_mtime(tmp_path):
    (tmp_path / CLAIM_FILE).write_text('{"host": "trunc')
    assert try_claim(tmp_path, stale_after_s=STALE, heartbeat_s=BEAT) is None
    assert claim_state(tmp_path, stale_after_s=STALE)["stale"] is False
    _backdate(tmp_path)
    assert claim_state(tmp_path, stale_after_s=STALE)["stale"] is True
    assert try_claim(tmp_path, stale_after_s=STALE, heartbeat_s=BEAT) is not None


def _link_after(hook):
    """os.link that runs `hook` just before a taker links its marker (not for the first publish of a claim)."""
    real_link = os.link

    def link(src, dst):
        if ".taken-" in str(dst):
            hook()
        real_link(src, dst)
    return link


def test_slow_taker_leaves_a_faster_takers_claim_alone(tmp_path, monkeypatch):
    """A taker judges the claim stale, but before it links its marker a faster taker replaces the claim with a
    fresh one: the slow one must not steal that claim."""
    stale = try_claim(tmp_path, stale_after_s=STALE, heartbeat_s=BEAT)
    _backdate(tmp_path)
    real_link, fast = os.link, []

    def faster_taker():
        monkeypatch.setattr(claims.os, "link", real_link)
        fast.append(try_claim(tmp_path, stale_after_s=STALE, heartbeat_s=BEAT))

    monkeypatch.setattr(claims.os, "link", _link_after(faster_taker))
    assert try_claim(tmp_path, stale_after_s=STALE, heartbeat_s=BEAT) is None
    assert fast[0] is not None and fast[0].is_ours() and not stale.is_ours()
    assert sorted(p.name for p in tmp_path.iterdir()) == [CLAIM_FILE]


def test_taker_that_died_while_taking_over_does_not_block_the_claim(tmp_path, monkeypatch):
    """A taker killed between linking its marker and replacing the claim: once that marker is stale_after_s old,
    the next taker takes over with the next marker and removes both."""
    try_claim(tmp_path, stale_after_s=STALE, heartbeat_s=BEAT)
    _backdate(tmp_path)
    st = os.stat(tmp_path / CLAIM_FILE)
    os.link(tmp_path / CLAIM_FILE, tmp_path / f"{CLAIM_FILE}.taken-{st.st_ino}-{st.st_mtime_ns}-0")  # as it left it
    assert try_claim(tmp_path, stale_after_s=STALE, heartbeat_s=BEAT) is None  # the dying taker's marker is fresh
    time.sleep(STALE + 0.05)
    claim = try_claim(tmp_path, stale_after_s=STALE, heartbeat_s=BEAT)
    assert claim is not None and claim.is_ours()
    assert sorted(p.name for p in tmp_path.iterdir()) == [CLAIM_FILE]


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="at least twice heartbeat_s"):
        try_claim(tmp_path, stale_after_s=10, heartbeat_s=6)
    with pytest.raises(UserError, match="must be positive"):
        try_claim(tmp_path, heartbeat_s=0)
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="Cannot create run directory"):
        try_claim(tmp_path / "file" / "run")
