"""The names of every file a run or study directory holds, and how they are written: atomically
(temp file + rename), so a reader never sees half a file."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import UserError

# A run directory
CONFIG, METRICS, SUMMARY, MODEL, CHECKPOINT, CURVES = (
    "config.json", "metrics.jsonl", "summary.json", "model.pt", "checkpoint.pt", "curves.png")
PREDICTIONS, CONFUSION_CSV, CONFUSION_PNG, PER_CLASS_PNG, TEST_FILES = (
    "predictions.npz", "confusion.csv", "confusion.png", "per_class.png", "test_files.txt")
# A study directory (what `transferbench study` writes beside its runs); a ranking (`transferbench rank`, and a
# study's transferability scores in STUDY_DIR/TRANSFERABILITY_DIR/DATASET/)
STUDY_RECORD, TRANSFERABILITY_DIR = "study.json", "transferability"
RANK_JSON, RANK_CSV = "rank.json", "rank.csv"


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in 1 MiB chunks (hashlib.file_digest needs Python 3.11)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def writable_dir(path: Path, what: str) -> Path:
    """Create `path` if needed and check that files can be written in it; otherwise one clear error naming
    `what` (the option or variable that chose it)."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        raise UserError(f"{what} {path}: a file is in the way (a directory is needed there); choose another") from None
    except OSError as err:
        raise UserError(f"{what} {path} is not a writable directory ({err.strerror or err}); choose one you can "
                        f"write to") from None
    return path


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise UserError(f"cannot write {path} ({err.strerror or err}); choose a directory you can write to") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a run's files get the usual permissions
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):  # disk full, read-only, a directory where the file should go, ...
            raise UserError(f"cannot write {path} ({err.strerror or err}); nothing was changed there") from None
        raise


def replace_dir(new: Path, old: Path) -> None:
    """Put directory `new` where `old` is, whole: `old` (every file it had) goes only once `new` is complete."""
    aside = old.with_name(f".{old.name}.replaced-{os.getpid()}")
    os.rename(old, aside)
    os.rename(new, old)
    shutil.rmtree(aside, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    _atomic(path, write)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_torch_save(obj: Any, path: Path) -> None:
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
