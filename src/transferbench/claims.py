"""Run claims: which worker owns which run of a study, so no run is trained twice and a crashed worker's run is resumed.

A claim is `<run dir>/claim.json`, published with `os.link` (atomic and exclusive, also on NFS). While a worker
trains, a daemon thread touches the file's mtime every `heartbeat_s`; a claim whose mtime is older than
`stale_after_s` belongs to a dead (or hung) worker and may be taken over by exactly one other worker.

Freshness is judged by the claim file's mtime only, never by a clock written into the JSON: on NFS `os.utime(path)`
asks the server to stamp its own time, so every machine reads one clock, and a file with unreadable JSON is judged
the same way. The JSON's `heartbeat` is the claim time; `claim_state` reports the mtime as the live heartbeat.
`stale_after_s` must exceed the clock skew between machines and the file server, plus a few heartbeats.

A worker should re-check that the run has no summary.json *after* claiming: another worker may have finished it and
released its claim between listing the study and claiming.

`intervals()` gives the (stale_after_s, heartbeat_s) every worker of a study should use: 120 s and 15 s, or
`TRANSFERBENCH_CLAIM_STALE_S` (and optionally `TRANSFERBENCH_CLAIM_HEARTBEAT_S`, default a quarter of it, at most
15 s) from the environment. Every process sharing a study directory should see the same values.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .errors import UserError

CLAIM_FILE = "claim.json"
STALE_AFTER_S, HEARTBEAT_S = 120.0, 15.0
STALE_ENV, HEARTBEAT_ENV = "TRANSFERBENCH_CLAIM_STALE_S", "TRANSFERBENCH_CLAIM_HEARTBEAT_S"


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object written by another process (a claim, a worker's status), or None when it is unreadable or
    not an object (a claim is then judged by its mtime alone)."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _is_stale(st: os.stat_result, stale_after_s: float) -> bool:
    return time.time() - st.st_mtime > stale_after_s


def _publish(run_dir: Path, info: dict[str, Any]) -> bool:
    """Create run_dir/claim.json holding `info`, exclusively; False when a claim is already there.

    The JSON goes into a private temp file first and is then hard-linked to the claim name: link() fails if the name
    exists, on NFS too (O_EXCL is not exclusive on old NFS clients), and readers never see a half-written claim.
    """
    claim = run_dir / CLAIM_FILE
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{CLAIM_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        try:
            os.link(tmp, claim)
            return True
        except OSError as e:
            # NFS can retransmit a link whose reply was lost and report EEXIST although the first try made it;
            # open(2) recommends trusting the temp file's link count instead.
            if os.stat(tmp).st_nlink == 2:
                return True
            if isinstance(e, FileExistsError):
                return False
            raise
    finally:
        os.unlink(tmp)


class Claim:
    """A run this process owns. `with claim:` heartbeats while the block runs and releases at the end.

    `lost` turns True when the heartbeat finds the claim gone or someone else's (we were judged dead and taken
    over): the caller should stop training that run, and release() will leave the new owner's claim alone.
    """

    def __init__(self, path: Path, info: dict[str, Any], heartbeat_s: float):
        self.path = path
        self.info = info
        self.token: str = info["token"]
        self.heartbeat_s = heartbeat_s
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._released = False

    def __repr__(self) -> str:
        return f"Claim({str(self.path)!r}, host={self.info['host']!r}, pid={self.info['pid']}, lost={self.lost})"

    def is_ours(self) -> bool:
        """Whether claim.json still carries our token (False if it is gone or was taken over)."""
        info = read_json_object(self.path)
        return info is not None and info.get("token") == self.token

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                info = json.loads(self.path.read_text())
                if not isinstance(info, dict) or info.get("token") != self.token:
                    break
                # Touch, don't rewrite: replacing the file after checking the token could clobber a claim that a
                # taker published in between; a stray touch of the new owner's file only keeps it fresh.
                os.utime(self.path)
            except (FileNotFoundError, ValueError):
                break  # gone or not our well-formed file: taken over
            except OSError:
                continue  # a transient NFS error: the next beat retries, well before the claim goes stale
        else:
            return  # stopped by release()
        self.lost = True

    def start_heartbeat(self) -> Claim:
        if self._thread is None and not self._released:
            self._thread = threading.Thread(target=self._beat, name=f"claim-heartbeat:{self.path.parent.name}",
                                            daemon=True)
            self._thread.start()
        return self

    def release(self) -> None:
        """Stop heartbeating and delete claim.json if it is still ours. Safe to call twice."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self._released:
            return
        self._released = True
        # Check-then-unlink leaves a window, but a taker only acts on a claim already stale_after_s old, and ours
        # was heartbeating until just now.
        if not self.lost and self.is_ours():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> Claim:
        return self.start_heartbeat()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _check_intervals(stale_after_s: float, heartbeat_s: float) -> None:
    if heartbeat_s <= 0:
        raise UserError(f"Claim heartbeat_s must be positive, got {heartbeat_s}.")
    if stale_after_s < 2 * heartbeat_s:
        raise UserError(f"Claim stale_after_s={stale_after_s} must be at least twice heartbeat_s={heartbeat_s}, "
                        "or one late heartbeat gets a live worker's run taken over; use e.g. 120 s and 15 s.")


def _seconds_from_env(name: str) -> float | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{name}={text!r} must be a number of seconds") from None
    if not value > 0:
        raise UserError(f"{name}={text!r} must be a positive number of seconds")
    return value


def intervals() -> tuple[float, float]:
    """(stale_after_s, heartbeat_s): the defaults, or what TRANSFERBENCH_CLAIM_STALE_S / _HEARTBEAT_S say."""
    stale = _seconds_from_env(STALE_ENV) or STALE_AFTER_S
    heartbeat = _seconds_from_env(HEARTBEAT_ENV) or min(HEARTBEAT_S, stale / 4)
    try:
        _check_intervals(stale, heartbeat)
    except UserError as err:
        raise UserError(f"{STALE_ENV} / {HEARTBEAT_ENV}: {err}") from None
    return stale, heartbeat


def _run_dir(run_dir: str | os.PathLike[str]) -> Path:
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"Cannot create run directory {run_dir} to claim it: {e.strerror or e}.") from e
    return run_dir


def try_claim(run_dir: str | os.PathLike[str], *, stale_after_s: float = 120.0,
              heartbeat_s: float = 15.0) -> Claim | None:
    """Claim run_dir for this process, or None if a live worker holds it, another taker beat us to a stale one,
    or its holder released it just now (look at the run again).

    The heartbeat is not started: use `with claim:` or `claim.start_heartbeat()`.
    """
    _check_intervals(stale_after_s, heartbeat_s)
    run_dir = _run_dir(run_dir)
    claim = run_dir / CLAIM_FILE
    now = time.time()
    token = uuid.uuid4().hex
    info = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now, "token": token}
    if _publish(run_dir, info):
        return Claim(claim, info, heartbeat_s)

    try:
        seen = os.stat(claim)
    except FileNotFoundError:
        return None  # released just now: the run is probably done, and the caller can look again
    if not _is_stale(seen, stale_after_s) or not _take_over(run_dir, seen, info, stale_after_s):
        return None
    return Claim(claim, info, heartbeat_s)


def _take_over(run_dir: Path, seen: os.stat_result, info: dict[str, Any], stale_after_s: float) -> bool:
    """Replace the stale claim we `seen` with `info`: True for exactly one of the workers that saw it stale.

    The claim name is never left empty (an empty name lets a newcomer publish while a taker also wins). Instead the
    takers of one stale claim race to hard-link it to a marker named after it (inode and mtime): link() is
    exclusive, so one taker gets the marker, checks that the claim is still the stale file it saw, and replaces it
    with its own in one rename. A late taker that looked before the replacement gets the marker after the winner
    removed it, sees a different file and gives up. Linking bumps the claim's ctime, so a marker older than
    stale_after_s belongs to a taker that died on the spot; the next marker (suffix + 1) is then up for grabs.
    """
    claim = run_dir / CLAIM_FILE
    stem = f"{CLAIM_FILE}.taken-{seen.st_ino}-{seen.st_mtime_ns}-"
    earlier = [p for p in run_dir.iterdir() if p.name.startswith(stem)]
    number = 0
    if earlier:
        try:
            if time.time() - os.stat(earlier[0]).st_ctime <= stale_after_s:
                return False  # another taker is replacing this claim right now
        except FileNotFoundError:
            return False  # and has just finished
        number = 1 + max(int(p.name[len(stem):]) for p in earlier)
    marker = run_dir / f"{stem}{number}"
    try:
        os.link(claim, marker)
    except (FileExistsError, FileNotFoundError):
        return False  # another taker got this marker, or the claim was released
    won = False
    try:
        st = os.stat(marker)
        if (st.st_ino, st.st_mtime_ns) != (seen.st_ino, seen.st_mtime_ns):
            return False  # replaced by another taker since we looked, or its owner woke up and heartbeat
        now = time.time()
        info.update(started=now, heartbeat=now)
        fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{CLAIM_FILE}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            os.replace(tmp, claim)
        except BaseException:
            os.unlink(tmp)
            raise
        won = True
        return True
    finally:
        # The winner removes every marker of the claim it replaced (a dead taker's too); a loser only its own.
        markers = [p for p in run_dir.iterdir() if p.name.startswith(stem)] if won else [marker]
        for path in markers:
            try:
                path.unlink()
            except FileNotFoundError:
                pass


def claim_state(run_dir: str | os.PathLike[str], stale_after_s: float = 120.0) -> dict[str, Any] | None:
    """What `study --status` shows for a run: None when unclaimed, else the claim's host/pid/started/token plus
    `heartbeat` (the file's mtime), `age_s` since it and `stale`. An unreadable claim reports only those three."""
    claim = Path(run_dir) / CLAIM_FILE
    try:
        st = os.stat(claim)
    except FileNotFoundError:
        return None
    state = read_json_object(claim) or {}
    age = time.time() - st.st_mtime
    state.update(heartbeat=st.st_mtime, age_s=age, stale=age > stale_after_s)
    return state
